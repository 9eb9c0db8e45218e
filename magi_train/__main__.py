"""`python -m magi_train recipe=<name> [overrides]`: the Hydra entry point of every recipe."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from magi_train.config import register_configs

register_configs()


def run(cfg: DictConfig) -> Any:
    """Run the recipe's task on a composed config (tests call this directly)."""
    # heavy imports after Hydra has parsed the command line
    from magi_train.training.run import run_distill
    from magi_train.eval.runner import run_evaluate
    from magi_train.inference.generate import run_generate
    from magi_train.training.trainer import run_pretrain

    runners = {
        "pretrain": run_pretrain,
        "pretrain_sr": run_pretrain,
        "dmd2": run_distill,
        "generate": run_generate,
        "evaluate": run_evaluate,
    }
    if cfg.task not in runners:
        raise ValueError(f"recipe {cfg.recipe!r} names task {cfg.task!r}; known tasks: {sorted(runners)}")
    return runners[cfg.task](cfg)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

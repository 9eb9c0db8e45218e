"""Shared test set-up: offline hubs, quiet W&B, and a helper that composes configs like the CLI does."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(overrides: list[str]):
    """The root config as `python -m magi_train <overrides>` would build it (for fixtures of any scope)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from magi_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the root config as `python -m magi_train <overrides>` would build it."""
    return compose_config


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: on a busy 2-core machine OpenMP threads spinning at
    barriers make tiny models 10-100x slower, and they gain nothing from threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Two-step smoke runs: enough for checkpoints of the right format (with EMA), not for learning.
SMOKE_TRAIN = [
    "experiment=smoke",
    "trainer.max_steps=2",
    "trainer.val_check_interval=null",
    "trainer.enable_progress_bar=false",
    "data.synthetic.num_clips=8",
    "data.synthetic.samples_per_shard=8",
]


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """Tiny random codecs and two short training runs, a base and an SR checkpoint of ours (.ckpt with EMA),
    shared by the generate and evaluate tests: {"root", "codecs", "base", "sr"}."""
    from magi_train.codecs.tiny import write_tiny_codecs
    from magi_train.training.trainer import run_pretrain

    root = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread: tiny models
    try:
        for recipe, name in (("pretrain_base", "train"), ("pretrain_sr", "train_sr")):
            run_pretrain(compose_config([f"recipe={recipe}", f"run_dir={root / name}", *SMOKE_TRAIN]))
        write_tiny_codecs(root / "codecs")
    finally:
        torch.set_num_threads(threads)
    return {
        "root": root,
        "codecs": root / "codecs",
        "base": root / "train/checkpoints/last.ckpt",  # the evaluate tests name this model "train"
        "sr": root / "train_sr/checkpoints/last.ckpt",
    }

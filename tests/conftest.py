"""Shared test set-up: offline hubs, quiet W&B, and a helper that composes configs like the CLI does."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@pytest.fixture
def compose():
    """compose(overrides) -> the root config as `python -m magi_train <overrides>` would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from magi_train.config import register_configs

    register_configs()

    def _compose(overrides: list[str]):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)

    return _compose


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: on a busy 2-core machine OpenMP threads spinning at
    barriers make tiny models 10-100x slower, and they gain nothing from threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

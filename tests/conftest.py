"""Shared test set-up: offline hubs, quiet W&B, and a helper that composes configs like the CLI does."""

import os

import pytest
import torch

from tests.fixtures.smoke import SMOKE_TRAIN

# Under pytest-xdist (the README's command runs 2 workers on 2 cores): one intra-op thread per worker and per
# process it starts, else OpenMP threads of the two workers spin against each other (10x slower tiny models)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(overrides: list[str]):
    """The root config as `python -m magi_train <overrides>` would build it (for fixtures of any scope)."""
    from magi_train.__main__ import compose

    return compose(overrides)


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


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """Tiny random codecs and two short training runs, a base and an SR checkpoint of ours (.ckpt with EMA),
    shared by the generate and evaluate tests: {"root", "codecs", "base", "sr"}."""
    from magi_train.__main__ import run
    from magi_train.codecs.tiny import write_tiny_codecs

    root = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread: tiny models
    try:
        for recipe, name in (("pretrain_base", "train"), ("pretrain_sr", "train_sr")):
            run(compose_config([f"recipe={recipe}", f"run_dir={root / name}", *SMOKE_TRAIN]))
        write_tiny_codecs(root / "codecs")
    finally:
        torch.set_num_threads(threads)
    return {
        "root": root,
        "codecs": root / "codecs",
        "base": root / "train/checkpoints/last.ckpt",  # the evaluate tests name this model "train"
        "sr": root / "train_sr/checkpoints/last.ckpt",
    }

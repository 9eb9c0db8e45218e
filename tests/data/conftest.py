"""Fixtures of the data tests: a narrow text width and a few small synthetic shards of mixed sizes."""

import pytest

from magi_train.data.synthetic import write_synthetic_shards

D = 32  # text feature width in tests (the real T5-Gemma width is 3584)
SIZES = [(3, 4, 6), (2, 6, 6), (4, 4, 4)]  # (T, H, W) latents: 31..57 tokens per clip with 4..8 text tokens
NUM_CLIPS, PER_SHARD, SEED = 40, 10, 3


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """4 shards of 10 clips each (video stored float16)."""
    return write_synthetic_shards(
        tmp_path / "shards", NUM_CLIPS, PER_SHARD, seed=SEED, sizes=SIZES, text_dim=D, text_len=(4, 8)
    )

"""Aspect-ratio / duration bucketing of packed batches (data/reader.py pack_bucketed, ShardDataset)."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from magi_train.config import DataConfig
from magi_train.data import (
    ShardDataset,
    bucket_key,
    make_loader,
    pack_bucketed,
    pack_by_tokens,
    synthetic_clips,
)
from magi_train.data.datamodule import ClipDataModule

SIZES = [(3, 4, 6), (2, 6, 6), (4, 4, 4), (5, 2, 8), (2, 2, 2)]  # (T, H, W): 11..45 tokens per clip
TEXT_LEN = (4, 8)  # text tokens vary by at most 4 within a bucket
BUDGET = 400
D, NUM_CLIPS = 32, 40  # text width and clip count of the `shards` fixture (tests/data/conftest.py)


def _clips(n=200, seed=7):
    return list(synthetic_clips(n, seed, SIZES, TEXT_LEN, D))


def _per_clip_tokens(batch) -> list[int]:
    return [v.shape[1] * (v.shape[2] // 2) * (v.shape[3] // 2) + a.shape[0] + t.shape[0]
            for v, a, t in zip(batch.video, batch.audio, batch.text, strict=True)]  # fmt: skip


def _spread(batches) -> float:
    """Mean over batches of (largest - smallest clip) in tokens: 0 = every batch homogeneous."""
    return float(np.mean([max(p) - min(p) for p in map(_per_clip_tokens, batches)]))


def test_bucketed_batches_are_homogeneous_and_nothing_is_lost():
    clips = _clips()
    plain = list(pack_by_tokens(clips, BUDGET))
    bucketed = list(pack_bucketed(clips, BUDGET, buffer=len(clips)))
    # nothing lost, nothing repeated
    assert Counter(k for b in bucketed for k in b.keys) == Counter(c.key for c in clips)
    assert all(len({tuple(v.shape[1:]) for v in b.video}) == 1 for b in bucketed)  # one bucket per batch
    assert any(len({tuple(v.shape[1:]) for v in b.video}) > 1 for b in plain)  # the stream is mixed
    # within a bucketed batch clips differ only by their text length
    assert _spread(bucketed) <= TEXT_LEN[1] - TEXT_LEN[0]
    assert _spread(plain) > 4 * _spread(bucketed)
    for b in bucketed:
        assert b.num_tokens <= BUDGET
    # with a buffer holding everything, only each bucket's last batch is short of the budget
    biggest = max(c.num_tokens for c in clips)
    short = [b for b in bucketed if b.num_tokens <= BUDGET - biggest]
    assert len(short) <= len(SIZES)


def test_buffer_bounds_held_clips_and_max_clips():
    clips = _clips(120, seed=3)
    consumed = 0

    def stream():
        nonlocal consumed
        for c in clips:
            consumed += 1
            yield c

    emitted, keys = 0, []
    for batch in pack_bucketed(stream(), BUDGET, max_clips=5, buffer=12):
        assert consumed - emitted <= 12  # never more than `buffer` clips waiting
        assert len(batch) <= 5 and len({tuple(v.shape) for v in batch.video}) == 1
        emitted += len(batch)
        keys += batch.keys
    assert sorted(keys) == sorted(c.key for c in clips)
    assert [len(b) for b in pack_bucketed(clips[:4], BUDGET, buffer=1)] == [1, 1, 1, 1]


def test_bucket_key_and_bad_arguments():
    c = _clips(1)[0]
    assert bucket_key(c) == tuple(c.video.shape[1:])
    with pytest.raises(ValueError, match="buffer"):
        list(pack_bucketed(_clips(2), BUDGET, buffer=0))
    with pytest.raises(ValueError, match="max_tokens"):
        list(pack_bucketed(_clips(2), 0))
    with pytest.raises(ValueError, match="bucket_buffer"):
        ShardDataset([], text_dim=D, max_tokens=100, bucket_buffer=-1)


def test_shard_dataset_buckets_one_pass_and_resumes_exactly(shards):
    ds = ShardDataset(shards, text_dim=D, max_tokens=200, bucket_buffer=16)
    batches = list(make_loader(ds, num_workers=0, pin_memory=False))
    plain = ShardDataset(shards, text_dim=D, max_tokens=200)
    every = Counter(k for b in plain for k in b.keys)
    assert len(every) == NUM_CLIPS
    assert Counter(k for b in batches for k in b.keys) == every  # each clip exactly once
    assert all(len({tuple(v.shape) for v in b.video}) == 1 for b in batches)

    def train_ds():
        return ShardDataset(shards, text_dim=D, max_tokens=200, shuffle_buffer=8, seed=1, infinite=True,
                            bucket_buffer=16)  # fmt: skip

    full = train_ds()
    it = iter(full)
    reference = [next(it).keys for _ in range(12)]
    first = train_ds()
    it = iter(first)
    for _ in range(7):
        next(it)
    resumed = train_ds()
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    assert [next(it).keys for _ in range(5)] == reference[7:]


def test_data_config_turns_bucketing_on(shards):
    cfg = OmegaConf.structured(DataConfig(train_shards=str(shards[0]), text_dim=D, bucket_buffer=32))
    dm = ClipDataModule(cfg)
    assert dm._dataset(cfg.train_shards, infinite=False, seed=0).bucket_buffer == 32
    assert OmegaConf.structured(DataConfig(train_shards="x")).bucket_buffer == 0  # off unless configured
    shards_yaml = OmegaConf.load(Path(__file__).parents[2] / "configs" / "data" / "shards.yaml")
    assert shards_yaml.bucket_buffer > 0  # real-data runs bucket by default

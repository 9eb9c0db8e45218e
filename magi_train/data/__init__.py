"""Webdataset shards of pre-encoded clips: schema, writer, reader with packing, synthetic data (DESIGN.md)."""

from magi_train.data.reader import (
    ClipBatch,
    ShardDataset,
    ShardLoader,
    bucket_key,
    expand_urls,
    make_loader,
    pack_bucketed,
    pack_by_tokens,
)
from magi_train.data.schema import (
    AUDIO_CHANNELS,
    MAX_TEXT_TOKENS,
    PATCH,
    VIDEO_CHANNELS,
    Clip,
    SampleError,
    count_tokens,
    expected_audio_len,
    validate_sample,
)
from magi_train.data.synthetic import (
    concept_bank,
    synthetic_clip,
    synthetic_clips,
    write_corrupt_shard,
    write_synthetic_shards,
)
from magi_train.data.writer import clip_to_sample, write_shards

__all__ = [
    "AUDIO_CHANNELS",
    "MAX_TEXT_TOKENS",
    "PATCH",
    "VIDEO_CHANNELS",
    "Clip",
    "ClipBatch",
    "SampleError",
    "ShardDataset",
    "ShardLoader",
    "bucket_key",
    "clip_to_sample",
    "concept_bank",
    "count_tokens",
    "expand_urls",
    "expected_audio_len",
    "make_loader",
    "pack_bucketed",
    "pack_by_tokens",
    "synthetic_clip",
    "synthetic_clips",
    "validate_sample",
    "write_corrupt_shard",
    "write_shards",
    "write_synthetic_shards",
]

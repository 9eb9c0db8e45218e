"""Shard writer: atomic shards, refusing bad clips and stale shard sets, reproducible bytes, dtype options."""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from magi_train.data.schema import Clip, SampleError, validate_sample
from magi_train.data.synthetic import synthetic_clips
from magi_train.data.writer import write_shards

D = 32


def clips(n, seed=0, size=(2, 4, 4)):
    return list(synthetic_clips(n, seed, [size], 4, D))


def read_back(path):
    return [validate_sample(raw, D) for raw in wds.tarfile_to_samples()(iter([{"url": str(path)}]))]


def test_shards_are_named_counted_and_complete(tmp_path):
    paths = write_shards(tmp_path, clips(5), samples_per_shard=2)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert [len(read_back(p)) for p in paths] == [2, 2, 1]
    names = [p.rsplit("/", 1)[1] for p in paths]
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(names + [n + ".index.json" for n in names])


def test_crash_leaves_no_partial_shard(tmp_path):
    def crashing():
        yield from clips(3)
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_shards(tmp_path, crashing(), samples_per_shard=2)
    # no temp file, no half shard, no index without its shard
    assert sorted(q.name for q in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000000.tar.index.json"]
    assert len(read_back(tmp_path / "shard-000000.tar")) == 2


def test_bad_clips_are_refused_before_writing(tmp_path):
    good = clips(1)[0]
    bad = Clip(key="bad", video=good.video, audio=good.audio[:4], text=good.text)
    with pytest.raises(SampleError, match="'bad': audio.npy: length 4"):
        write_shards(tmp_path / "a", [good, bad], samples_per_shard=10)
    assert not list((tmp_path / "a").iterdir())
    with pytest.raises(ValueError, match="no '.'"):
        write_shards(tmp_path / "b", [Clip(key="a.b", video=good.video, audio=good.audio, text=good.text)], 1)
    with pytest.raises(ValueError, match="written twice"):
        write_shards(tmp_path / "c", [good, good], 10)
    huge = Clip(key="huge", video=good.video * 1e6, audio=good.audio, text=good.text)
    with pytest.raises(ValueError, match="float16 range"):
        write_shards(tmp_path / "d", [huge], 10)
    write_shards(tmp_path / "e", [huge], 10, video_dtype=np.float32)  # fine when stored float32
    with pytest.raises(SampleError, match="text.npy"):
        write_shards(tmp_path / "f", [good], 10, text_dim=D + 1)


def test_existing_shards_need_overwrite_which_removes_stale_ones(tmp_path):
    write_shards(tmp_path, clips(6), samples_per_shard=2)
    with pytest.raises(ValueError, match="already holds 3 shard"):
        write_shards(tmp_path, clips(2), samples_per_shard=2)
    write_shards(tmp_path, clips(2, seed=1), samples_per_shard=2, prefix="other")  # another prefix is fine
    paths = write_shards(tmp_path, clips(2, seed=2), samples_per_shard=2, overwrite=True)
    assert sorted(q.name for q in tmp_path.iterdir() if q.suffix == ".tar") == [
        "other-000000.tar",
        "shard-000000.tar",
    ]
    assert not (tmp_path / "shard-000001.tar.index.json").exists()  # the stale shard's index went with it
    assert [c.key for c in read_back(paths[0])] == [c.key for c in clips(2, seed=2)]


def test_dtypes_and_reproducible_bytes(tmp_path):
    src = clips(3)
    p16 = write_shards(tmp_path / "a", src, 10)[0]
    p16b = write_shards(tmp_path / "b", src, 10)[0]
    p32 = write_shards(tmp_path / "c", src, 10, video_dtype=np.float32)[0]
    assert open(p16, "rb").read() == open(p16b, "rb").read()  # same clips -> same bytes (fixed mtime)
    raw = next(iter(wds.tarfile_to_samples()(iter([{"url": p16}]))))
    assert (
        b"<f2" in raw["video.npy"][:64] and b"<f2" in raw["text.npy"][:64] and b"<f4" in raw["audio.npy"][:64]
    )
    for a, b16, b32 in zip(src, read_back(p16), read_back(p32), strict=True):
        torch.testing.assert_close(b32.video, a.video, rtol=0, atol=0)
        torch.testing.assert_close(b16.video, a.video, rtol=1e-3, atol=4e-3)
        torch.testing.assert_close(b16.text, a.text, rtol=1e-3, atol=4e-3)


def test_every_shard_gets_an_index_of_counts_and_checksums(tmp_path):
    from magi_train.data.index import index_path, read_index, sample_digest

    paths = write_shards(tmp_path, clips(3), samples_per_shard=2)
    index = json.loads(index_path(paths[0]).read_text())
    assert index["format"] == "magi_train.shard_index" and index["checksum"] == "blake2b-128"
    assert index["shard"] == "shard-000000.tar" and index["count"] == 2
    for raw in wds.tarfile_to_samples()(iter([{"url": paths[0]}])):  # the digests are over the tar's members
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        assert index["samples"][raw["__key__"]] == sample_digest(members)
    assert list(read_index(paths[1])) == [clips(3)[2].key]
    index_path(paths[1]).write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_index(paths[1])
    # a rewrite replaces the index with the new shard's (a stale index never describes a new tar)
    write_shards(tmp_path, clips(2, seed=5), samples_per_shard=2, overwrite=True)
    assert sorted(read_index(paths[0])) == sorted(c.key for c in clips(2, seed=5))
    assert not index_path(paths[1]).exists()

"""Shards: round trip, validation with skip-and-count, garbage shards, packing, worker split, resume, synthetic."""

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from magi_train.data.reader import ClipBatch, ShardDataset, make_loader, pack_by_tokens
from magi_train.data.schema import SampleError, validate_sample
from magi_train.data.synthetic import (
    concept_tables,
    synthetic_clips,
    write_corrupt_shard,
    write_synthetic_shards,
)
from magi_train.data.writer import clip_to_sample, write_shards

D = 32  # text feature width for tests (the real T5-Gemma width is 3584)
SIZES = [(3, 4, 6), (2, 6, 6), (4, 4, 4)]


@pytest.fixture
def shards(tmp_path):
    return write_synthetic_shards(tmp_path / "s", num_clips=40, samples_per_shard=10, seed=3, sizes=SIZES, text_dim=D)


def test_round_trip_and_packing(shards):
    clips = {c.key: c for c in synthetic_clips(40, 3, SIZES, 8, D)}
    ds = ShardDataset([str(p) for p in shards], text_dim=D, max_tokens=200)
    batches = list(ds)
    seen = [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(clips) and ds.stats["skipped"] == 0
    for b in batches:
        assert b.num_tokens <= 200 and len(b) >= 1
        for k, v, a, t in zip(b.keys, b.video, b.audio, b.text, strict=True):
            torch.testing.assert_close(v, clips[k].video)  # synthetic shards keep fp32 video
            torch.testing.assert_close(a, clips[k].audio)
            torch.testing.assert_close(t, clips[k].text, atol=2e-3, rtol=1e-3)  # text stored fp16
    assert {tuple(v.shape[1:]) for b in batches for v in b.video} == set(SIZES)  # mixed sizes packed


def test_oversized_clip_is_its_own_batch():
    clips = list(synthetic_clips(3, 0, [(4, 4, 4)], 8, D))  # 16 + 13 + 8 = 37 tokens each
    batches = list(pack_by_tokens(clips, max_tokens=20))
    assert [len(b) for b in batches] == [1, 1, 1]
    assert [len(b) for b in pack_by_tokens(clips, max_tokens=80)] == [2, 1]
    assert [len(b) for b in pack_by_tokens(clips, max_tokens=1000, max_clips=2)] == [2, 1]


def test_corrupt_samples_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "bad.tar"
    defects = write_corrupt_shard(path, D, good=3)
    ds = ShardDataset([str(path)], text_dim=D, max_tokens=10_000)
    keys = [k for b in ds for k in b.keys]
    assert keys == ["good-0", "good-1", "good-2"]
    assert ds.stats["seen"] == 3 + len(defects) and ds.stats["skipped"] == len(defects)
    assert sum(ds.skipped_by_reason.values()) == len(defects)
    assert ds.skipped_by_reason["video.npy"] == 3  # bad channels, NaN, truncated
    assert "pickle" in caplog.text and "bad-audio-len" in caplog.text


def test_garbage_shard_is_a_clear_error(tmp_path):
    good = write_synthetic_shards(tmp_path / "g", 5, 5, text_dim=D)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(20_000))
    with pytest.raises(ValueError, match="garbage.tar"):
        list(ShardDataset([str(good[0]), str(garbage)], text_dim=D, max_tokens=1000))
    allbad = tmp_path / "allbad.tar"
    write_corrupt_shard(allbad, D, good=0)
    with pytest.raises(ValueError, match="allbad.tar.*no valid sample"):
        list(ShardDataset([str(allbad)], text_dim=D, max_tokens=1000))


def test_validate_sample_messages_name_the_field():
    clip = next(synthetic_clips(1, 0, [(3, 4, 4)], 4, D))
    raw = clip_to_sample(clip)
    assert validate_sample(raw, D).video.shape == (48, 3, 4, 4)
    raw["audio.npy"] = clip_to_sample(next(synthetic_clips(1, 0, [(2, 4, 4)], 4, D)))["audio.npy"]
    with pytest.raises(SampleError, match=r"audio.npy: length 5 != 4\*\(T-1\)\+1 = 9"):
        validate_sample(raw, D)
    with pytest.raises(SampleError, match="text.npy"):
        validate_sample(clip_to_sample(clip), text_dim=64)


def test_workers_split_shards_each_clip_once(shards):
    ds = ShardDataset([str(p) for p in shards], text_dim=D, max_tokens=200)
    keys = [k for b in make_loader(ds, num_workers=2) for k in b.keys]
    assert len(keys) == 40 and len(set(keys)) == 40


def test_resume_continues_at_the_same_batch(shards):
    urls = [str(p) for p in shards]

    def make():
        return ShardDataset(urls, text_dim=D, max_tokens=150, shuffle_buffer=8, seed=5, infinite=True)

    it = iter(make())
    first = [next(it).keys for _ in range(7)]
    ds = make()
    it = iter(ds)
    for _ in range(4):
        next(it)
    state = ds.state_dict()
    assert state == {"consumed": 4}
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it).keys for _ in range(3)] == first[4:]
    # infinite mode: the next epoch holds the same clips in another shard order
    n_epoch = len(list(ShardDataset(urls, text_dim=D, max_tokens=150)))
    it = iter(make())
    ep1 = [next(it).keys for _ in range(n_epoch)]
    ep2 = [next(it).keys for _ in range(n_epoch)]
    assert len({k for b in ep1 + ep2 for k in b}) == 40
    assert ep1 != ep2


def test_batch_moves_to_device():
    clips = list(synthetic_clips(2, 0, [(2, 4, 4)], 4, D))
    batch = ClipBatch.from_clips(clips)
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, ClipBatch) and moved.keys == batch.keys and len(moved.video) == 2


def test_synthetic_data_is_learnable():
    tables = concept_tables(D)
    clips = list(synthetic_clips(200, 1, [(3, 4, 4)], 4, D))
    concepts = np.array([c.meta["concept"] for c in clips])
    # text identifies the concept: nearest concept embedding is always right
    text = np.stack([c.text.mean(0).numpy() for c in clips])
    pred = np.argmax(text @ tables["text"].T, axis=1)
    assert (pred == concepts).mean() == 1.0
    # video of one concept is far more alike (after removing the random phase via the power spectrum)
    spec = np.stack([np.abs(np.fft.fftn(c.video.numpy(), axes=(1, 2, 3))).ravel() for c in clips])
    spec /= np.linalg.norm(spec, axis=1, keepdims=True)
    sim = spec @ spec.T
    same = sim[concepts[:, None] == concepts[None, :]].mean()
    diff = sim[concepts[:, None] != concepts[None, :]].mean()
    assert same > diff + 0.3
    # audio and video share the phase: the audio at latent frame t predicts the video's phase
    c0 = [c for c in clips if c.meta["concept"] == 0][:20]
    # both are linear in (sin, cos) of the same phase: a linear map from audio predicts video
    a_all = np.concatenate([c.audio.numpy()[::4] for c in c0])
    v_all = np.concatenate([c.video.numpy()[:, :, 0, 0].T for c in c0])
    coef, *_ = np.linalg.lstsq(a_all, v_all, rcond=None)
    r2 = 1 - ((a_all @ coef - v_all) ** 2).sum() / ((v_all - v_all.mean(0)) ** 2).sum()
    assert r2 > 0.8


def test_write_shards_is_atomic(tmp_path):
    def clips():
        yield from synthetic_clips(3, 0, [(2, 4, 4)], 4, D)
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError):
        write_shards(tmp_path, clips(), samples_per_shard=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-000000.tar"]  # the finished shard only; no partial file left

"""Shard reader: round trip, packing, skip-and-count, garbage shards, no pickle, node/worker split, resume."""

import io
import logging
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.fabric.utilities.apply_func import move_data_to_device

from magi_train.data import reader
from magi_train.data.reader import ClipBatch, ShardDataset, make_loader, pack_by_tokens
from magi_train.data.synthetic import synthetic_clip, synthetic_clips, write_corrupt_shard
from magi_train.data.writer import clip_to_sample

D = 32
SIZES = [(3, 4, 6), (2, 6, 6), (4, 4, 4)]  # as in conftest.py


def source_clips():
    """The clips the `shards` fixture wrote, by key."""
    return {c.key: c for c in synthetic_clips(40, 3, SIZES, (4, 8), D)}


def all_keys(batches):
    return [k for b in batches for k in b.keys]


# -- round trip and packing ---------------------------------------------------------------------------------------


def test_round_trip_keeps_keys_and_values(shards):
    src = source_clips()
    ds = ShardDataset(shards, text_dim=D, max_tokens=10_000)
    batches = list(ds)
    assert sorted(all_keys(batches)) == sorted(src)
    assert ds.stats == {
        "seen": 40, "valid": 40, "skipped": 0, "lost": 0, "tar_errors": 0, "unverified_shards": 0,
        "skipped_by_reason": {},
    }  # fmt: skip
    for b in batches:
        for i, key in enumerate(b.keys):
            c = src[key]
            torch.testing.assert_close(b.video[i], c.video, rtol=1e-3, atol=4e-3)  # video stored float16
            torch.testing.assert_close(b.audio[i], c.audio, rtol=0, atol=0)  # audio stored float32
            torch.testing.assert_close(b.text[i], c.text, rtol=1e-3, atol=4e-3)  # text stored float16
            assert b.captions[i] == c.caption and b.meta[i] == c.meta and b.image[i] is None
    # a directory and a brace pattern name the same shards
    folder = shards[0].rsplit("/", 1)[0]
    assert ShardDataset(folder, D, 100).urls == shards
    assert ShardDataset(f"{folder}/synthetic-{{000000..000003}}.tar", D, 100).urls == shards
    with pytest.raises(ValueError, match="do not exist"):
        ShardDataset(f"{folder}/nope-{{0..1}}.tar", D, 100)
    with pytest.raises(ValueError, match=r"^data.train_shards=.*/gone: no such file or directory"):
        ShardDataset(f"{folder}/gone", D, 100, name="data.train_shards")


def test_mixed_sizes_pack_greedily_under_the_budget(shards):
    batches = list(ShardDataset(shards, text_dim=D, max_tokens=120))
    tokens = {k: c.num_tokens for k, c in source_clips().items()}
    assert len(all_keys(batches)) == 40
    assert {tuple(v.shape[1:]) for b in batches for v in b.video} == set(SIZES)
    assert max(len(b) for b in batches) >= 2
    for b, nxt in zip(batches, batches[1:], strict=False):
        assert b.num_tokens == sum(tokens[k] for k in b.keys) <= 120
        assert b.num_tokens + tokens[nxt.keys[0]] > 120  # greedy: the next clip did not fit
    capped = list(ShardDataset(shards, text_dim=D, max_tokens=10_000, max_clips=3))
    assert [len(b) for b in capped] == [3] * 13 + [1]


def test_oversized_clip_is_its_own_batch(caplog):
    rng = np.random.default_rng(0)
    small = [synthetic_clip(rng, f"s{i}", 2, 2, 2, 1, D) for i in range(4)]  # 2 + 5 + 1 = 8 tokens
    big = [synthetic_clip(rng, f"b{i}", 4, 4, 4, 8, D) for i in range(2)]  # 16 + 13 + 8 = 37 tokens
    order = [small[0], big[0], small[1], small[2], big[1], small[3]]
    with caplog.at_level(logging.WARNING, logger="magi_train.data.reader"):
        batches = list(pack_by_tokens(order, max_tokens=20))
    assert [b.keys for b in batches] == [["s0"], ["b0"], ["s1", "s2"], ["b1"], ["s3"]]
    assert caplog.text.count("max_tokens=20") == 1  # warned once, never dropped
    with pytest.raises(ValueError, match="max_tokens"):
        next(pack_by_tokens(order, max_tokens=0))


# -- bad data -----------------------------------------------------------------------------------------------------


def test_corrupt_samples_are_skipped_and_counted_by_reason(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(reader, "LOG_FIRST", 2)
    monkeypatch.setattr(reader, "LOG_EVERY", 3)
    path = tmp_path / "bad.tar"
    expected = write_corrupt_shard(path, D, good=3)
    ds = ShardDataset([str(path)], text_dim=D, max_tokens=10_000)
    with caplog.at_level(logging.WARNING, logger="magi_train.data.reader"):
        keys = all_keys(ds) + all_keys(ds) + all_keys(ds)  # three passes: each reason three times
    assert keys == ["good-0", "good-1", "good-2"] * 3
    n_bad = len(expected)
    assert ds.stats["seen"] == 3 * (3 + n_bad) and ds.stats["valid"] == 9 and ds.stats["skipped"] == 3 * n_bad
    assert ds.stats["skipped_by_reason"] == {r: 3 * n for r, n in Counter(expected.values()).items()}
    assert ds.stats["unverified_shards"] == 1  # written without an index: noted once, not once per pass
    # rate-limited per reason: the first 2 of each in full (naming key and shard), then one line every 3
    records = [r.getMessage() for r in caplog.records if r.name == "magi_train.data.reader"]
    assert "bad-channels" in records[1] and "bad.tar" in records[1] and "video.npy: shape" in records[1]
    for reason in set(expected.values()):
        full = [m for m in records if m.startswith(f"skipped sample ({reason}) in")]
        assert len(full) == 2, reason
        assert sum("problems so far" in m and repr(reason) in m for m in records) == 1, reason
    assert sum("cannot be verified" in m for m in records) == 1
    assert sum("after epoch" in m for m in records) == 3  # one summary line per pass


def test_only_a_dataset_without_any_valid_sample_stops(tmp_path, shards, caplog):
    allbad = tmp_path / "allbad.tar"
    write_corrupt_shard(allbad, D, good=0)
    ds = ShardDataset([shards[0], str(allbad)], text_dim=D, max_tokens=1000)
    assert len(all_keys(ds)) == 10  # a shard of garbage beside a good one: counted, not fatal
    assert ds.stats["skipped"] == 15 and ds.stats["valid"] == 10
    with pytest.raises(ValueError, match=r"no valid sample in any of the 1 shard.*allbad.tar: video.npy: "):
        list(ShardDataset([str(allbad)], text_dim=D, max_tokens=1000))
    # bytes that are not a tar: warned and skipped while other shards are fine ...
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(20_000))
    ds = ShardDataset([str(garbage), shards[0]], text_dim=D, max_tokens=1000)
    with caplog.at_level(logging.WARNING, logger="magi_train.data.reader"):
        assert len(all_keys(ds)) == 10
    assert ds.stats["tar_errors"] >= 1 and "garbage.tar" in caplog.text
    # ... but a dataset with nothing valid at all stops with the shards and reasons named
    with pytest.raises(ValueError, match=r"no valid sample in any of the 1 shard.*garbage.tar: \w+"):
        list(ShardDataset([str(garbage)], text_dim=D, max_tokens=1000))


UNPICKLED: list = []


def _record_unpickle(tag):
    UNPICKLED.append(tag)
    return tag


class _Trap:
    def __reduce__(self):
        return (_record_unpickle, ("trap",))


def test_pickled_npy_is_refused_never_unpickled(tmp_path):
    obj = io.BytesIO()
    np.save(obj, np.array([_Trap()], dtype=object), allow_pickle=True)
    assert np.load(io.BytesIO(obj.getvalue()), allow_pickle=True)[0] == "trap"  # the trap works ...
    UNPICKLED.clear()
    rng = np.random.default_rng(0)
    good = clip_to_sample(synthetic_clip(rng, "good", 2, 4, 4, 3, D))
    s1 = dict(clip_to_sample(synthetic_clip(rng, "obj", 2, 4, 4, 3, D)), **{"video.npy": obj.getvalue()})
    s2 = dict(
        clip_to_sample(synthetic_clip(rng, "raw", 2, 4, 4, 3, D)), **{"audio.npy": pickle.dumps(_Trap())}
    )
    path = tmp_path / "trap.tar"
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in (good, s1, s2):
            sink.write(s)
    ds = ShardDataset([str(path)], text_dim=D, max_tokens=1000)
    assert all_keys(ds) == ["good"]
    assert UNPICKLED == []  # ... and reading never fired it
    assert ds.stats["skipped_by_reason"] == {"video.npy: needs pickle": 1, "audio.npy: needs pickle": 1}


# -- splitting ----------------------------------------------------------------------------------------------------


def test_two_workers_see_every_clip_once_per_epoch(shards):
    loader = make_loader(ShardDataset(shards, text_dim=D, max_tokens=150), num_workers=2)
    assert loader.batch_size is None and loader.persistent_workers
    for _ in range(2):  # two epochs through the same persistent workers
        keys = all_keys(loader)
        assert len(keys) == 40 and set(keys) == set(source_clips())


@pytest.mark.parametrize(
    "world,workers,n_shards", [(2, 2, 4), (2, 2, 3), (2, 2, 1), (1, 3, 2), (3, 1, 2), (4, 1, 4)]
)
def test_node_and_worker_split_is_a_partition(shards, monkeypatch, caplog, world, workers, n_shards):
    urls = shards[:n_shards]
    expected = sorted(
        k for k in source_clips() if int(k[-6:]) < 10 * n_shards
    )  # 10 clips per shard, in order
    seen, epoch1 = [], []
    with caplog.at_level(logging.WARNING, logger="magi_train.data.reader"):
        for rank in range(world):
            for worker in range(workers):
                for name, value in [
                    ("RANK", rank),
                    ("WORLD_SIZE", world),
                    ("WORKER", worker),
                    ("NUM_WORKERS", workers),
                ]:
                    monkeypatch.setenv(name, str(value))
                seen += all_keys(ShardDataset(urls, text_dim=D, max_tokens=150))
                infinite = ShardDataset(urls, text_dim=D, max_tokens=150, infinite=True, seed=7)
                epoch1 += [c.key for c in infinite._epoch_clips(1, infinite._reader())]  # reshuffled shards
    assert sorted(seen) == expected and sorted(epoch1) == expected
    assert ("too few shards" in caplog.text) == (n_shards < world or n_shards // world < workers)


# -- resume -------------------------------------------------------------------------------------------------------


def _make(urls):
    return ShardDataset(urls, text_dim=D, max_tokens=150, shuffle_buffer=8, seed=5, infinite=True)


def test_resume_in_process_continues_with_the_same_batch(shards):
    epoch_len = len(list(ShardDataset(shards, text_dim=D, max_tokens=150)))
    it = iter(_make(shards))
    reference = [next(it) for _ in range(2 * epoch_len + 3)]
    ep0, ep1 = (sorted(all_keys(reference[i * epoch_len : (i + 1) * epoch_len])) for i in range(2))
    assert ep0 == ep1 == sorted(source_clips())  # each infinite epoch holds every clip once ...
    assert all_keys(reference[:epoch_len]) != all_keys(reference[epoch_len : 2 * epoch_len])  # ... reshuffled
    for k in (3, epoch_len, epoch_len + 4):
        ds = _make(shards)
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = ds.state_dict()
        assert state["consumed"] == k and state["epoch"] == (k - 1) // epoch_len
        for st in (state, {"consumed": k}):  # with the epoch position, or the count alone (ClipDataModule)
            resumed = _make(shards)
            resumed.load_state_dict(st)
            assert resumed.state_dict() == st
            it2 = iter(resumed)
            nxt = [next(it2) for _ in range(3)]
            assert [b.keys for b in nxt] == [b.keys for b in reference[k : k + 3]]
            torch.testing.assert_close(nxt[0].video, reference[k].video, rtol=0, atol=0)
            if st.get("epoch", 0) >= 1:  # jumped straight to its epoch: epoch 0 was not re-read
                assert resumed.stats["seen"] <= 40


def test_resume_with_two_workers_loses_and_repeats_nothing(shards):
    ds = _make(shards)
    it = iter(make_loader(ds, num_workers=2))
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    assert state == {"consumed": 5}  # counted in the main process by the loader
    following = [tuple(next(it).keys) for _ in range(2)]
    del it
    resumed = _make(shards)
    resumed.load_state_dict(state)
    it = iter(make_loader(resumed, num_workers=2))
    # the round-robin restarts at worker 0: the same two batches, possibly in the other order
    assert sorted(tuple(next(it).keys) for _ in range(2)) == sorted(following)


# -- the batch ----------------------------------------------------------------------------------------------------


def test_clip_batch_moves_to_a_device():
    clips = list(synthetic_clips(3, 0, [(2, 4, 4)], 4, D, with_image=True))
    batch = ClipBatch.from_clips(clips)
    assert len(batch) == 3 and batch.num_tokens == sum(c.num_tokens for c in clips) == 3 * (8 + 5 + 4)
    moved = move_data_to_device(batch, torch.device("meta"))  # meta: proves every tensor really moved
    assert isinstance(moved, ClipBatch) and moved.keys == batch.keys and moved.captions == batch.captions
    assert all(t.is_meta for t in moved.video + moved.audio + moved.text + moved.image)
    assert moved.lowres == [None, None, None] and not batch.video[0].is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_clip_batch_pins_memory():
    batch = ClipBatch.from_clips(list(synthetic_clips(2, 0, [(2, 4, 4)], 4, D)))
    pinned = batch.pin_memory()
    assert all(t.is_pinned() for t in pinned.video + pinned.audio + pinned.text)

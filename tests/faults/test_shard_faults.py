"""Planted shard faults (issue 13): every damaged sample is counted as skipped or lost, by reason, and none is
trained on; only a training set without a single valid sample stops, with one error naming data.train_shards."""

import csv
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch

from magi_train.data.index import index_path
from magi_train.data.reader import ShardDataset, make_loader
from magi_train.data.synthetic import synthetic_clips, write_corrupt_shard, write_synthetic_shards

D = 32
N, PER, SEED, SIZE = 18, 6, 1, (2, 4, 4)  # 3 shards of 6 clips, 5 members each


@pytest.fixture
def shard_set(tmp_path) -> list[str]:
    return write_synthetic_shards(
        tmp_path / "shards", N, PER, seed=SEED, sizes=[SIZE], text_dim=D, text_len=4
    )


def source():
    return {c.key: c for c in synthetic_clips(N, SEED, [SIZE], 4, D)}


def read(urls, workers=0, infinite=False):
    """All batches of one pass (with workers: through the DataLoader), and the dataset of the main process."""
    ds = ShardDataset(urls, text_dim=D, max_tokens=10_000, infinite=infinite, name="data.train_shards")
    return ds, list(make_loader(ds, num_workers=workers, pin_memory=False))


def assert_exact(batches):
    """Every clip handed out holds exactly the bytes the writer stored (float16 video and text)."""
    src = source()
    for b in batches:
        for i, key in enumerate(b.keys):
            torch.testing.assert_close(b.video[i], src[key].video.half().float(), rtol=0, atol=0)
            torch.testing.assert_close(b.text[i], src[key].text.half().float(), rtol=0, atol=0)
            torch.testing.assert_close(b.audio[i], src[key].audio, rtol=0, atol=0)


def keys(batches):
    return [k for b in batches for k in b.keys]


def members(path):
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def flip(path, offset, n=1):
    data = bytearray(open(path, "rb").read())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


# -- one fault at a time -------------------------------------------------------------------------------------


def test_flipped_payload_bytes_are_checksum_skips_never_trained_on(shard_set):
    hit = ["syn0001-000002", "syn0001-000007", "syn0001-000016"]  # one sample in each shard
    for key in hit:
        shard = shard_set[int(key[-6:]) // PER]
        m = members(shard)[f"{key}.video.npy"]
        flip(shard, m.offset_data + m.size // 2, 40)  # inside the float data: still a well-formed .npy
    ds, batches = read(shard_set)
    assert sorted(keys(batches)) == sorted(set(source()) - set(hit))
    assert_exact(batches)
    assert ds.stats["skipped_by_reason"] == {"checksum": 3} and ds.stats["lost"] == 0
    assert ds.stats["tar_errors"] == 0 and ds.stats["unverified_shards"] == 0


def test_truncated_tar_counts_what_it_lost(shard_set, caplog):
    shard = shard_set[1]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="magi_train.data.reader"):
        ds, batches = read(shard_set)
    assert_exact(batches)
    got = [k for k in keys(batches) if PER <= int(k[-6:]) < 2 * PER]
    s = ds.stats
    assert 0 < len(got) < PER and s["lost"] >= 1 and s["tar_errors"] == 1
    assert len(got) + s["skipped"] + s["lost"] == PER  # every sample of the cut shard: read, skipped or lost
    assert s["valid"] == N - PER + len(got) and set(s["skipped_by_reason"]) <= {"checksum"}
    assert "were never read" in caplog.text and "synthetic-000001.tar" in caplog.text


def test_corrupt_tar_header_loses_the_rest_of_the_shard_counted(shard_set):
    shard = shard_set[0]
    m = members(shard)["syn0001-000002.audio.npy"]  # the first member of the third sample
    flip(shard, m.offset + 10)  # a byte of its name: the header checksum fails and tarfile stops silently
    ds, batches = read(shard_set)
    assert_exact(batches)
    assert sorted(keys(batches)) == sorted(k for k in source() if int(k[-6:]) not in range(2, PER))
    assert ds.stats["lost"] == PER - 2 and ds.stats["skipped"] == 0
    assert ds.stats["tar_errors"] == 1 and ds.stats["valid"] == N - 4


def test_forty_random_flipped_bytes_never_reach_training(shard_set):
    """The issue's case: 40 bytes flipped anywhere in a shard (headers, payloads, padding)."""
    shard = shard_set[2]
    size = len(open(shard, "rb").read())
    rng = np.random.default_rng(7)
    for offset in rng.choice(size, 40, replace=False):
        flip(shard, int(offset))
    ds, batches = read(shard_set)
    assert_exact(batches)  # whatever was read is intact ...
    got = [k for k in keys(batches) if int(k[-6:]) >= 2 * PER]
    s = ds.stats
    assert len(got) < PER and s["skipped"] + s["lost"] >= PER - len(got)  # ... and the rest is counted
    assert s["valid"] == N - PER + len(got)


def test_stray_files_are_skipped_and_counted_never_fatal(shard_set, tmp_path):
    with tarfile.open(shard_set[0], "a") as tar:  # appended to an indexed shard: its samples stay verified
        for name in ("README", "README.md", ".DS_Store"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
    lonely = tmp_path / "readme-only.tar"  # the tar that used to stop a whole run at step 0
    with tarfile.open(lonely, "w") as tar:
        info = tarfile.TarInfo("README.md")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    ds, batches = read([*shard_set, str(lonely)])
    assert sorted(keys(batches)) == sorted(source())
    assert_exact(batches)
    assert ds.stats["skipped_by_reason"] == {"stray file": 4} and ds.stats["unverified_shards"] == 1
    assert ds.stats["lost"] == 0 and ds.stats["tar_errors"] == 0


def test_shard_without_index_reads_with_one_note(shard_set, caplog):
    index_path(shard_set[1]).unlink()
    ds = ShardDataset(shard_set, text_dim=D, max_tokens=10_000)
    with caplog.at_level(logging.WARNING, logger="magi_train.data.reader"):
        assert sorted(keys(ds)) == sorted(source())
        assert sorted(keys(ds)) == sorted(source())  # a second pass: no second note
    notes = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(notes) == 1 and "synthetic-000001.tar" in notes[0] and "no index" in notes[0]
    assert ds.stats["unverified_shards"] == 1 and ds.stats["skipped"] == 0


# -- the one fault that stops, and the counts of workers -----------------------------------------------------


@pytest.fixture
def garbage_set(tmp_path) -> list[str]:
    noise = tmp_path / "noise.tar"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    bad = tmp_path / "bad.tar"
    write_corrupt_shard(bad, D, good=0)
    readme = tmp_path / "readme.tar"
    with tarfile.open(readme, "w") as tar:
        info = tarfile.TarInfo("README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return [str(noise), str(bad), str(readme)]


@pytest.mark.parametrize("workers", [0, 2])
def test_all_garbage_training_set_stops_with_one_clear_error(garbage_set, workers):
    with pytest.raises(ValueError) as err:
        read(garbage_set, workers=workers, infinite=True)
    message = str(err.value)
    assert message.startswith("data.train_shards: no valid sample in any of the 3 shard(s)")
    assert "16 skipped" in message and "1 tar errors" in message and "Fix or regenerate" in message


def test_worker_counts_reach_the_main_process(shard_set, garbage_set):
    m = members(shard_set[0])["syn0001-000001.video.npy"]
    flip(shard_set[0], m.offset_data + 100, 8)
    index_path(shard_set[2]).unlink()
    urls = [*shard_set, garbage_set[1]]  # 4 shards: each of 2 workers reads 2, one of them garbage only
    in_process, batches0 = read(urls, workers=0)
    ds, batches2 = read(urls, workers=2)
    assert sorted(keys(batches2)) == sorted(keys(batches0)) and len(keys(batches0)) == N - 1
    assert all(len(b) for b in batches2)  # the counts-only batches stayed in the loader
    report = ds.report()
    assert report["readers"] == 2
    for name, n in in_process.stats.items():
        assert report[name] == n, name
    assert report["skipped_by_reason"]["checksum"] == 1 and report["unverified_shards"] == 2


# -- what a run shows ----------------------------------------------------------------------------------------


def test_smoke_run_reports_the_planted_faults(tmp_path, one_thread):
    from magi_train.__main__ import compose, run

    data = tmp_path / "shards"
    cfg = compose([
        "recipe=pretrain_base", "experiment=smoke", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=4",
        "trainer.val_check_interval=null", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "data.synthetic.enabled=false", f"data.train_shards={data}", "data.val_shards=null",
        "data.num_workers=2",  # the default: counts come from worker processes (the smoke config reads in-process)
    ])  # fmt: skip
    text_dim = cfg.data.text_dim
    paths = write_synthetic_shards(data, 12, 6, seed=0, sizes=[SIZE], text_dim=text_dim, text_len=4)
    m = members(paths[0])["syn0000-000003.text.npy"]
    flip(paths[0], m.offset_data + 200, 4)
    write_corrupt_shard(data / "corrupt.tar", text_dim, good=1)  # no index: unverified, 15 reasons
    run(cfg)

    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["status"] == "finished" and report["shards"] == "data.train_shards"
    assert (
        report["skipped_by_reason"]["checksum"] >= 1 and report["skipped_by_reason"]["video.npy: shape"] >= 1
    )
    assert report["unverified_shards"] == 1 and report["valid"] >= 4 and report["readers"] == 2
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"data/skipped", "data/lost", "data/unverified_shards", "data/skipped_checksum"} <= columns
    assert "data/skipped_video_npy_shape" in columns
    assert max(float(r["data/skipped_checksum"] or 0) for r in rows) >= 1


def test_run_on_a_garbage_training_set_stops_naming_the_key(tmp_path, garbage_set, one_thread):
    from magi_train.__main__ import compose, run

    data = tmp_path / "garbage"
    data.mkdir()
    for url in garbage_set:
        (data / url.rsplit("/", 1)[1]).write_bytes(open(url, "rb").read())
    cfg = compose([
        "recipe=pretrain_base", "experiment=smoke", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2",
        "trainer.enable_progress_bar=false", "data.synthetic.enabled=false", f"data.train_shards={data}",
        "data.val_shards=null",
    ])  # fmt: skip
    with pytest.raises(ValueError, match=r"^data.train_shards: no valid sample in any of the 3 shard\(s\)"):
        run(cfg)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["status"].startswith("stopped: ValueError: data.train_shards: no valid sample")
    assert report["valid"] == 0 and report["skipped"] >= 16 and report["tar_errors"] == 1


def test_a_resumed_run_continues_the_counts_of_its_checkpoint(shard_set, tmp_path):
    from types import SimpleNamespace

    from magi_train.training.data_report import CHECKPOINT_KEY, DataReport, data_metrics

    m = members(shard_set[0])["syn0001-000004.video.npy"]
    flip(shard_set[0], m.offset_data + 100, 8)
    ds = ShardDataset(shard_set, text_dim=D, max_tokens=10_000, name="data.train_shards")
    loader = make_loader(ds, pin_memory=False)
    list(loader)
    trainer = SimpleNamespace(train_dataloader=loader, world_size=1, is_global_zero=True, global_step=7)
    first = DataReport(tmp_path)
    checkpoint = {}
    first.on_save_checkpoint(trainer, None, checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["skipped_by_reason"] == {"checksum": 1}
    resumed = DataReport(tmp_path)
    resumed.on_load_checkpoint(trainer, None, checkpoint)  # and the same reads once more after the resume
    totals = resumed._collect(trainer)
    assert (
        totals["seen"] == 2 * N and totals["skipped_by_reason"] == {"checksum": 2} and totals["readers"] == 1
    )
    assert data_metrics(totals)["data/skipped_checksum"] == 2.0
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["status"] == "running" and report["step"] == 7 and report["valid"] == N - 1

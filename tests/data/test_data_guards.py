"""User data is never touched by surprise: synthetic shards go only into the run directory, and a shard setting
that names an empty or missing directory is an error naming the key."""

import json

import pytest
from omegaconf import OmegaConf

from magi_train.config import DataConfig, SyntheticDataConfig
from magi_train.data.datamodule import ClipDataModule, ensure_synthetic
from magi_train.data.index import read_index

D = 32


def synthetic_cfg(train, val=None, num_clips=8):
    syn = SyntheticDataConfig(enabled=True, num_clips=num_clips, samples_per_shard=4, sizes=[[2, 4, 4]])
    return OmegaConf.structured(
        DataConfig(train_shards=str(train), val_shards=val and str(val), text_dim=D, synthetic=syn)
    )


def test_synthetic_shards_are_written_inside_the_run_dir_and_reused(tmp_path):
    run_dir = tmp_path / "run"
    train, val = run_dir / "data" / "train", run_dir / "data" / "val"
    ensure_synthetic(synthetic_cfg(train, val), run_dir)
    names = sorted(p.name for p in train.iterdir())
    assert names == [
        "synthetic-000000.tar", "synthetic-000000.tar.index.json",
        "synthetic-000001.tar", "synthetic-000001.tar.index.json", "synthetic.json",
    ]  # fmt: skip
    assert len(read_index(train / "synthetic-000000.tar")) == 4 and (val / "synthetic.json").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in train.iterdir()}
    ensure_synthetic(synthetic_cfg(train, val), run_dir)  # a re-run or resume: reused as they are
    assert {p.name: p.stat().st_mtime_ns for p in train.iterdir()} == before
    ensure_synthetic(
        synthetic_cfg(train, val, num_clips=4), run_dir
    )  # other settings: our own set, rewritten
    assert sorted(p.name for p in train.iterdir() if p.suffix == ".tar") == ["synthetic-000000.tar"]
    assert json.loads((train / "synthetic.json").read_text())["settings"]["num_clips"] == 4
    (train / "synthetic.json").unlink()  # a set without its marker (a crash mid-write): rewritten
    ensure_synthetic(synthetic_cfg(train, val, num_clips=4), run_dir)
    assert (train / "synthetic.json").is_file()


def test_synthetic_refuses_a_directory_outside_the_run_dir_or_with_other_files(tmp_path):
    run_dir = tmp_path / "run"
    users = tmp_path / "my_data"  # the case: a user's empty directory
    users.mkdir()
    with pytest.raises(
        ValueError, match=r"data.train_shards=.*my_data: .*only into a directory inside the run "
    ):
        ensure_synthetic(synthetic_cfg(users), run_dir)
    assert not any(users.iterdir()) and not run_dir.exists()
    with pytest.raises(ValueError, match=r"data.val_shards=.*elsewhere.*data.synthetic.enabled=false"):
        ensure_synthetic(synthetic_cfg(run_dir / "data" / "train", tmp_path / "elsewhere"), run_dir)
    with pytest.raises(ValueError, match="inside the run"):
        ensure_synthetic(
            synthetic_cfg(run_dir), run_dir
        )  # the run directory itself holds config, checkpoints
    inside = run_dir / "data" / "train"
    inside.mkdir(parents=True)
    (inside / "clip-000.tar").write_bytes(b"someone's shard")
    with pytest.raises(
        ValueError, match=r"data.train_shards=.* holds files that are not synthetic shards \(clip-000"
    ):
        ensure_synthetic(synthetic_cfg(inside), run_dir)
    assert [p.name for p in inside.iterdir()] == ["clip-000.tar"]


def test_real_shards_setting_naming_an_empty_or_missing_directory_is_an_error(tmp_path, shards):
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, problem in [
        (empty, "the directory holds no .tar shards"),
        (tmp_path / "gone", "no such file or directory"),
    ]:
        cfg = OmegaConf.structured(DataConfig(train_shards=str(path), text_dim=D))
        with pytest.raises(ValueError, match=rf"^data.train_shards={path}: {problem} \(.*prepare"):
            ClipDataModule(cfg)
    cfg = OmegaConf.structured(DataConfig(train_shards=str(shards[0]), val_shards=str(empty), text_dim=D))
    with pytest.raises(ValueError, match=r"^data.val_shards=.*empty: the directory holds no"):
        ClipDataModule(cfg)


def test_smoke_run_refuses_a_users_directory(tmp_path, compose):
    from magi_train.__main__ import run

    users = tmp_path / "my_data"
    users.mkdir()
    cfg = compose([
        "recipe=pretrain_base", "experiment=smoke", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1",
        "trainer.enable_progress_bar=false", f"data.train_shards={users}", "data.synthetic.num_clips=8",
    ])  # fmt: skip
    with pytest.raises(ValueError, match="data.train_shards=.*my_data: data.synthetic.enabled=true"):
        run(cfg)
    assert not any(users.iterdir())

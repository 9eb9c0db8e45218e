"""Released-format checkpoints (GAIR-NLP/daVinci-MagiHuman @ 209209b): load, export, round trips and errors."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from magi_train.models.checkpoint import INDEX_NAME, export_released, load_released, released_key_shapes
from magi_train.models.dit import MODEL_CONFIGS, DiT, DiTConfig

# From the spec (§2.10, §3), written independently of checkpoint.py: the base release stores exactly
# the block linears in bf16.
BLOCK_LINEAR = re.compile(
    r"block\.layers\.\d+\.(attention\.(linear_qkv|linear_proj)|mlp\.(up_gate_proj|down_proj))\.weight"
)


def _tiny_cfg(**changes) -> DiTConfig:
    cfg = copy.deepcopy(MODEL_CONFIGS["tiny"])
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _tiny_model(seed: int = 0, **changes) -> DiT:
    torch.manual_seed(seed)
    return DiT(_tiny_cfg(**changes))


def _released_tensors(cfg: DiTConfig, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors for every released key of cfg, in the base release's dtypes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in released_key_shapes(cfg).items():
        dtype = torch.bfloat16 if BLOCK_LINEAR.fullmatch(key) else torch.float32
        out[key] = torch.randn(shape, generator=g).to(dtype)
    return out


def _write_released(directory: Path, tensors: dict[str, Tensor], num_shards: int) -> Path:
    """A released-format directory: one model.safetensors, or an HF index + num_shards shards."""
    directory.mkdir(parents=True, exist_ok=True)
    if num_shards == 1:
        safetensors.torch.save_file(tensors, str(directory / "model.safetensors"))
        return directory
    keys = list(tensors)
    per = -(-len(keys) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = keys[i * per : (i + 1) * per]
        safetensors.torch.save_file({k: tensors[k] for k in chunk}, str(directory / name))
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index))
    return directory


def _read_dir(directory: Path) -> dict[str, Tensor]:
    """All tensors of a released-format directory, independently of checkpoint.py."""
    index = directory / INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for k in f.keys():
                assert k not in out
                out[k] = f.get_tensor(k)
    return out


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _snapshot(model: DiT) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: DiT, snapshot: dict[str, Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"{k} was modified by a failed load"


@pytest.fixture(params=[1, 3], ids=["single", "sharded"])
def released_dir(request, tmp_path) -> tuple[Path, dict[str, Tensor]]:
    tensors = _released_tensors(_tiny_cfg())
    return _write_released(tmp_path / "base", tensors, request.param), tensors


# ---------------------------------------------------------------------------------------------------------
# Key table
# ---------------------------------------------------------------------------------------------------------


def test_released_key_table_of_tiny_matches_model():
    cfg = _tiny_cfg()
    shapes = released_key_shapes(cfg)
    assert len(shapes) == 8 * cfg.num_layers + 7 + 4
    model = DiT(_tiny_cfg())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(1 for k in shapes if BLOCK_LINEAR.fullmatch(k)) == 4 * cfg.num_layers


# ---------------------------------------------------------------------------------------------------------
# Loading and exporting
# ---------------------------------------------------------------------------------------------------------


def test_load_copies_every_tensor_exactly(released_dir):
    directory, tensors = released_dir
    model = _tiny_model()
    load_released(model, directory)
    state = model.state_dict()
    assert set(state) == set(tensors)
    for k, t in tensors.items():
        assert state[k].dtype == torch.float32, k  # fp32 master weights whatever the file dtype
        assert torch.equal(state[k], t.float()), k


def test_load_accepts_file_paths(tmp_path):
    tensors = _released_tensors(_tiny_cfg())
    single = _write_released(tmp_path / "single", tensors, 1)
    sharded = _write_released(tmp_path / "sharded", tensors, 3)
    for path in (single / "model.safetensors", sharded / INDEX_NAME):
        model = _tiny_model(seed=1)
        load_released(model, str(path))
        assert torch.equal(model.final_linear_audio.weight, tensors["final_linear_audio.weight"])


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 100_000], ids=["one-file", "sharded"])
def test_export_base_is_bit_identical_to_the_loaded_files(released_dir, tmp_path, max_shard_bytes):
    directory, tensors = released_dir
    model = _tiny_model()
    load_released(model, directory)
    out = export_released(model, tmp_path / "export", dtype_policy="base", max_shard_bytes=max_shard_bytes)
    assert out == tmp_path / "export"
    exported = _read_dir(out)
    assert set(exported) == set(tensors)
    for k, t in tensors.items():
        assert _same_bytes(exported[k], t), k
    if max_shard_bytes > 2**20:
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    else:
        assert (out / INDEX_NAME).exists() and not (out / "model.safetensors").exists()


def test_export_sharded_layout_follows_hf_and_state_dict_order(tmp_path):
    model = _tiny_model()
    out = export_released(model, tmp_path / "export", max_shard_bytes=100_000)
    index = json.loads((out / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    names = sorted(set(weight_map.values()))
    n = len(names)
    assert n > 3
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, INDEX_NAME])
    state = model.state_dict()
    assert list(weight_map) == list(state)
    shard_of = [names.index(weight_map[k]) for k in state]
    assert shard_of == sorted(shard_of), "shards are filled in state_dict order"
    exported = _read_dir(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    for name in names:  # each shard's tensors are exactly what the index says
        with safe_open(str(out / name), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in weight_map.items() if v == name}
    for k, t in exported.items():
        assert t.dtype == (torch.bfloat16 if BLOCK_LINEAR.fullmatch(k) else torch.float32), k


def test_fp32_policy_round_trip(tmp_path):
    model = _tiny_model(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # full fp32 precision: not representable in bf16
    out = export_released(model, tmp_path / "distill", dtype_policy="fp32", max_shard_bytes=200_000)
    exported = _read_dir(out)
    assert all(t.dtype == torch.float32 for t in exported.values())
    fresh = _tiny_model(seed=4)
    load_released(fresh, out)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_export_refuses_bad_policy_and_non_empty_target(tmp_path):
    model = _tiny_model()
    with pytest.raises(ValueError, match="dtype_policy"):
        export_released(model, tmp_path / "x", dtype_policy="fp16")
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_released(model, target)
    assert (target / "notes.txt").read_text() == "keep me"
    export_released(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_released(model, empty)  # an existing empty directory is fine
    assert (empty / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]  # no temp dirs left


# ---------------------------------------------------------------------------------------------------------
# Atomic export
# ---------------------------------------------------------------------------------------------------------


def _failing_after_first_save(monkeypatch) -> list[str]:
    real, written = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        if written:
            raise OSError("disk full (simulated)")
        real(tensors, filename, metadata=metadata)
        written.append(filename)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return written


def test_export_failure_leaves_no_directory_under_the_final_name(tmp_path, monkeypatch):
    written = _failing_after_first_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        export_released(_tiny_model(), tmp_path / "ckpt", max_shard_bytes=100_000)
    assert len(written) == 1  # it did fail midway, after one shard
    assert list(tmp_path.iterdir()) == []  # neither the final directory nor the temporary one


def test_export_failure_keeps_the_old_checkpoint_when_overwriting(tmp_path, monkeypatch):
    target = export_released(_tiny_model(seed=0), tmp_path / "ckpt")
    before = _read_dir(target)
    _failing_after_first_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        export_released(_tiny_model(seed=1), target, max_shard_bytes=100_000, overwrite=True)
    after = _read_dir(target)
    assert all(_same_bytes(after[k], v) for k, v in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------------------------------------
# Validation: every mismatch is an error, and nothing is loaded
# ---------------------------------------------------------------------------------------------------------


def _drop(tensors: dict[str, Tensor]) -> str:
    del tensors["block.layers.1.mlp.down_proj.weight"]
    return "block.layers.1.mlp.down_proj.weight"


def _add(tensors: dict[str, Tensor]) -> str:
    tensors["block.layers.1.attention.attn_post_norm.weight"] = torch.zeros(128)
    return "block.layers.1.attention.attn_post_norm.weight"


def _reshape(tensors: dict[str, Tensor]) -> str:
    tensors["final_linear_audio.weight"] = torch.zeros(63, 128)
    return "final_linear_audio.weight"


@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize(
    "mutate, kind",
    [(_drop, "missing"), (_add, "unexpected"), (_reshape, "shape mismatch")],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatch_raises_names_the_key_and_loads_nothing(tmp_path, mutate, kind, num_shards):
    tensors = _released_tensors(_tiny_cfg())
    key = mutate(tensors)
    directory = _write_released(tmp_path / "bad", tensors, num_shards)
    model = _tiny_model(seed=7)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError) as err:
        load_released(model, directory)
    message = str(err.value)
    assert key in message and kind in message and "hint:" in message
    _assert_untouched(model, snapshot)


def test_mismatch_message_truncates_and_points_at_the_right_config(tmp_path):
    directory = _write_released(tmp_path / "tiny", _released_tensors(_tiny_cfg()), 1)
    model = _tiny_model(num_layers=2, mm_layers=[0, 1])  # a different config than the checkpoint's
    snapshot = _snapshot(model)
    with pytest.raises(ValueError) as err:
        load_released(model, directory)
    message = str(err.value)
    assert "16 unexpected key(s)" in message and "block.layers.2." in message
    assert "(+8 more)" in message  # long lists are truncated, with counts
    assert "model config 'tiny': check model=tiny" in message
    _assert_untouched(model, snapshot)


def test_mismatch_message_describes_an_unknown_architecture(tmp_path):
    cfg = _tiny_cfg(num_layers=5, mm_layers=[0, 4], gelu7_layers=[0, 1])
    directory = _write_released(tmp_path / "odd", _released_tensors(cfg), 1)
    with pytest.raises(ValueError, match=r"num_layers=5.*mm_layers=\[0, 4\].*gelu7_layers=\[0, 1\]"):
        load_released(_tiny_model(), directory)


def test_prefixed_keys_get_a_prefix_hint(tmp_path):
    tensors = {f"module.{k}": v for k, v in _released_tensors(_tiny_cfg()).items()}
    directory = _write_released(tmp_path / "prefixed", tensors, 1)
    with pytest.raises(ValueError, match="prefix 'module.'"):
        load_released(_tiny_model(), directory)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_released(_tiny_model(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("")
    with pytest.raises(
        FileNotFoundError, match=r"neither model\.safetensors\.index\.json nor model\.safetensors.*README"
    ):
        load_released(_tiny_model(), tmp_path / "empty")


def test_index_naming_a_missing_shard(tmp_path):
    directory = _write_released(tmp_path / "base", _released_tensors(_tiny_cfg()), 3)
    (directory / "model-00002-of-00003.safetensors").unlink()
    model = _tiny_model()
    snapshot = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_released(model, directory)
    _assert_untouched(model, snapshot)


def test_shard_disagreeing_with_weight_map(tmp_path):
    directory = _write_released(tmp_path / "base", _released_tensors(_tiny_cfg()), 3)
    index = json.loads((directory / INDEX_NAME).read_text())
    index["weight_map"]["final_linear_video.weight"] = "model-00001-of-00003.safetensors"  # really in shard 3
    (directory / INDEX_NAME).write_text(json.dumps(index))
    model = _tiny_model()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"disagree.*final_linear_video\.weight"):
        load_released(model, directory)
    _assert_untouched(model, snapshot)


def test_meta_model_is_a_clear_error(released_dir):
    directory, _ = released_dir
    with torch.device("meta"):
        model = DiT(_tiny_cfg())
    with pytest.raises(ValueError, match="meta device"):
        load_released(model, directory)


# ---------------------------------------------------------------------------------------------------------
# zstd-compressed shards (`<shard>.zst`, as the release may ship them)
# ---------------------------------------------------------------------------------------------------------


def _compress_shards(directory: Path) -> None:
    for shard in directory.glob("*.safetensors"):
        subprocess.run(["zstd", "-q", "--rm", str(shard)], check=True)


class _CliZstdReader(io.BytesIO):
    """Stand-in for zstandard's stream_reader (read(n) + context manager), decompressing with the zstd CLI."""

    def __init__(self, source, read_across_frames: bool = False):
        out = subprocess.run(["zstd", "-dc"], input=source.read(), capture_output=True, check=True).stdout
        super().__init__(out)

    def read(self, size: int = -1) -> bytes:
        return super().read(min(size, 1000) if size > 0 else size)  # short reads, as a stream may give


def _fake_zstandard() -> types.ModuleType:
    module = types.ModuleType("zstandard")

    class ZstdDecompressor:
        def stream_reader(self, source, read_across_frames: bool = False):
            return _CliZstdReader(source, read_across_frames)

    module.ZstdDecompressor = ZstdDecompressor
    return module


needs_zstd_cli = pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")


@needs_zstd_cli
def test_zst_shards_without_zstandard_module_say_how_to_decompress(tmp_path, monkeypatch):
    directory = _write_released(tmp_path / "base", _released_tensors(_tiny_cfg()), 3)
    _compress_shards(directory)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails even where it is installed
    model = _tiny_model()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"zstd -d .*model-00001-of-00003\.safetensors\.zst"):
        load_released(model, directory)
    _assert_untouched(model, snapshot)


@needs_zstd_cli
@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("module", ["fake", "real"])
def test_zst_shards_load_like_plain_ones(tmp_path, monkeypatch, num_shards, module):
    if module == "real":
        pytest.importorskip("zstandard")
    else:
        monkeypatch.setitem(sys.modules, "zstandard", _fake_zstandard())
    tensors = _released_tensors(_tiny_cfg())
    directory = _write_released(tmp_path / "base", tensors, num_shards)
    _compress_shards(directory)
    assert not list(directory.glob("*.safetensors"))
    model = _tiny_model()
    load_released(model, directory)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[k].float()), k


# ---------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_into_cuda_model_and_export_back(released_dir, tmp_path):
    directory, tensors = released_dir
    model = _tiny_model().cuda()
    load_released(model, directory)
    for k, v in model.state_dict().items():
        assert v.is_cuda and v.dtype == torch.float32
        assert torch.equal(v.cpu(), tensors[k].float()), k
    exported = _read_dir(export_released(model, tmp_path / "export"))
    assert all(_same_bytes(exported[k], t) for k, t in tensors.items())

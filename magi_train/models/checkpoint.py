"""Load and export DiT weights in the released daVinci-MagiHuman safetensors layout (GAIR-NLP @ 209209b).

A released checkpoint directory holds either `model.safetensors` or `model.safetensors.index.json` plus
the shards named in its `weight_map` (HF layout; a shard may ship as `<shard>.zst`). Keys are the module
tree verbatim: 8 tensors per layer, the adapter's 7 (incl. `adapter.rope.bands`) and the 4 head tensors.
The base release stores the 160 block linear weights in bf16 and everything else in fp32; distill and SR
releases store everything in fp32. Our parameters are fp32 master weights, so loading is an exact cast.

Loading never ignores a key: every mismatch is reported before a single parameter is touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from magi_train.models.dit import MODEL_CONFIGS, DiT, DiTConfig
from magi_train.models.shards import fill, is_sharded
from magi_train.utils.fileio import atomic_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_POLICIES = ("base", "fp32")
# The block linear weights (4 per layer: 160 of the 320 block tensors of the 15B model); the only tensors
# the base release stores in bf16.
_BLOCK_LINEAR = re.compile(
    r"block\.layers\.\d+\.(attention\.linear_qkv|attention\.linear_proj|mlp\.up_gate_proj|mlp\.down_proj)\.weight"
)
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_LIST_LIMIT = 8  # keys shown per category in error messages


# ---------------------------------------------------------------------------------------------------------
# The released key table
# ---------------------------------------------------------------------------------------------------------


def released_key_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released-format checkpoint for `cfg`, from the release's naming and size rules.

    Derived independently of the model code (spec §2.1, §3): multi-modality layers stack 3 experts
    (video, audio, text) on dim 0; qkv rows = q | k | v | one gate logit per query head (gate rows only
    with attention gating); gelu7 MLPs are 4h wide and not gated, swiglu7 MLPs int(8h/3)//4*4 wide with
    gate and linear rows (2x) in `up_gate_proj`; RoPE keeps head_dim/8 bands per axis.
    """
    h, d, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads_kv
    hq = h // d
    qkv_rows = hq * d + 2 * hkv * d + (hq if cfg.enable_attn_gating else 0)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, in_ch in (
        ("video", cfg.video_in_channels),
        ("text", cfg.text_in_channels),
        ("audio", cfg.audio_in_channels),
    ):
        shapes[f"adapter.{name}_embedder.weight"] = (h, in_ch)
        shapes[f"adapter.{name}_embedder.bias"] = (h,)
    shapes["adapter.rope.bands"] = (d // 8,)
    for i in range(cfg.num_layers):
        m = 3 if i in cfg.mm_layers else 1
        if i in cfg.gelu7_layers:
            inter = up_rows = 4 * h
        else:
            inter = int(h * 4 * 2 / 3) // 4 * 4
            up_rows = 2 * inter
        p = f"block.layers.{i}."
        shapes[p + "attention.pre_norm.weight"] = (m * h,)
        shapes[p + "attention.linear_qkv.weight"] = (m * qkv_rows, h)
        shapes[p + "attention.q_norm.weight"] = (m * d,)
        shapes[p + "attention.k_norm.weight"] = (m * d,)
        shapes[p + "attention.linear_proj.weight"] = (m * h, hq * d)
        shapes[p + "mlp.pre_norm.weight"] = (m * h,)
        shapes[p + "mlp.up_gate_proj.weight"] = (m * up_rows, h)
        shapes[p + "mlp.down_proj.weight"] = (m * h, inter)
    shapes["final_norm_video.weight"] = (h,)
    shapes["final_norm_audio.weight"] = (h,)
    shapes["final_linear_video.weight"] = (cfg.video_in_channels, h)
    shapes["final_linear_audio.weight"] = (cfg.audio_in_channels, h)
    return shapes


def released_dtype(key: str, dtype_policy: str = "base") -> torch.dtype:
    """Storage dtype of `key`: "base" = bf16 block linears and fp32 rest; "fp32" = all fp32 (distill/SR)."""
    if dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"dtype_policy must be one of {DTYPE_POLICIES}, got {dtype_policy!r}")
    if dtype_policy == "base" and _BLOCK_LINEAR.fullmatch(key):
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------------------
# Reading: file resolution, headers, tensors
# ---------------------------------------------------------------------------------------------------------


def _zst(path: Path) -> Path:
    return path.with_name(path.name + ".zst")


def _shard_file(path: Path) -> Path | None:
    """The file to read for a shard: itself, else its `.zst` sibling (the release may ship those)."""
    for candidate in (path, _zst(path)):
        if candidate.is_file():
            return candidate
    return None


def _resolve(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Shard files to read and the index's weight_map (None for a single file)."""
    if path.is_file() or (not path.exists() and _zst(path).is_file()):
        if path.name.endswith(".json"):
            return _resolve_index(path)
        return [path if path.is_file() else _zst(path)], None
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} is neither a file nor a directory")
    if (path / INDEX_NAME).is_file():
        return _resolve_index(path / INDEX_NAME)
    single = _shard_file(path / SINGLE_NAME)
    if single is not None:
        return [single], None
    present = sorted(p.name for p in path.iterdir())
    shown = ", ".join(present[:_LIST_LIMIT]) + (
        f", ... (+{len(present) - _LIST_LIMIT} more)" if len(present) > _LIST_LIMIT else ""
    )
    raise FileNotFoundError(
        f"{path} is not a released-format checkpoint: it has neither {INDEX_NAME} nor {SINGLE_NAME} "
        f"(contents: {shown or 'empty'})"
    )


def _resolve_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path} is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} has no 'weight_map' of key -> shard file name")
    names = list(dict.fromkeys(weight_map.values()))  # first-seen order
    files, missing = [], []
    for name in names:
        found = _shard_file(index_path.parent / name)
        if found is None:
            missing.append(name)
        else:
            files.append(found)
    if missing:
        raise FileNotFoundError(
            f"{index_path} names {len(missing)} shard(s) that are not in {index_path.parent} "
            f"(neither the file nor <file>.zst): {_short_list(missing)}; the download is incomplete"
        )
    return files, weight_map


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    """Read n bytes (fewer only at end of stream); decompressing readers may return short reads."""
    buf = bytearray(n)
    view, filled = memoryview(buf), 0
    while filled < n:
        chunk = stream.read(min(n - filled, 64 * 2**20))
        if not chunk:
            break
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    return bytes(buf[:filled]) if filled < n else buf


def _zstd_reader(fh: IO[bytes], path: Path) -> IO[bytes]:
    try:
        import zstandard
    except ImportError:
        raise ValueError(
            f"{path} is zstd-compressed and the python module `zstandard` is not installed: decompress it "
            f"first with `zstd -d {path}` (it writes {path.with_suffix('')}, which is then loaded instead), "
            f"or pip install zstandard"
        ) from None
    dctx = zstandard.ZstdDecompressor()
    try:
        return dctx.stream_reader(fh, read_across_frames=True)  # multi-frame files (e.g. pzstd)
    except TypeError:  # old zstandard without the option
        return dctx.stream_reader(fh)


@contextlib.contextmanager
def _open_stream(path: Path) -> Iterator[IO[bytes]]:
    """The uncompressed safetensors bytes of a shard, decompressing `.zst` on the fly."""
    with path.open("rb") as fh:
        if path.suffix != ".zst":
            yield fh
            return
        stream = _zstd_reader(fh, path)
        try:
            yield stream
        finally:
            stream.close()


def _read_header(stream: IO[bytes], path: Path) -> tuple[dict[str, dict], int]:
    """The safetensors JSON header {key: {dtype, shape, data_offsets}} and the byte where data starts."""
    raw = _read_exact(stream, 8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < n <= _MAX_HEADER_BYTES:
        raise ValueError(f"{path} is not a safetensors file (bad or truncated header)")
    try:
        header = json.loads(_read_exact(stream, n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} has a corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def _shard_headers(files: list[Path]) -> dict[Path, dict[str, dict]]:
    headers = {}
    for path in files:
        with _open_stream(path) as stream:
            headers[path], _ = _read_header(stream, path)
    return headers


def _stream_tensors(path: Path, keys: set[str]) -> Iterator[tuple[str, Tensor]]:
    """Tensors of a `.zst` shard, decompressed on the fly one tensor at a time (no full copy in memory)."""
    with _open_stream(path) as stream:
        header, pos = _read_header(stream, path)
        base = pos
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = (base + o for o in info["data_offsets"])
            if start < pos:
                raise ValueError(f"{path}: tensor {key} overlaps the previous one (corrupt shard)")
            _read_exact(stream, start - pos)  # skip padding/gaps
            data = _read_exact(stream, end - start)
            if len(data) != end - start:
                raise ValueError(f"{path} ends inside tensor {key} (truncated shard)")
            pos = end
            if key in keys:
                dtype, shape = _FLOAT_DTYPES[info["dtype"]], info["shape"]
                flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                yield key, flat.reshape(shape)


def _iter_tensors(path: Path, keys: set[str], lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """(key, tensor) of a shard; lazy: safetensors slices instead, of which a sharded model reads only its rows."""
    if path.suffix == ".zst":
        yield from _stream_tensors(path, keys)
        return
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key in keys:
                yield key, f.get_slice(key) if lazy else f.get_tensor(key)


# ---------------------------------------------------------------------------------------------------------
# Validation and error messages
# ---------------------------------------------------------------------------------------------------------


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _natural(key: str) -> list[tuple[int, int | str]]:
    """Sort key that puts block.layers.2 before block.layers.10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in key.split(".")]


def _describe_checkpoint(shapes: dict[str, tuple[int, ...]]) -> str:
    """What architecture the checkpoint's shapes imply (a guess for the error message, never used to load)."""
    for name, cfg in MODEL_CONFIGS.items():
        if released_key_shapes(cfg) == shapes:
            return f"the checkpoint matches model config {name!r}: check model={name}"
    facts = []
    if "adapter.video_embedder.weight" in shapes:
        h = shapes["adapter.video_embedder.weight"][0]
        facts.append(f"hidden_size={h}")
        layers = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("block.layers.")})
        if layers:
            facts.append(f"num_layers={layers[-1] + 1}")
        mm = [i for i in layers if shapes.get(f"block.layers.{i}.attention.pre_norm.weight") == (3 * h,)]
        facts.append(f"mm_layers={mm}")
        gelu = [i for i in layers if shapes.get(f"block.layers.{i}.mlp.down_proj.weight", (0, 0))[1] == 4 * h]
        facts.append(f"gelu7_layers={gelu}")
        if "adapter.rope.bands" in shapes:
            facts.append(f"head_dim={8 * shapes['adapter.rope.bands'][0]}")
    if not facts:
        return "the checkpoint does not look like a released DiT checkpoint at all"
    return f"the checkpoint looks like {', '.join(facts)}: set the model config to match"


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str | None:
    prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
    if len(prefixes) == 1:
        (prefix,) = prefixes
        if {k[len(prefix) :] for k in unexpected} & set(missing):
            return f"the checkpoint keys carry a prefix {prefix!r} (a wrapper's state dict?): strip it first"
    return None


def _validate(
    model: DiT, target: dict[str, Tensor], ckpt: dict[str, tuple[str, tuple[int, ...]]], source: Path
) -> None:
    missing = [k for k in target if k not in ckpt]
    unexpected = sorted((k for k in ckpt if k not in target), key=_natural)
    wrong_shape = [
        f"{k}: checkpoint {list(ckpt[k][1])} vs model {list(target[k].shape)}"
        for k in target
        if k in ckpt and ckpt[k][1] != tuple(target[k].shape)
    ]
    bad_dtype = [f"{k}: {ckpt[k][0]}" for k in target if k in ckpt and ckpt[k][0] not in _FLOAT_DTYPES]
    if not (missing or unexpected or wrong_shape or bad_dtype):
        return
    cfg = model.cfg
    lines = [
        f"checkpoint {source} does not match the model (num_layers={cfg.num_layers}, "
        f"hidden_size={cfg.hidden_size}, head_dim={cfg.head_dim}, num_heads_kv={cfg.num_heads_kv}, "
        f"mm_layers={cfg.mm_layers}, gelu7_layers={cfg.gelu7_layers}, "
        f"enable_attn_gating={cfg.enable_attn_gating}); nothing was loaded:"
    ]
    if missing:
        lines.append(
            f"  {len(missing)} missing key(s) (in the model, not in the checkpoint): {_short_list(missing)}"
        )
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected key(s) (in the checkpoint, not in the model): {_short_list(unexpected)}"
        )
    if wrong_shape:
        lines.append(f"  {len(wrong_shape)} shape mismatch(es): {_short_list(wrong_shape)}")
    if bad_dtype:
        lines.append(f"  {len(bad_dtype)} tensor(s) not stored as F32/BF16/F16/F64: {_short_list(bad_dtype)}")
    hint = _prefix_hint(missing, unexpected)
    lines.append("hint: " + (hint or _describe_checkpoint({k: s for k, (_, s) in ckpt.items()})))
    raise ValueError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def load_released(model: DiT, path: str | Path) -> None:
    """Copy a released-format checkpoint (directory, index json or .safetensors file) into `model` in place.

    Every key must match by name and shape: missing, unexpected or mis-shaped tensors raise ValueError
    before any parameter is written. Shards are read one tensor at a time and cast to the parameter's
    dtype and device (bf16 -> fp32 is exact).
    """
    path = Path(path)
    files, weight_map = _resolve(path)
    headers = _shard_headers(files)

    ckpt: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (dtype, shape)
    owner: dict[str, Path] = {}
    for shard, header in headers.items():
        for key, info in header.items():
            if key in owner:
                raise ValueError(f"tensor {key} is stored twice: in {owner[key].name} and {shard.name}")
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if dtype in _FLOAT_DTYPES and end - start != math.prod(shape) * _FLOAT_DTYPES[dtype].itemsize:
                raise ValueError(f"{shard}: tensor {key} has {end - start} bytes for {dtype} {list(shape)}")
            ckpt[key], owner[key] = (dtype, shape), shard
    if weight_map is not None:
        _check_weight_map(weight_map, owner, path)

    # detached tensors sharing storage with the parameters and buffers; LoRA adapters on the model are not the base's
    target = {k: t for k, t in model.state_dict().items() if ".lora." not in k}
    sharded = any(is_sharded(t) for t in target.values())
    _validate(model, target, ckpt, path)
    meta = [k for k, t in target.items() if t.is_meta]
    if meta:
        raise ValueError(
            f"{len(meta)} model tensors are on the meta device ({_short_list(meta)}): "
            "materialise the model first (model.to_empty(device=...)), then load"
        )

    with torch.no_grad():
        for shard in files:
            keys = {k for k, p in owner.items() if p == shard}
            # a sharded (FSDP2) model: each rank reads only the rows of its shards (shards.py)
            for key, tensor in _iter_tensors(shard, keys, lazy=sharded):
                fill(target[key], tensor)


def _check_weight_map(weight_map: dict[str, str], owner: dict[str, Path], source: Path) -> None:
    """Each key must live in exactly the shard its index says (shard file names compare without `.zst`)."""

    def shard_name(p: Path) -> str:
        return p.name[: -len(".zst")] if p.suffix == ".zst" else p.name

    problems = []
    for key, name in weight_map.items():
        if key not in owner:
            problems.append(f"{key} (index: {name}, in no shard)")
        elif shard_name(owner[key]) != Path(name).name:
            problems.append(f"{key} (index: {name}, stored in {owner[key].name})")
    problems += [f"{k} (in {p.name}, not in the index)" for k, p in owner.items() if k not in weight_map]
    if problems:
        raise ValueError(
            f"the shards of {source} disagree with its {INDEX_NAME} for {len(problems)} tensor(s): "
            f"{_short_list(problems)}; the index or a shard is stale or corrupt"
        )


def export_released(
    model: DiT,
    out_dir: str | Path,
    dtype_policy: str = "base",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a released-format checkpoint directory; returns its path.

    dtype_policy "base": bf16 block linears, fp32 rest (released base); "fp32": all fp32 (distill/SR).
    One `model.safetensors` if it fits in max_shard_bytes, else `model-0000i-of-0000n.safetensors` shards
    (filled in state_dict order) plus `model.safetensors.index.json`. Written to a temporary directory
    next to out_dir and renamed at the end (`atomic_dir`), so out_dir never holds a partial checkpoint.
    """
    state = model.state_dict()  # policy, shard size and out_dir are checked by export_tensors
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot export tensors on the meta device: {_short_list(meta)}")
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    return export_tensors(
        model.cfg,
        shapes,
        lambda keys: {k: state[k] for k in keys},
        out_dir,
        dtype_policy,
        max_shard_bytes,
        overwrite,
    )


def export_tensors(
    cfg: DiTConfig,
    shapes: dict[str, tuple[int, ...]],
    fetch,
    out_dir: str | Path,
    dtype_policy: str = "base",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """export_released from a source that hands over the tensors of one output shard at a time: `fetch(keys)`
    returns {key: tensor} for those keys, so at most one shard's tensors are in memory (consolidate streams a
    sharded checkpoint this way). `shapes`: every key's shape, checked against the released layout first."""
    if dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"dtype_policy must be one of {DTYPE_POLICIES}, got {dtype_policy!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    expected = released_key_shapes(cfg)
    if shapes != expected:
        diff = sorted(set(shapes).symmetric_difference(expected)) or [
            k for k in expected if shapes[k] != expected[k]
        ]
        raise ValueError(
            f"the model's state dict is not in the released layout for its config ({_short_list(diff)}); "
            "export the bare DiT, not a wrapper"
        )
    order = list(expected)  # state-dict order
    dtypes = {k: released_dtype(k, dtype_policy) for k in order}
    nbytes = {k: math.prod(shapes[k]) * dtypes[k].itemsize for k in order}
    shards: list[list[str]] = [[]]
    size = 0
    for key in order:
        if shards[-1] and size + nbytes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes[key]
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def write(tmp: Path) -> None:
        for name, keys in zip(names, shards, strict=True):
            got = fetch(keys)
            tensors = {k: got[k].detach().to(device="cpu", dtype=dtypes[k]).contiguous() for k in keys}
            del got
            safetensors.torch.save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
        if n > 1:
            index = {
                "metadata": {"total_size": sum(nbytes.values())},
                "weight_map": {k: name for name, keys in zip(names, shards, strict=True) for k in keys},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    atomic_dir(out_dir, write, overwrite=overwrite)
    return out_dir


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"export target {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export target {out_dir} exists and is not empty; pass overwrite=True to replace it"
        )

"""What an evaluation report was computed with: code version, package versions and checksums of the weights
(generator checkpoints, VideoScore2, the ASR model, SyncNet), so a number in a paper can be traced back.

Weight files can be tens of GB, so by default a file is fingerprinted by the sha256 of its size and its first
and last 8 MiB (`sha256_head_tail`), which any change of a saved tensor file alters in practice; files up to
16 MiB, and every file with `eval.full_checksums=true`, get the sha256 of their whole content (`sha256`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from magi_train.config import EvalConfig, GenerateConfig

PACKAGES = ("magi_train", "torch", "transformers", "jiwer", "whisper-normalizer", "opencc", "choix", "numpy",
            "scipy", "pocketsphinx", "av", "python-speech-features", "lightning")  # fmt: skip
_CHUNK = 8 << 20
_SMALL = 16 << 20
# Files of a model directory that decide its outputs (weights, configs, tokenizer and processor files).
_MODEL_FILES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".model",
    ".json",
    ".txt",
    ".tiktoken",
    ".npz",
)


def file_checksum(path: Path, full: bool = False) -> dict[str, Any]:
    """`{"sha256" | "sha256_head_tail": hex, "bytes": size}` of one file."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if full or size <= _SMALL:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return {"sha256": h.hexdigest(), "bytes": size}
        h.update(str(size).encode())
        h.update(f.read(_CHUNK))
        f.seek(size - _CHUNK)
        h.update(f.read(_CHUNK))
    return {"sha256_head_tail": h.hexdigest(), "bytes": size}


def checksum(path: str | Path | None, full: bool = False) -> dict[str, Any] | None:
    """Checksum of a weight file, or of every model file of a directory (plus one digest over them all)."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return {"path": str(p), **file_checksum(p, full)}
    if not p.is_dir():
        return {"path": str(p), "missing": True}
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _MODEL_FILES)
    entries = {str(f.relative_to(p)): file_checksum(f, full) for f in files}
    overall = hashlib.sha256(repr(sorted(entries.items())).encode()).hexdigest()
    return {"path": str(p), "files": entries, "digest": overall}


def git_state(root: Path) -> dict[str, Any]:
    """The commit of the code and whether the work tree had changes (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(eval_cfg: EvalConfig, gen_cfg: GenerateConfig, specs: list) -> dict[str, Any]:
    """Code, packages and weights behind a report (see the module docstring)."""
    full = eval_cfg.full_checksums
    models = {}
    for spec in specs:
        if spec.clips_dir is not None:
            models[spec.name] = {"clips_dir": spec.clips_dir}
            continue
        cfg = {**dataclasses.asdict(gen_cfg), **spec.generate}
        models[spec.name] = {
            key: checksum(cfg.get(key), full)
            for key in ("base_ckpt", "distilled_ckpt", "sr_ckpt")
            if cfg.get(key)
        }
    return {
        "code": git_state(Path(__file__).resolve().parents[2]),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "checksum_kind": "sha256 of whole files"
        if full
        else "sha256 of files <= 16 MiB, else of size + first/last 8 MiB",
        "models": models,
        "codecs": checksum(gen_cfg.codecs_dir, full) if gen_cfg.codecs_dir else None,
        "scorer": checksum(eval_cfg.scorer.path, full) if eval_cfg.scorer.backend == "videoscore2" else None,
        "asr": checksum(eval_cfg.asr.path, full) if eval_cfg.asr.path else None,
        "sync": checksum(eval_cfg.sync_weights, full),
    }

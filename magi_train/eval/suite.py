"""Eval suites: jsonl prompt sets under `eval/` (one JSON object a line), validated on load, or a benchmark's own
files in a local folder (magi_train/eval/benchmarks.py); `suite_prompts` reads either by `eval.suite.format`.

Each line: `{"id": "en_kitchen", "prompt": "...", "image": "img/x.png", "audio": "a/x.wav", "seconds": 5,
"seed": 42}`; only `id` and `prompt` are required. `image` (i2v) and `audio` (a2v) are resolved relative
to the jsonl file. Prompts use the release's Enhanced Prompt format; their `Dialogue:` lines are the
speech reference (magi_train/eval/text.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from magi_train.config import EvalSuiteConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEYS = {"id", "prompt", "image", "audio", "seconds", "seed", "tags"}
SUITE_FORMATS = ("jsonl", "versebench", "talkvid_bench")


@dataclass(frozen=True)
class SuitePrompt:
    id: str
    prompt: str
    image: str | None = None
    audio: str | None = None
    seconds: float | None = None
    seed: int | None = None


def resolve_suite_path(path: str | Path) -> Path:
    """A suite path as given (absolute or relative to the working directory), else relative to the repository."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise ValueError(f"suite file {str(path)!r} not found (looked in the working directory and {REPO_ROOT})")


def load_suite(path: str | Path, limit: int | None = None) -> list[SuitePrompt]:
    """Parse and validate a suite jsonl; `limit` keeps the first N prompts."""
    path = resolve_suite_path(path)
    prompts: list[SuitePrompt] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{where}: not valid JSON ({err.msg}); each line must be one JSON object"
            ) from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        unknown = set(row) - _KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        pid, prompt = row.get("id"), row.get("prompt")
        if not isinstance(pid, str) or not _ID.match(pid):
            raise ValueError(
                f"{where}: 'id' must be a file-name-safe string (letters, digits, _ . -), got {pid!r}"
            )
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        media = {}
        for key in ("image", "audio"):
            if row.get(key) is not None:
                file = (path.parent / row[key]).resolve()
                if not file.is_file():
                    raise ValueError(f"{where}: {key} {row[key]!r} not found (resolved to {file})")
                media[key] = str(file)
        seconds = row.get("seconds")
        if seconds is not None and (not isinstance(seconds, (int, float)) or seconds <= 0):
            raise ValueError(f"{where}: 'seconds' must be a positive number, got {seconds!r}")
        seed = row.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"{where}: 'seed' must be an integer, got {seed!r}")
        seen.add(pid)
        prompts.append(SuitePrompt(pid, prompt, media.get("image"), media.get("audio"), seconds, seed))
    if not prompts:
        raise ValueError(f"suite {str(path)!r} has no prompts")
    return prompts[:limit] if limit is not None else prompts


def resolve_suite_root(root: str | Path) -> Path:
    """A benchmark folder as given (absolute or relative to the working directory), else relative to the repository
    (`data/versebench`); as given when neither exists, for the loader to name in its error."""
    p = Path(root).expanduser()
    if not p.is_dir() and not p.is_absolute() and (REPO_ROOT / p).is_dir():
        return REPO_ROOT / p
    return p


def suite_prompts(cfg: EvalSuiteConfig, limit: int | None, media_dir: str | Path) -> list[SuitePrompt]:
    """The prompts of a quality suite by its `format`, the first `limit` of them (None: all).

    `jsonl` reads `cfg.prompts` (load_suite); `versebench` and `talkvid_bench` read the benchmark folder `cfg.root`
    (its `cfg.subsets`, default all). `media_dir` receives media a benchmark lacks as files (TalkVid-Bench's
    reference frames).
    """
    if cfg.format not in SUITE_FORMATS:
        raise ValueError(f"eval.suite.format={cfg.format!r}: use one of {list(SUITE_FORMATS)}")
    if cfg.format == "jsonl":
        if not cfg.prompts:
            raise ValueError(
                f"suite {cfg.name!r} names no prompts file: set eval.suite.prompts=<file.jsonl>, or "
                "eval.suite.format=versebench|talkvid_bench with eval.suite.root=<benchmark folder>"
            )
        if cfg.root or cfg.subsets:
            raise ValueError(
                "eval.suite.root and eval.suite.subsets are for benchmark folders (eval.suite.format=versebench or "
                f"talkvid_bench); suite {cfg.name!r} is a jsonl suite (eval.suite.prompts={cfg.prompts!r})"
            )
        return load_suite(cfg.prompts, limit)
    if not cfg.root:
        raise ValueError(
            f"eval.suite.format={cfg.format} reads a local benchmark folder: set eval.suite.root=<folder> "
            f"(e.g. suite={cfg.format} eval.suite.root=/data/{cfg.format})"
        )
    if cfg.prompts:
        raise ValueError(
            f"eval.suite.prompts={cfg.prompts!r} is for jsonl suites; eval.suite.format={cfg.format} reads "
            "eval.suite.root: drop one of them"
        )
    # benchmarks imports SuitePrompt from this module: importing it at the top would be circular
    from magi_train.eval import benchmarks

    root = resolve_suite_root(cfg.root)
    if cfg.format == "versebench":
        return benchmarks.load_versebench(root, list(cfg.subsets), limit)
    return benchmarks.load_talkvid_bench(root, list(cfg.subsets), media_dir, limit)

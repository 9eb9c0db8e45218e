"""Benchmark suites read from a local folder: Verse-Bench (UniVerse-1, arXiv 2509.06155) and TalkVid-Bench (TalkVid,
arXiv 2508.13618) items as `SuitePrompt`s, beside our own jsonl suites (magi_train/eval/suite.py).

The layouts and what is verified or assumed about them are in docs/eval.md, "Benchmark suites":

- `versebench`: `<root>/<set>/<name>.json` with `<name>.jpg` beside it (sets set1, set2, set3), as
  github.com/Dorniwang/Verse-Bench `calculate_metrics.py` reads huggingface.co/datasets/dorni/Verse-Bench; an item
  is `{"video_prompt": str, "audio_prompt": [str], "speech_prompt": {"speaker": str, "text": str}}` (the examples
  of github.com/Dorniwang/UniVerse-1-code `assets/prompts/`). Text + reference image -> audio + video (i2v).
- `talkvid_bench`: `<root>/<subset>/test_<subset>.json` (a list of TalkVid records) with the clips in
  `<subset>/videos/` and their audio in `<subset>/audios/` (subsets age, ethnicity, gender, language; the `bench`
  branch of huggingface.co/datasets/FreedomIntelligence/TalkVid). Reference image + the clip's audio -> video
  (i2v + a2v), the inputs of TalkVid's own inference (github.com/FreedomIntelligence/TalkVid scripts/inference.sh);
  the bench ships no images, so the reference is the clip's first frame.

Verse-Bench items become prompts in the release's Enhanced Prompt format (spec §4.3): the caption, a `Dialogue:`
line holding the item's transcript (the speech reference of WER, magi_train/eval/text.py) and a `Background
Sound:` line. TalkVid-Bench records carry no transcript: their prompt is the caption, and lip sync measures speech.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magi_train.eval.suite import SuitePrompt
from magi_train.utils.fileio import atomic_file

VERSEBENCH_SETS = ("set1", "set2", "set3")  # calculate_metrics.py walks exactly these
TALKVID_SUBSETS = ("age", "ethnicity", "gender", "language")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AUDIO_SUFFIXES = (".wav", ".m4a", ".mp3", ".aac", ".flac", ".ogg")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_NO_AMBIENT = ("no ambient", "none")  # UniVerse-1's sample_universe.py drops an ambient prompt holding these


@dataclass(frozen=True)
class _Item:
    """One benchmark item before its id is made unique and its media resolved."""

    source: str  # `file` or `file: record N (id ...)`, for messages
    name: str  # the benchmark's own id (file stem or record id)
    group: str  # its set / subset, to tell equal names apart
    prompt: str
    image: str | None = None  # reference image file (Verse-Bench)
    video: Path | None = None  # clip whose first frame is the reference image (TalkVid-Bench)
    audio: str | None = None  # driving audio (TalkVid-Bench)


def safe_id(name: str) -> str:
    """A file-name-safe prompt id from a benchmark's name: runs of other characters -> `_`, leading `._-` dropped."""
    return _UNSAFE.sub("_", name.strip()).lstrip("._-")


def _unique_ids(items: list[_Item]) -> list[str]:
    """Ids of the items in order: `safe_id(name)`, and `<group>-<id>` (then `-2`, `-3`, ...) for a taken one."""
    ids: list[str] = []
    seen: set[str] = set()
    for item in items:
        base = safe_id(item.name)
        if not base:
            raise ValueError(
                f"{item.source}: the id {item.name!r} has no letters or digits to name its clip by"
            )
        pid, n = base, 1
        if pid in seen:
            pid = f"{safe_id(item.group)}-{base}"
        while pid in seen:
            n += 1
            pid = f"{safe_id(item.group)}-{base}-{n}"
        seen.add(pid)
        ids.append(pid)
    return ids


def speech_language(text: str) -> str:
    """The language name of a dialogue line from its script: Korean (hangul), Japanese (kana), Mandarin (Han),
    else English. Verse-Bench gives no language (its WER uses SenseVoice's detection); this is our assumption."""
    if any(0xAC00 <= ord(c) <= 0xD7AF or 0x1100 <= ord(c) <= 0x11FF for c in text):
        return "Korean"
    if any(0x3040 <= ord(c) <= 0x30FF for c in text):
        return "Japanese"
    if any(0x3400 <= ord(c) <= 0x9FFF or 0xF900 <= ord(c) <= 0xFAFF for c in text):
        return "Mandarin"
    return "English"


def enhanced_prompt(caption: str, lines: list[tuple[str, str, str]], background: str) -> str:
    """`caption`, a `Dialogue:` block of `<speaker, language>: "text"` lines (`<No dialogue>` without any) and a
    `Background Sound:` line (`<No background sound>` when empty): the release's Enhanced Prompt layout."""
    dialogue = "\n".join(f'<{speaker}, {language}>: "{text}"' for speaker, language, text in lines)
    sound = f"<{background}>" if background else "<No background sound>"
    return f"{caption.strip()}\n\nDialogue:\n{dialogue or '<No dialogue>'}\n\nBackground Sound:\n{sound}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from err


def _root(root: str | Path, what: str, hint: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ValueError(f"eval.suite.root={str(root)!r}: no such folder; {what} reads a local copy ({hint})")
    return path


def _subset_dirs(
    root: Path, subsets: list[str], defaults: tuple[str, ...], what: str
) -> list[tuple[str, Path]]:
    names = list(subsets) or list(defaults)
    if len(set(names)) != len(names):
        raise ValueError(f"eval.suite.subsets={names}: a subset is named twice")
    dirs = []
    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise ValueError(
                f"{what}: subset folder {folder} not found; the subsets are {list(defaults)}: download it, or "
                f"choose the ones you have with eval.suite.subsets=[...]"
            )
        dirs.append((name, folder))
    return dirs


def _find(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _string(value: Any, where: str, field: str, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        kind = "a non-empty string" if required else "a string"
        raise ValueError(f"{where}: {field!r} must be {kind}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Verse-Bench
# ---------------------------------------------------------------------------------------------------------


def versebench_prompt(item: Any, where: str) -> str:
    """One Verse-Bench item (the parsed JSON) -> an Enhanced Prompt: `video_prompt` is the caption, the
    `speech_prompt` text (their WER reference) the one dialogue line, the `audio_prompt` entries the background."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a Verse-Bench item must be a JSON object, got {type(item).__name__}")
    caption = _string(item.get("video_prompt"), where, "video_prompt", required=True)
    ambient = item.get("audio_prompt", [])
    if isinstance(ambient, str):
        ambient = [ambient]
    if not isinstance(ambient, list) or not all(isinstance(a, str) for a in ambient):
        raise ValueError(f"{where}: 'audio_prompt' must be a list of strings, got {ambient!r}")
    background = ", ".join(_one_line(a) for a in ambient if a.strip())
    if any(marker in background.lower() for marker in _NO_AMBIENT):
        background = ""
    speech = item.get("speech_prompt", {})
    if speech is None:
        speech = {}
    if not isinstance(speech, dict):
        raise ValueError(f"{where}: 'speech_prompt' must be an object {{speaker, text}}, got {speech!r}")
    text = _one_line(_string(speech.get("text"), where, "speech_prompt.text", required=False))
    speaker = _one_line(_string(speech.get("speaker"), where, "speech_prompt.speaker", required=False))
    speaker = speaker.replace("<", "").replace(">", "").strip() or "Speaker"
    lines = [(speaker, speech_language(text), text)] if text else []
    return enhanced_prompt(caption, lines, background.replace("<", "").replace(">", ""))


def load_versebench(root: str | Path, subsets: list[str], limit: int | None = None) -> list[SuitePrompt]:
    """Verse-Bench items of `<root>/<set>/*.json` (sets in the order given, files by name), each with its
    reference image `<name>.jpg` (or .jpeg / .png) beside it; ids are the file names (the names Verse-Bench's
    metric script expects its clips under), prefixed with the set where two sets share one."""
    base = _root(root, "format versebench", "huggingface.co/datasets/dorni/Verse-Bench")
    items: list[_Item] = []
    for set_name, folder in _subset_dirs(base, subsets, VERSEBENCH_SETS, f"Verse-Bench at {base}"):
        files = sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))
        if not files:
            raise ValueError(
                f"Verse-Bench set {folder} holds no <name>.json items (each with <name>.jpg beside it)"
            )
        for file in files:
            where = str(file)
            prompt = versebench_prompt(_read_json(file), where)
            image = _find(folder, file.stem, IMAGE_SUFFIXES)
            if image is None:
                raise ValueError(
                    f"{where}: reference image {file.stem}.jpg (or .jpeg / .png) not found in {folder}; every "
                    "Verse-Bench item is an image + text prompt"
                )
            items.append(_Item(where, file.stem, set_name, prompt, image=str(image)))
    prompts = [
        SuitePrompt(pid, it.prompt, image=it.image) for pid, it in zip(_unique_ids(items), items, strict=True)
    ]
    return prompts[:limit] if limit is not None else prompts


# ---------------------------------------------------------------------------------------------------------
# TalkVid-Bench
# ---------------------------------------------------------------------------------------------------------


def _media_name(record: dict[str, Any], key: str) -> str | None:
    """The file name of a record's `video-path` / `audio-path` (paths on the authors' machines: name only)."""
    value = record.get(key)
    return Path(value.replace("\\", "/")).name if isinstance(value, str) and value.strip() else None


def _talkvid_media(
    record: dict[str, Any], name: str, folder: Path, muxed: dict[str, Path], where: str
) -> tuple[Path, str]:
    """The clip (for its first frame) and the driving audio of one record, resolved in its subset folder."""
    video_name = _media_name(record, "video-path") or f"{name}.mp4"
    stem = Path(video_name).stem
    video = folder / "videos" / video_name
    video = video if video.is_file() else muxed.get(video_name)
    if video is None:
        raise ValueError(
            f"{where}: clip {video_name!r} not found in {folder / 'videos'} or {folder / 'videos_w_audios'}/<group>/"
        )
    audio_name = _media_name(record, "audio-path")
    audio = folder / "audios" / audio_name if audio_name else None
    if audio is None or not audio.is_file():
        audio = _find(folder / "audios", stem, AUDIO_SUFFIXES) or muxed.get(video_name)
    if audio is None:
        raise ValueError(
            f"{where}: no audio for clip {stem!r}: expected {folder / 'audios'}/{stem}.wav (or "
            f"{', '.join(AUDIO_SUFFIXES[1:])}) or the muxed {folder / 'videos_w_audios'}/<group>/{video_name}"
        )
    return video.resolve(), str(Path(audio).resolve())


def reference_frame(video: Path, out: Path) -> str:
    """The first frame of `video` as a PNG at `out`, written atomically; an `out` not older than the video is kept."""
    from PIL import Image

    from magi_train.eval.media import first_frame

    if not (out.is_file() and out.stat().st_mtime_ns >= video.stat().st_mtime_ns):
        frame = first_frame(video)
        atomic_file(out, lambda tmp: Image.fromarray(frame).save(tmp, format="PNG"))
    return str(out)


def load_talkvid_bench(
    root: str | Path, subsets: list[str], media_dir: str | Path, limit: int | None = None
) -> list[SuitePrompt]:
    """TalkVid-Bench records of `<root>/<subset>/test_<subset>.json` (subsets in the order given, records in file
    order; a clip listed in several subsets once). Each prompt is the record's `description`, with the clip's audio
    as driving audio and its first frame, written to `media_dir/<id>.png`, as reference image.

    The records carry no transcript, so the prompt has no `Dialogue:` block (and the clip no WER): with the speech
    given (a2v), lip sync is the speech measure."""
    base = _root(
        root, "format talkvid_bench", "huggingface.co/datasets/FreedomIntelligence/TalkVid, branch bench"
    )
    if (
        not any((base / s).is_dir() for s in (subsets or TALKVID_SUBSETS))
        and (base / "TalkVid-bench").is_dir()
    ):
        base = base / "TalkVid-bench"  # the root of a clone of the dataset repository
    items: list[_Item] = []
    seen: set[str] = set()
    for subset, folder in _subset_dirs(base, subsets, TALKVID_SUBSETS, f"TalkVid-Bench at {base}"):
        file = folder / f"test_{subset}.json"
        if not file.is_file():
            raise ValueError(f"TalkVid-Bench subset {folder}: its record list {file.name} is missing")
        records = _read_json(file)
        if not isinstance(records, list):
            raise ValueError(f"{file}: must be a JSON list of TalkVid records, got {type(records).__name__}")
        muxed = {p.name: p for p in (folder / "videos_w_audios").rglob("*.mp4")}
        for number, record in enumerate(records):
            where = f"{file}: record {number}"
            if not isinstance(record, dict):
                raise ValueError(f"{where}: must be a JSON object, got {type(record).__name__}")
            name = _string(record.get("id"), where, "id", required=True).strip()
            if name in seen:
                continue  # the same clip in another subset (or twice in one): evaluated once
            seen.add(name)
            where = f"{where} (id {name!r})"
            caption = _one_line(_string(record.get("description"), where, "description", required=True))
            video, audio = _talkvid_media(record, name, folder, muxed, where)
            items.append(_Item(where, name, subset, caption, video=video, audio=audio))
    if not items:
        raise ValueError(
            f"TalkVid-Bench at {base}: the record lists of {subsets or list(TALKVID_SUBSETS)} are empty"
        )
    ids = _unique_ids(items)
    if limit is not None:
        ids, items = ids[:limit], items[:limit]
    frames = Path(media_dir)
    return [
        SuitePrompt(pid, it.prompt, image=reference_frame(it.video, frames / f"{pid}.png"), audio=it.audio)
        for pid, it in zip(ids, items, strict=True)
    ]

"""Prompt dialogue extraction and transcript normalisation for speech scoring (daVinci-MagiHuman prompts).

Prompts follow the release's "Enhanced Prompt" format (spec §4.3): an English body, then a `Dialogue:` block of
lines `<speaker, language>: "text"` and a `Background Sound:` block. The spoken reference of a clip is the text
of its dialogue lines. Transcripts and references are normalised the same way before scoring: Unicode NFKC,
lower case, punctuation stripped, whitespace collapsed (the convention third-party reimplementations use for
this model family, spec §9); Whisper's English normaliser is an option for English.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Languages scored per character: no spaces between words (zh, ja; yue is written in Chinese characters);
# Korean is spaced by eojeol, but ASR spacing is unreliable, so it is scored per character as well.
CHARACTER_LANGUAGES = frozenset({"zh", "yue", "ja", "ko"})

# Names the prompts use for a line's language -> ISO 639 code. The release lists Mandarin, Cantonese,
# English, Japanese, Korean, German and French (spec §9); a few common extras are accepted too.
LANGUAGE_CODES = {
    "english": "en", "en": "en",
    "mandarin": "zh", "chinese": "zh", "mandarin chinese": "zh", "putonghua": "zh", "zh": "zh",
    "cantonese": "yue", "yue": "yue",
    "japanese": "ja", "ja": "ja",
    "korean": "ko", "ko": "ko",
    "german": "de", "de": "de",
    "french": "fr", "fr": "fr",
    "spanish": "es", "es": "es",
    "italian": "it", "it": "it",
    "portuguese": "pt", "pt": "pt",
    "russian": "ru", "ru": "ru",
}  # fmt: skip

_DIALOGUE_HEADER = re.compile(r"^\s*dialogue\s*:\s*(.*)$", re.IGNORECASE)
_SECTION_HEADER = re.compile(r"^\s*[A-Za-z][A-Za-z ]{0,40}:\s*$|^\s*background sound\s*:", re.IGNORECASE)
# `<speaker, language>: "text"` with ASCII, curly or CJK corner quotes; the speaker may itself hold commas.
_LINE = re.compile(r"<(?P<tag>[^<>]*)>\s*[:：]\s*(?P<quote>[\"“”「『'‘])(?P<text>.*?)[\"“”」』'’]?\s*$")


@dataclass(frozen=True)
class DialogueLine:
    """One spoken line of a prompt."""

    speaker: str
    language: str  # ISO code when known (`en`, `zh`, ...), else the prompt's name lower-cased
    text: str


def language_code(name: str) -> str:
    """`"Mandarin"` -> `"zh"`; unknown names are returned lower-cased and stripped."""
    key = " ".join(name.strip().lower().split())
    return LANGUAGE_CODES.get(key, key)


def extract_dialogue(prompt: str) -> list[DialogueLine]:
    """The `<speaker, language>: "text"` lines of a prompt's `Dialogue:` block (empty for `<No dialogue>`)."""
    lines = prompt.splitlines()
    out: list[DialogueLine] = []
    inside = False
    for raw in lines:
        header = _DIALOGUE_HEADER.match(raw)
        if header:
            inside = True
            raw = header.group(1)  # a line may follow the header on the same line
            if not raw.strip():
                continue
        elif inside and _SECTION_HEADER.match(raw):
            inside = False
        if not inside:
            continue
        match = _LINE.match(raw.strip())
        if match is None:
            continue  # blank lines, `<No dialogue>`, stage directions
        tag = match.group("tag")
        if "," not in tag and "，" not in tag:
            continue
        speaker, language = re.split(r"[,，](?=[^,，]*$)", tag)
        text = match.group("text").strip()
        if text:
            out.append(DialogueLine(speaker.strip(), language_code(language), text))
    return out


def reference_text(lines: list[DialogueLine]) -> tuple[str, str | None]:
    """(text, language) of the spoken reference: the lines joined in order.

    The language is the lines' common language, `"mixed"` when they differ, None without dialogue.
    """
    if not lines:
        return "", None
    languages = {line.language for line in lines}
    language = languages.pop() if len(languages) == 1 else "mixed"
    return " ".join(line.text for line in lines), language


def uses_characters(language: str | None, text: str = "") -> bool:
    """Whether a language is scored per character (CER): zh/yue/ja/ko, or mixed text containing CJK."""
    if language in CHARACTER_LANGUAGES:
        return True
    if language == "mixed":
        return any(_is_cjk(ch) for ch in text)
    return False


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x3400 <= code <= 0x9FFF  # CJK unified ideographs (+ extension A)
        or 0xAC00 <= code <= 0xD7AF  # hangul syllables
        or 0x1100 <= code <= 0x11FF  # hangul jamo
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
    )


@lru_cache(maxsize=1)
def _whisper_english():
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as err:
        raise ValueError(
            "normalizer='whisper' needs the whisper-normalizer package: pip install -e '.[eval]'"
        ) from err
    return EnglishTextNormalizer()


def normalize_text(text: str, language: str | None = None, normalizer: str = "basic") -> str:
    """Normalise a reference or a transcript for scoring.

    `basic`: NFKC, lower case, apostrophes inside words dropped (`don't` -> `dont`), every other punctuation
    mark (Unicode category P*) replaced by a space, whitespace collapsed; for character-scored languages all
    whitespace is removed. `whisper`: Whisper's English normaliser (spelling, numbers, contractions) for
    English, `basic` for every other language.
    """
    if normalizer not in ("basic", "whisper"):
        raise ValueError(f"unknown normalizer {normalizer!r}; use 'basic' or 'whisper'")
    text = unicodedata.normalize("NFKC", text)
    if normalizer == "whisper" and language == "en":
        return " ".join(_whisper_english()(text).split())
    text = text.lower()
    text = re.sub(r"(?<=\w)['’](?=\w)", "", text)
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    if uses_characters(language, text):
        return "".join(text.split())
    return " ".join(text.split())

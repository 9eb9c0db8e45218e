"""Prompt dialogue extraction and transcript normalisation for speech scoring (daVinci-MagiHuman prompts).

Prompts follow the release's "Enhanced Prompt" format (spec §4.3): an English body, then a `Dialogue:` block of
lines `<speaker, language>: "text"` and a `Background Sound:` block. The spoken reference of a clip is the text
of its dialogue lines.

Normalisation follows the convention of the ASR literature (Whisper, arXiv 2212.04356, appendix C, as shipped
in openai-whisper's `whisper/normalizers` and ported by the `whisper-normalizer` package):

- English: Whisper's `EnglishTextNormalizer` (spelling, numbers, contractions, fillers), after curly apostrophes
  are mapped to `'` (Whisper's own code only knows the ASCII one, so `it’s` would become `it s`);
- other space-delimited languages: Whisper's `BasicTextNormalizer` (NFKC, lower case, bracketed text dropped,
  marks/symbols/punctuation -> space), except that an apostrophe between two letters is kept, so French
  elisions stay one word (`l'école`, `aujourd'hui`);
- zh / yue / ja / ko: the same basic normaliser, then scored per character (CER); in text that mixes CJK and
  another script (code-switched lines) every CJK character is one unit and every other word one unit.

Both sides of a pair are normalised by the *reference's* language, never by what the hypothesis looks like.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Languages scored per character: no spaces between words (zh, ja; yue is written in Chinese characters);
# Korean is spaced by eojeol, but ASR spacing of Korean is unreliable, so it is scored per character as well
# (the convention of Seed-TTS-eval and of the MagiHuman reimplementations, spec §9).
CHARACTER_LANGUAGES = frozenset({"zh", "yue", "ja", "ko"})
CHINESE_LANGUAGES = frozenset({"zh", "yue"})

# Language names and aliases the prompts may use -> ISO 639 code. The release lists Mandarin, Cantonese,
# English, Japanese, Korean, German and French (spec §9); a few common extras are accepted too. Keys are
# lower case with single spaces; `language_code` also reads BCP-47 tags (`zh-CN`, `en_US`) and parenthesised
# variants (`Chinese (Mandarin)`, `English (US)`).
LANGUAGE_CODES = {
    "english": "en", "en": "en", "eng": "en", "american english": "en", "british english": "en",
    "mandarin": "zh", "chinese": "zh", "mandarin chinese": "zh", "putonghua": "zh", "standard chinese": "zh",
    "simplified chinese": "zh", "traditional chinese": "zh", "zh": "zh", "zho": "zh", "chi": "zh", "cmn": "zh",
    "普通话": "zh", "中文": "zh", "汉语": "zh", "國語": "zh", "国语": "zh",
    "cantonese": "yue", "yue": "yue", "cantonese chinese": "yue", "粤语": "yue", "粵語": "yue", "廣東話": "yue",
    "广东话": "yue",
    "japanese": "ja", "ja": "ja", "jpn": "ja", "日本語": "ja",
    "korean": "ko", "ko": "ko", "kor": "ko", "한국어": "ko",
    "german": "de", "de": "de", "deu": "de", "ger": "de", "deutsch": "de",
    "french": "fr", "fr": "fr", "fra": "fr", "fre": "fr", "français": "fr", "francais": "fr",
    "spanish": "es", "es": "es", "spa": "es", "español": "es",
    "italian": "it", "it": "it", "ita": "it",
    "portuguese": "pt", "pt": "pt", "por": "pt",
    "russian": "ru", "ru": "ru", "rus": "ru",
}  # fmt: skip
KNOWN_LANGUAGES = frozenset(LANGUAGE_CODES.values())
NORMALIZERS = ("whisper", "basic")

_DIALOGUE_HEADER = re.compile(r"^\s*dialogue\s*:\s*(.*)$", re.IGNORECASE)
_SECTION_HEADER = re.compile(r"^\s*[A-Za-z][A-Za-z ]{0,40}:\s*$|^\s*background sound\s*:", re.IGNORECASE)
# `<speaker, language>: "text"` with ASCII, curly or CJK corner quotes; the speaker may itself hold commas.
_LINE = re.compile(r"<(?P<tag>[^<>]*)>\s*[:：]\s*(?P<quote>[\"“”「『'‘])(?P<text>.*?)[\"“”」』'’]?\s*$")
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'", "′": "'", "`": "'", "＇": "'"})
_KEEP = "\ue000"  # a private-use character (category Co): survives Whisper's symbol removal


@dataclass(frozen=True)
class DialogueLine:
    """One spoken line of a prompt."""

    speaker: str
    language: str  # ISO code when known (`en`, `zh`, ...), else the prompt's name lower-cased
    text: str


def language_code(name: str) -> str:
    """`"Mandarin"`, `"Chinese (Mandarin)"`, `"zh-CN"` -> `"zh"`; unknown names come back lower-cased.

    A parenthesised part is tried first (`Chinese (Cantonese)` -> `yue`), then the part before it, then the
    primary subtag of a BCP-47 tag.
    """
    key = " ".join(name.strip().lower().split())
    if key in LANGUAGE_CODES:
        return LANGUAGE_CODES[key]
    inner = re.fullmatch(r"(?P<outer>[^()（）]*)[(（](?P<inner>[^()（）]+)[)）]\s*", key)
    if inner:
        for part in (inner.group("inner"), inner.group("outer")):
            code = language_code(part) if part.strip() else ""
            if code in KNOWN_LANGUAGES:
                return code
    tag = re.fullmatch(r"([a-z]{2,3})(?:[-_][a-z0-9]+)+", key)
    if tag and tag.group(1) in LANGUAGE_CODES:
        return LANGUAGE_CODES[tag.group(1)]
    return key


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


def is_cjk(ch: str) -> bool:
    """Whether a character is scored as one unit (Han, kana, hangul)."""
    code = ord(ch)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x31F0 <= code <= 0x31FF  # katakana phonetic extensions
        or 0x3400 <= code <= 0x9FFF  # CJK unified ideographs (+ extension A)
        or 0xAC00 <= code <= 0xD7AF  # hangul syllables
        or 0x1100 <= code <= 0x11FF  # hangul jamo
        or 0x3130 <= code <= 0x318F  # hangul compatibility jamo
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0x20000 <= code <= 0x3FFFF  # CJK extensions B-H
    )


def scoring_unit(language: str | None, reference: str) -> str:
    """The unit a reference is scored in: `char` (zh/yue/ja/ko), `mixed` (CJK characters + other words, e.g.
    code-switched en+zh lines or an unknown language written partly in CJK) or `word`."""
    if language in CHARACTER_LANGUAGES:
        return "char"
    if language not in KNOWN_LANGUAGES and any(is_cjk(ch) for ch in reference):
        return "mixed"  # `mixed` (lines in several languages) or a name not in the table
    return "word"


@lru_cache(maxsize=1)
def _whisper():
    try:
        from whisper_normalizer.basic import BasicTextNormalizer
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as err:
        raise ValueError(
            "speech scoring needs the whisper-normalizer package: pip install -e '.[eval]'"
        ) from err
    return EnglishTextNormalizer(), BasicTextNormalizer()


@lru_cache(maxsize=1)
def _traditional_to_simplified():
    try:
        import opencc
    except ImportError as err:
        raise ValueError(
            "eval.asr.fold_chinese=true needs OpenCC's Python binding: pip install -e '.[eval]' (package opencc)"
        ) from err
    return opencc.OpenCC("t2s.json")


def _basic_keeping_apostrophes(text: str) -> str:
    """Whisper's basic normaliser, with apostrophes between two letters kept (`l'école`, `aujourd'hui`)."""
    protected = re.sub(r"(?<=\w)'(?=\w)", _KEEP, text)
    return _whisper()[1](protected).replace(_KEEP, "'")


def normalize_text(
    text: str, language: str | None = None, normalizer: str = "whisper", fold_chinese: bool = False
) -> str:
    """Normalise a reference or a transcript for scoring, by the reference's `language` (see the module docstring).

    `whisper` (default): Whisper's English normaliser for English, the apostrophe-keeping basic normaliser for
    every other language. `basic`: the apostrophe-keeping basic normaliser for every language, English too.
    `fold_chinese` maps traditional to simplified characters (OpenCC t2s) for zh / yue / mixed text.
    Whitespace is collapsed; character-scored text keeps its spaces here (`units` drops them).
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; use one of {NORMALIZERS}")
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    if fold_chinese and (language in CHINESE_LANGUAGES or language not in KNOWN_LANGUAGES):
        text = _traditional_to_simplified().convert(text)
    if normalizer == "whisper" and language == "en":
        return " ".join(_whisper()[0](text).split())
    return " ".join(_basic_keeping_apostrophes(text).split())


def units(normalized: str, unit: str) -> list[str]:
    """Scoring units of normalised text: words (`word`), or every CJK character plus every other word
    (`char` / `mixed`: a pure-CJK text becomes its characters)."""
    if unit == "word":
        return normalized.split()
    if unit not in ("char", "mixed"):
        raise ValueError(f"unknown scoring unit {unit!r}; use word, char or mixed")
    out: list[str] = []
    for word in normalized.split():
        run = ""
        for ch in word:
            if is_cjk(ch):
                if run:
                    out.append(run)
                    run = ""
                out.append(ch)
            else:
                run += ch
        if run:
            out.append(run)
    return out

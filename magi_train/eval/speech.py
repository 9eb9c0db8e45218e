"""Speech intelligibility of generated clips against the prompt's dialogue: WER (space-delimited languages), CER
(zh, yue, ja, ko) and mixed units (CJK characters + other words, for code-switched text), per clip and at
corpus level per language, per unit and overall.

Edit counts come from jiwer's `process_words` on the scoring units of `magi_train.eval.text.units`; corpus rates
are total edits / total reference units, never a mean of per-clip rates, with a bootstrap interval over clips.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from magi_train.eval.stats import Estimate, ratio_ci
from magi_train.eval.text import (
    KNOWN_LANGUAGES,
    extract_dialogue,
    normalize_text,
    reference_text,
    scoring_unit,
    units,
)

UNIT_NAMES = {"word": "words", "char": "characters", "mixed": "CJK characters + words"}
RATE_NAMES = {"word": "WER", "char": "CER", "mixed": "MER (mixed-unit error rate)"}


@dataclass
class SpeechScore:
    """One clip's transcript scored against its reference (counts after normalisation)."""

    clip_id: str
    language: str
    unit: str  # "word" | "char" | "mixed"
    reference: str  # normalised, units joined by spaces
    hypothesis: str  # normalised, units joined by spaces
    substitutions: int
    deletions: int
    insertions: int
    reference_units: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        return self.errors / self.reference_units

    def as_dict(self) -> dict:
        return {**asdict(self), "errors": self.errors, "rate": self.rate}

    @classmethod
    def from_dict(cls, d: dict) -> SpeechScore:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def score_transcript(
    clip_id: str,
    reference: str,
    hypothesis: str,
    language: str | None,
    normalizer: str = "whisper",
    fold_chinese: bool = False,
) -> SpeechScore | None:
    """Normalise both texts by the reference's language and count unit edits; None if the normalised reference
    is empty (nothing to score)."""
    import jiwer

    language = language or "unknown"
    ref = normalize_text(reference, language, normalizer, fold_chinese)
    hyp = normalize_text(hypothesis, language, normalizer, fold_chinese)
    unit = scoring_unit(language, ref)
    ref_units, hyp_units = units(ref, unit), units(hyp, unit)
    if not ref_units:
        return None
    ref_text, hyp_text = " ".join(ref_units), " ".join(hyp_units)
    if hyp_units:
        out = jiwer.process_words(ref_text, hyp_text)
        s, d, i = out.substitutions, out.deletions, out.insertions
    else:  # jiwer refuses an empty hypothesis: every reference unit is deleted
        s, d, i = 0, len(ref_units), 0
    return SpeechScore(clip_id, language, unit, ref_text, hyp_text, s, d, i, len(ref_units))


def prompt_reference(prompt: str) -> tuple[str, str | None]:
    """(reference text, language) of a prompt's dialogue; ("", None) without dialogue."""
    return reference_text(extract_dialogue(prompt))


def unit_label(units_seen: set[str]) -> str:
    """`words`, `characters`, ... or `mixed: words + characters` when a row adds different units."""
    if len(units_seen) == 1:
        return UNIT_NAMES[next(iter(units_seen))]
    return "mixed: " + " + ".join(UNIT_NAMES[u] for u in sorted(units_seen)) if units_seen else "none"


def aggregate(scores: Iterable[SpeechScore], **bootstrap_kwargs) -> dict[str, dict]:
    """Corpus-level rates: `{"overall": ..., "by_unit": {unit: ...}, "by_language": {lang: ...}}`.

    Each entry has `rate` (an Estimate: total edits / total reference units with a bootstrap interval over
    clips), `errors`, `units`, `clips`, `unit` (`word`, `char`, `mixed` or `mixed:word+char` when a row adds
    different units) and `unit_label` (what the units are, for tables). Languages not in the name table are
    listed in `unknown_languages` (scored by the script of their reference).
    """
    scores = list(scores)

    def summary(group: list[SpeechScore]) -> dict:
        seen = {s.unit for s in group}
        est: Estimate = ratio_ci(
            [s.errors for s in group], [s.reference_units for s in group], **bootstrap_kwargs
        )
        return {
            "rate": est.as_dict(),
            "errors": sum(s.errors for s in group),
            "units": sum(s.reference_units for s in group),
            "clips": len(group),
            "unit": seen.pop() if len(seen) == 1 else ("mixed:" + "+".join(sorted(seen)) if seen else None),
            "unit_label": unit_label({s.unit for s in group}),
        }

    languages = sorted({s.language for s in scores})
    return {
        "overall": summary(scores),
        "by_unit": {u: summary([s for s in scores if s.unit == u]) for u in sorted({s.unit for s in scores})},
        "by_language": {lang: summary([s for s in scores if s.language == lang]) for lang in languages},
        "unknown_languages": [lang for lang in languages if lang not in KNOWN_LANGUAGES and lang != "mixed"],
    }

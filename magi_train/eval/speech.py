"""Speech intelligibility of generated clips: WER (space-delimited languages) / CER (zh, yue, ja, ko) against
the prompt's dialogue, per clip and corpus-level per language and overall.

Edit counts come from jiwer (`process_words` / `process_characters`); corpus rates are total edits / total
reference units (words or characters), never a mean of per-clip rates, with a bootstrap interval over clips.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from magi_train.eval.stats import Estimate, ratio_ci
from magi_train.eval.text import extract_dialogue, normalize_text, reference_text, uses_characters


@dataclass
class SpeechScore:
    """One clip's transcript scored against its reference (counts after normalisation)."""

    clip_id: str
    language: str
    unit: str  # "word" | "char"
    reference: str  # normalised
    hypothesis: str  # normalised
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


def score_transcript(
    clip_id: str, reference: str, hypothesis: str, language: str, normalizer: str = "basic"
) -> SpeechScore | None:
    """Normalise both texts and count word (or character, for zh/yue/ja/ko) edits; None if the reference is empty."""
    import jiwer

    ref = normalize_text(reference, language, normalizer)
    hyp = normalize_text(hypothesis, language, normalizer)
    if not ref:
        return None
    by_char = uses_characters(language, ref)
    if by_char:
        ref, hyp = "".join(ref.split()), "".join(hyp.split())
        out = jiwer.process_characters(ref, hyp)
    else:
        out = jiwer.process_words(ref, hyp)
    units = out.hits + out.substitutions + out.deletions
    return SpeechScore(
        clip_id, language, "char" if by_char else "word", ref, hyp,
        out.substitutions, out.deletions, out.insertions, units,
    )  # fmt: skip


def prompt_reference(prompt: str) -> tuple[str, str | None]:
    """(reference text, language) of a prompt's dialogue; ("", None) without dialogue."""
    return reference_text(extract_dialogue(prompt))


def aggregate(scores: Iterable[SpeechScore], **bootstrap_kwargs) -> dict[str, dict]:
    """Corpus-level rates: `{"overall": ..., "by_language": {lang: ...}}`.

    Each entry has `rate` (an Estimate: total edits / total reference units with a bootstrap interval over
    clips), `errors`, `units`, `clips` and `unit` ("word", "char" or "mixed" for the overall row).
    """
    scores = list(scores)

    def summary(group: list[SpeechScore]) -> dict:
        units = {s.unit for s in group}
        est: Estimate = ratio_ci(
            [s.errors for s in group], [s.reference_units for s in group], **bootstrap_kwargs
        )
        return {
            "rate": est.as_dict(),
            "errors": sum(s.errors for s in group),
            "units": sum(s.reference_units for s in group),
            "clips": len(group),
            "unit": units.pop() if len(units) == 1 else ("mixed" if units else None),
        }

    languages = sorted({s.language for s in scores})
    return {
        "overall": summary(scores),
        "by_language": {lang: summary([s for s in scores if s.language == lang]) for lang in languages},
    }

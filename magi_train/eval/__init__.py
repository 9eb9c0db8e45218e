"""Evaluation (recipe `evaluate`): VideoScore2-style scores, ASR WER/CER, lip sync, preference studies, latency.

Light imports only; the Lightning callback lives in `magi_train.eval.callback`, the runner in `.runner`.
"""

from magi_train.eval.asr import ASR_BACKENDS, ASRBackend, load_asr
from magi_train.eval.preference import (
    Judgement,
    bradley_terry,
    judgements_from_sheet,
    pairwise_rates,
    preference_report,
    rater_agreement,
    read_judgements,
    write_pair_sheet,
)
from magi_train.eval.speech import SpeechScore, aggregate, prompt_reference, score_transcript
from magi_train.eval.stats import Estimate, bootstrap, clustered_mean_ci, mean_ci, paired_difference, ratio_ci
from magi_train.eval.suite import SuitePrompt, load_suite, suite_prompts
from magi_train.eval.text import DialogueLine, extract_dialogue, normalize_text
from magi_train.eval.videoscore import (
    DIMENSIONS,
    ProxyScorer,
    VideoScore2Scorer,
    VideoScorer,
    VideoScores,
    authors_soft_score,
    load_scorer,
    parse_scores,
)

__all__ = [
    "ASR_BACKENDS",
    "DIMENSIONS",
    "ASRBackend",
    "DialogueLine",
    "Estimate",
    "Judgement",
    "ProxyScorer",
    "SpeechScore",
    "SuitePrompt",
    "VideoScore2Scorer",
    "VideoScorer",
    "VideoScores",
    "aggregate",
    "bootstrap",
    "authors_soft_score",
    "bradley_terry",
    "clustered_mean_ci",
    "extract_dialogue",
    "judgements_from_sheet",
    "load_asr",
    "load_scorer",
    "load_suite",
    "mean_ci",
    "normalize_text",
    "paired_difference",
    "pairwise_rates",
    "parse_scores",
    "preference_report",
    "prompt_reference",
    "rater_agreement",
    "ratio_ci",
    "read_judgements",
    "score_transcript",
    "suite_prompts",
    "write_pair_sheet",
]

"""Inference: from checkpoints to an mp4 with sound (recipe `generate`)."""

from magi_train.inference.checkpoints import LoadedDiT, load_dit
from magi_train.inference.generate import (
    RELEASED_NEGATIVE_PROMPT,
    GenerateResult,
    Pipeline,
    generate,
    load_pipeline,
    load_text_features,
    run_generate,
)

__all__ = [
    "RELEASED_NEGATIVE_PROMPT",
    "GenerateResult",
    "LoadedDiT",
    "Pipeline",
    "generate",
    "load_dit",
    "load_pipeline",
    "load_text_features",
    "run_generate",
]

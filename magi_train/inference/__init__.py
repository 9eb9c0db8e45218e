"""Inference: from checkpoints to an mp4 with sound (recipe `generate`). DiTs load with `models/weights.py`."""

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
    "Pipeline",
    "generate",
    "load_pipeline",
    "load_text_features",
    "run_generate",
]

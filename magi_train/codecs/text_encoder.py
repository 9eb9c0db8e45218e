"""T5-Gemma encoder (transformers T5GemmaEncoderModel) text features as in the MagiHuman release."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from magi_train.codecs.frozen import FrozenModule

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 640
TEXT_HIDDEN_SIZE = 3584  # google/t5gemma-9b-9b-ul2 encoder; TextEncoder reads it from the config


def pad_text_features(
    features: Sequence[torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt `[L_i, D]` features -> zero-padded `[B, length or max L_i, D]` and lengths `[B]` (int64)."""
    if not features:
        raise ValueError("need at least one text feature tensor")
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    length = int(lengths.max()) if length is None else length
    if int(lengths.max()) > length:
        raise ValueError(f"a text feature has {int(lengths.max())} tokens, more than length={length}")
    out = features[0].new_zeros(len(features), length, features[0].shape[-1])
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
    return out, lengths


class TextEncoder(FrozenModule):
    """Frozen T5-Gemma encoder: prompts -> per-prompt features `[L_i, D]` fp32 with only real tokens."""

    def __init__(self, tokenizer: Any, model: Any):
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # padding ids are masked out, any id will do
            tokenizer.pad_token = tokenizer.eos_token
        # Right padding keeps every real token at positions 0..n-1, as when a prompt is encoded alone
        # (Gemma's tokenizer pads on the left by default).
        tokenizer.padding_side = "right"
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> TextEncoder:
        """Load tokenizer + `T5GemmaEncoderModel` from a local directory (encoder-only or full T5-Gemma)."""
        from transformers import AutoTokenizer, T5GemmaEncoderModel
        from transformers.utils import logging as hf_logging

        path = Path(path)
        config_file = path / "config.json"
        if not path.is_dir() or not config_file.is_file():
            raise ValueError(
                f"text encoder directory {str(path)!r} not found or has no config.json: expected a "
                "transformers T5-Gemma folder (e.g. google/t5gemma-9b-9b-ul2) with its tokenizer"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "t5gemma":
            raise ValueError(f"{str(path)!r} holds model_type {model_type!r}, expected 't5gemma'")
        # The released checkpoint is encoder-decoder; like the release, load only its encoder. Its decoder
        # weights are then "unexpected": silence that report and check for missing encoder weights instead.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model, info = T5GemmaEncoderModel.from_pretrained(
                path, is_encoder_decoder=False, dtype=dtype, local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"could not load a T5-Gemma encoder and tokenizer from {str(path)!r}: {err}"
            ) from err
        finally:
            hf_logging.set_verbosity(verbosity)
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{str(path)!r} lacks {len(missing)} encoder weights, e.g. {missing[:3]}")
        if info.get("unexpected_keys"):
            log.info("ignored %d non-encoder weights in %s", len(info["unexpected_keys"]), path)
        return cls(tokenizer, model.to(device))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.encoder.hidden_size)

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], max_tokens: int = MAX_TEXT_TOKENS, batch_size: int = 8
    ) -> list[torch.Tensor]:
        """Prompts -> list of `[min(n_i, max_tokens), hidden]` fp32 features, one per prompt, no padding rows.

        As in the release, each prompt is tokenised in full (default special tokens, no truncation), encoded,
        cast through fp16, then cut to `max_tokens`. Prompts are batched with right padding and an attention
        mask, so a prompt's features do not depend on its batch mates.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single string")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            tokens = self.tokenizer(batch, padding=True, return_tensors="pt")
            mask = tokens["attention_mask"].to(self.device)
            hidden = self.model(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask)
            hidden = hidden.last_hidden_state.half().float()
            for row, n in zip(hidden, mask.sum(dim=1).tolist(), strict=True):
                out.append(row[: min(int(n), max_tokens)].clone())
        return out

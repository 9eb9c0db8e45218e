"""Pluggable ASR backends that transcribe generated speech, each loaded from a local directory (never downloaded).

- `glm_asr`: GLM-ASR-Nano through transformers (`GlmAsrForConditionalGeneration`), the paper's choice (spec §9);
- `whisper` / `transformers`: any transformers speech-recognition model (Whisper, ...) through the ASR pipeline;
- `pocketsphinx`: CMU PocketSphinx with the English model shipped inside the PyPI package: needs no
  download, so it is the offline backend of tests and smoke runs (English only, far weaker than the others).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class ASRBackend(Protocol):
    """Transcribes mono float32 audio at `sample_rate`; `languages` is None when any language is supported."""

    name: str
    sample_rate: int
    languages: frozenset[str] | None

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> str: ...


def _local_dir(path: str | Path | None, what: str, expects: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{what} needs a local model directory (eval.asr.path) holding {expects}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{what} model directory {str(path)!r} not found; it should hold {expects}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} model directory {str(path)!r} has no config.json; it should hold {expects}")
    return path


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


class PocketSphinxASR:
    """PocketSphinx 5 decoder; by default its built-in US English acoustic model, dictionary and language model.

    `path` may instead name a directory with a custom model: the acoustic model files (mdef, means, ...)
    under `acoustic-model/` or at the top, one `*.dict` pronunciation dictionary and one `*.lm.bin`/`*.lm`.
    """

    name = "pocketsphinx"
    sample_rate = 16000  # the built-in acoustic model is trained on 16 kHz speech
    languages = frozenset({"en"})

    def __init__(self, path: str | Path | None = None):
        try:
            from pocketsphinx import Decoder
        except ImportError as err:
            raise ValueError("the pocketsphinx ASR backend needs: pip install -e '.[eval]'") from err
        kwargs: dict[str, str] = {}
        if path:
            root = Path(path)
            hmm = root / "acoustic-model" if (root / "acoustic-model").is_dir() else root
            dicts, lms = (
                sorted(root.glob("*.dict")),
                sorted(root.glob("*.lm.bin")) + sorted(root.glob("*.lm")),
            )
            if not (hmm / "mdef").is_file() or not dicts or not lms:
                raise ValueError(
                    f"pocketsphinx model directory {str(root)!r} must hold an acoustic model (mdef, ...), "
                    "a *.dict and a *.lm.bin; leave eval.asr.path empty for the built-in English model"
                )
            kwargs = {"hmm": str(hmm), "dict": str(dicts[0]), "lm": str(lms[0])}
        self._decoder = Decoder(samprate=self.sample_rate, loglevel="FATAL", **kwargs)

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> str:
        if language not in (None, "en"):
            raise ValueError(f"pocketsphinx's model is English only, got language {language!r}")
        pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype("<i2").tobytes()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


class TransformersASR:
    """Any transformers speech-recognition model (Whisper, ...) through `pipeline("automatic-speech-recognition")`.

    Audio longer than 30 s is transcribed in 30-second chunks (Whisper's window).
    """

    languages = None

    def __init__(self, path: str | Path, device: str = "auto", dtype: str = "auto", name: str = "whisper"):
        from transformers import pipeline

        self.name = name
        root = _local_dir(
            path, f"the {name} ASR backend", "a transformers ASR model (config.json, weights, processor)"
        )
        device = _resolve_device(device)
        self._pipe = pipeline(
            "automatic-speech-recognition",
            model=str(root),
            device=device,
            dtype=_resolve_dtype(dtype, device),
        )
        self.sample_rate = int(self._pipe.feature_extractor.sampling_rate)
        self._is_whisper = self._pipe.model.config.model_type == "whisper"

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> str:
        kwargs: dict = {}
        gen = self._pipe.model.generation_config
        if self._is_whisper and getattr(gen, "is_multilingual", False) and getattr(gen, "lang_to_id", None):
            # multilingual Whisper: transcribe (never translate) in the clip's language; English-only models
            # take neither argument
            generate_kwargs = {"task": "transcribe"}
            if language and f"<|{language}|>" in gen.lang_to_id:
                generate_kwargs["language"] = language
            kwargs["generate_kwargs"] = generate_kwargs
        if len(audio) > 30 * self.sample_rate:
            kwargs["chunk_length_s"] = 30
        out = self._pipe(
            {"raw": np.asarray(audio, dtype=np.float32), "sampling_rate": self.sample_rate}, **kwargs
        )
        return str(out["text"]).strip()


class GlmASR:
    """GLM-ASR-Nano (`zai-org/GLM-ASR-Nano-2512` layout) through transformers' GlmAsr classes, greedy decoding."""

    name = "glm_asr"
    languages = None

    def __init__(
        self, path: str | Path, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 500
    ):
        from transformers import AutoProcessor, GlmAsrForConditionalGeneration

        root = _local_dir(path, "the glm_asr backend", "GLM-ASR-Nano (config.json, weights, processor files)")
        self._device = _resolve_device(device)
        self._processor = AutoProcessor.from_pretrained(str(root))
        self._model = GlmAsrForConditionalGeneration.from_pretrained(
            str(root), dtype=_resolve_dtype(dtype, self._device)
        ).to(self._device)
        self._model.eval()
        self.sample_rate = int(self._processor.feature_extractor.sampling_rate)
        self.max_new_tokens = max_new_tokens

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> str:
        import torch

        inputs = self._processor.apply_transcription_request(np.asarray(audio, dtype=np.float32))
        inputs = inputs.to(self._device, dtype=self._model.dtype)
        with torch.inference_mode():
            out = self._model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self._processor.batch_decode(new_tokens, skip_special_tokens=True, strip_prefix=True)[
            0
        ].strip()


ASR_BACKENDS = ("pocketsphinx", "whisper", "transformers", "glm_asr", "none")


def load_asr(
    backend: str, path: str | None = None, device: str = "auto", dtype: str = "auto"
) -> ASRBackend | None:
    """Build an ASR backend by name (`none` -> None: speech is not scored)."""
    if backend == "none":
        return None
    if backend == "pocketsphinx":
        return PocketSphinxASR(path)
    if backend in ("whisper", "transformers"):
        return TransformersASR(path, device=device, dtype=dtype, name=backend)
    if backend == "glm_asr":
        return GlmASR(path, device=device, dtype=dtype)
    raise ValueError(f"unknown ASR backend {backend!r}; choose one of {ASR_BACKENDS}")

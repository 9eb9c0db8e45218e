"""Tiny randomly initialised VideoScore2 (Qwen2.5-VL classes) and Whisper directories for offline tests.

`write_tiny_videoscore2` saves what a local copy of VideoScore2 holds, at toy size: a
`Qwen2_5_VLForConditionalGeneration` (1 text layer, 1 vision block, real patch 14 / merge 2 / temporal patch 2),
a `Qwen2Tokenizer` with the real Qwen2 pre-tokenizer and a small byte-level BPE vocabulary (trained offline
with `tokenizers` on the VideoScore2 query, Qwen special tokens) and a minimal Qwen chat template, and, where torchvision is installed, the
`Qwen2_5_VLProcessor` (transformers 5 builds every video processor on torchvision; without it the processor
cannot be constructed at all). Its answers are noise unless a test trains it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]  # fmt: skip

# Qwen2-VL's chat layout (`<|im_start|>role\n...<|im_end|>\n`, vision placeholders between vision_start/end).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 700):
    """A Qwen2Tokenizer (Qwen2's pre-tokenizer, byte-level BPE) trained on VideoScore2's query and answer
    format, so that the long query is a few hundred tokens; special tokens as in Qwen2; with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from magi_train.eval.videoscore import VS2_QUERY_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(False, False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    corpus = VS2_QUERY_TEMPLATE.splitlines() + [
        "visual quality: 4; text-to-video alignment: 3, physical/common-sense consistency: 5",
        "a woman speaks to the camera in a bright kitchen. Dialogue: Background Sound:",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(corpus * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def torchvision_available() -> bool:
    """Whether torchvision imports (transformers' Qwen2-VL video processor needs it)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        return False
    return True


def build_tiny_processor(tokenizer=None):
    """The Qwen2_5_VLProcessor around the tiny tokenizer (needs torchvision), toy frame sizes."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    small = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}  # toy frame sizes keep tests fast
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=small),
        tokenizer=tokenizer or build_tiny_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(size=small),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(tokenizer, seed: int = 0):
    """A tiny random Qwen2_5_VLForConditionalGeneration whose special-token ids match `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tok)
    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == head_dim
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def write_tiny_videoscore2(path: str | Path, seed: int = 0, model=None, tokenizer=None) -> Path:
    """Save a tiny VideoScore2-layout directory at `path` (atomic; idempotent unless a model is given).

    Holds the model, the tokenizer (with chat template) and, with torchvision, the processor files.
    """
    path = Path(path)
    if model is None and (path / ".complete").is_file():
        return path
    tokenizer = tokenizer or build_tiny_tokenizer()
    model = model or build_tiny_model(tokenizer, seed)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if torchvision_available():
        build_tiny_processor(tokenizer).save_pretrained(tmp)
    (tmp / ".complete").touch()
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def write_tiny_whisper(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random multilingual `WhisperForConditionalGeneration` + `WhisperProcessor` (byte-level vocabulary,
    Whisper's special tokens, a generation config with language and task ids) for the `whisper` ASR backend."""
    from tokenizers import pre_tokenizers
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    path = Path(path)
    if (path / ".complete").is_file():
        return path
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    languages = ["en", "zh", "ja", "ko", "de", "fr", "yue"]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{x}|>" for x in languages], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]  # fmt: skip
    for k, tok in enumerate(specials):
        vocab[tok] = 256 + k
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, encoder_layers=1, decoder_layers=1, d_model=32,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=64, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    gen = model.generation_config
    gen._from_model_config = False  # else from_pretrained rebuilds it from the model config, without the ids
    gen.decoder_start_token_id = ids["<|startoftranscript|>"]
    gen.eos_token_id = gen.pad_token_id = ids["<|endoftext|>"]
    gen.lang_to_id = {f"<|{x}|>": ids[f"<|{x}|>"] for x in languages}
    gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    gen.no_timestamps_token_id, gen.is_multilingual, gen.max_length = ids["<|notimestamps|>"], True, 24
    gen.forced_decoder_ids, gen.suppress_tokens, gen.begin_suppress_tokens = None, [], []
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    )
    processor.save_pretrained(tmp)
    (tmp / ".complete").touch()
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path

"""Tiny randomly initialised codecs of the released classes, written to local directories (smoke runs, tests).

No weights can be downloaded in smoke runs or CI, so `write_tiny_codecs` saves micro instances of the same
classes the real pipeline loads (diffusers AutoencoderKLWan and AutoencoderOobleck, transformers
T5GemmaEncoderModel with a SentencePiece Gemma tokenizer). They keep everything that fixes shapes and
timing: 48 latent channels with 16x16x4 strides for video, 64 latent channels with a hop of 2048 samples
at 51.2 kHz (25 latents per second) for audio, and 3584-wide text features. Their outputs are noise.
`turbo_vae/` is a tiny TurboVAED (the release's light decoder, magi_train/codecs/turbo_vae.py) in the released
checkpoint layout, with windows of 3 then 2 latent frames so that short clips already decode in several windows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from magi_train.codecs.audio_vae import AUDIO_LATENT_CHANNELS, EFFECTIVE_SAMPLE_RATE, HOP
from magi_train.codecs.text_encoder import TEXT_HIDDEN_SIZE
from magi_train.codecs.turbo_vae import TurboVAEConfig, TurboVAED, save_turbo_vae
from magi_train.codecs.video_vae import VIDEO_LATENT_CHANNELS
from magi_train.utils.fileio import atomic_dir

# Wan2.2 layout at toy width: patch 2 + three 2x downsamplings = 16x spatial, two temporal = 4x.
TINY_WAN = dict(
    base_dim=16, decoder_base_dim=24, z_dim=VIDEO_LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
    temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    scale_factor_spatial=16, scale_factor_temporal=4,
)  # fmt: skip
# Oobleck with the released hop: 2*4*4*8*8 = 2048 samples per latent (Stable Audio Open strides).
TINY_OOBLECK = dict(
    encoder_hidden_size=2 * AUDIO_LATENT_CHANNELS, downsampling_ratios=[2, 4, 4, 8, 8], channel_multiples=[1, 1, 1, 1, 1],
    decoder_channels=4, decoder_input_channels=AUDIO_LATENT_CHANNELS, audio_channels=2,
    sampling_rate=EFFECTIVE_SAMPLE_RATE,
)  # fmt: skip
# TurboVAED with the released block layout (3 upsampling blocks, the second spatial only) at toy width
TINY_TURBO = dict(
    decoder_block_out_channels=[8, 8, 16, 16], decoder_layers_per_block=[1, 1, 1, 1, 1], first_chunk_size=3,
    step_size=2,
)  # fmt: skip
TINY_T5GEMMA = dict(
    vocab_size=128, hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
    max_position_embeddings=1024,
)  # fmt: skip
_SENTENCES = [
    "a woman speaks to the camera in a bright kitchen",
    "the quick brown fox jumps over the lazy dog",
    "dialogue: the man says hello world in english",
    "background sound: rain on the window and distant thunder",
    "a close up of a cat sleeping on a sofa",
]


def write_tiny_tokenizer(path: Path) -> None:
    """A 100-piece SentencePiece BPE model with a Gemma tokenizer config (what T5-Gemma directories ship)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 10), model_writer=model, vocab_size=100, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _save_atomic(path: Path, write) -> None:
    """Write a model directory under a temporary name, then rename it into place (skipped once complete)."""
    if (path / ".complete").is_file():
        return

    def complete(tmp: Path) -> None:
        write(tmp)
        (tmp / ".complete").touch()

    atomic_dir(path, complete, overwrite=True)  # a directory without `.complete` is replaced


def write_tiny_codecs(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny `video_vae/`, `audio_vae/`, `text_encoder/` and `turbo_vae/` directories under `root` (idempotent).

    Returns their paths keyed by name; each loads with `VideoVAE`, `AudioVAE`, `TextEncoder` and
    `TurboVAE.from_pretrained`.
    """
    import diffusers
    import transformers

    root = Path(root)
    paths = {name: root / name for name in ("video_vae", "audio_vae", "text_encoder", "turbo_vae")}
    torch.manual_seed(seed)
    write_tiny_video_vae(paths["video_vae"], seed)
    _save_atomic(
        paths["audio_vae"], lambda p: diffusers.AutoencoderOobleck(**TINY_OOBLECK).save_pretrained(p)
    )

    def text(p: Path) -> None:
        config = transformers.T5GemmaConfig(
            encoder=TINY_T5GEMMA, decoder=TINY_T5GEMMA, is_encoder_decoder=False, vocab_size=128
        )
        transformers.T5GemmaEncoderModel(config).save_pretrained(p)
        write_tiny_tokenizer(p)

    _save_atomic(paths["text_encoder"], text)
    _save_atomic(paths["turbo_vae"], lambda p: write_tiny_turbo_vae(p, seed))
    assert HOP == 2 * 4 * 4 * 8 * 8
    return paths


def write_tiny_turbo_vae(path: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny random TurboVAED in the released layout (config json + checkpoint with `ema_state_dict`) at `path`."""
    torch.manual_seed(seed)
    model = TurboVAED(TurboVAEConfig(**{**TINY_TURBO, **overrides}))
    return save_turbo_vae(path, model)


def write_tiny_video_vae(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Wan2.2-layout `AutoencoderKLWan` directory at `path` (kept once complete)."""
    import diffusers

    path = Path(path)
    torch.manual_seed(seed)
    _save_atomic(path, lambda p: diffusers.AutoencoderKLWan(**TINY_WAN).save_pretrained(p))
    return path

"""T5-Gemma text encoder on a tiny random T5GemmaEncoderModel and a SentencePiece tokenizer (spec §4.3)."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from magi_train.codecs import TextEncoder, pad_text_features  # noqa: E402
from magi_train.codecs.tiny import write_tiny_tokenizer  # noqa: E402

MODULE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
    max_position_embeddings=256,
)  # fmt: skip
PROMPTS = ["a cat", "a woman speaks to the camera in a bright kitchen while rain falls on the window"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("t5gemma_encoder")
    config = transformers.T5GemmaConfig(
        encoder=MODULE, decoder=MODULE, is_encoder_decoder=False, vocab_size=128
    )
    transformers.T5GemmaEncoderModel(config).save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return TextEncoder.from_pretrained(encoder_dir, dtype=torch.float32)


def _release_features(encoder, prompt):
    """What the release computes: one prompt, default special tokens, no mask, fp16 then fp32."""
    tokens = encoder.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        return encoder.model(input_ids=tokens["input_ids"]).last_hidden_state[0].half().float()


def test_per_prompt_features_have_only_real_tokens(encoder):
    feats = encoder.encode(PROMPTS)
    lengths = [len(encoder.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert lengths[0] < lengths[1]
    assert [tuple(f.shape) for f in feats] == [(n, 32) for n in lengths]
    assert all(f.dtype == torch.float32 for f in feats)
    assert encoder.hidden_size == 32
    # Padding in the batch does not leak: each prompt matches the release's unbatched computation.
    for prompt, feat in zip(PROMPTS, feats, strict=True):
        torch.testing.assert_close(feat, _release_features(encoder, prompt), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(feat, encoder.encode([prompt])[0], atol=2e-3, rtol=1e-3)


def test_trim_to_max_tokens(encoder):
    full = encoder.encode(PROMPTS)
    trimmed = encoder.encode(PROMPTS, max_tokens=5)
    assert [f.shape[0] for f in trimmed] == [min(5, f.shape[0]) for f in full]
    torch.testing.assert_close(trimmed[1], full[1][:5])


def test_outputs_pass_through_fp16(encoder_dir):
    enc = TextEncoder.from_pretrained(encoder_dir)  # default bf16 weights, as the release
    assert enc.model.dtype == torch.bfloat16
    (feat,) = enc.encode(["a cat sleeping"])
    assert feat.dtype == torch.float32
    assert torch.equal(feat, feat.half().float())


def test_loads_the_encoder_of_a_full_encoder_decoder_checkpoint(tmp_path, encoder_dir):
    # The released text model is a full T5-Gemma checkpoint; only its encoder is loaded.
    torch.manual_seed(1)
    full = transformers.T5GemmaModel(
        transformers.T5GemmaConfig(encoder=MODULE, decoder=MODULE, vocab_size=128)
    )
    full.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    enc = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    ids = enc.tokenizer(["a cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = full.get_encoder()(input_ids=ids).last_hidden_state[0].half().float()
    torch.testing.assert_close(enc.encode(["a cat"])[0], expected)


def test_missing_or_wrong_directory(tmp_path):
    with pytest.raises(ValueError, match="no_text_model"):
        TextEncoder.from_pretrained(tmp_path / "no_text_model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="t5gemma"):
        TextEncoder.from_pretrained(tmp_path)


def test_rejects_a_single_string(encoder):
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode("a cat")


def test_pad_text_features():
    feats = [torch.ones(3, 4), torch.full((5, 4), 2.0)]
    padded, lengths = pad_text_features(feats, length=6)
    assert padded.shape == (2, 6, 4) and lengths.tolist() == [3, 5]
    assert padded[0, 3:].abs().sum() == 0 and torch.equal(padded[1, :5], feats[1])
    assert pad_text_features(feats)[0].shape == (2, 5, 4)
    with pytest.raises(ValueError, match="more than length=4"):
        pad_text_features(feats, length=4)

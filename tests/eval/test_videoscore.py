"""VideoScore2 backend on a tiny random Qwen2_5_VLForConditionalGeneration (loading, greedy generation with a
video, answer parsing, soft scores at the digit positions), the parser on realistic answers, and the proxy."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_train.eval.videoscore import (
    ProxyScorer,
    VideoScore2Scorer,
    authors_soft_score,
    load_scorer,
    parse_scores,
    query_messages,
    query_text,
    soft_score,
    upstream_parse,
)
from tests.fixtures.tiny_models import (
    build_tiny_model,
    build_tiny_tokenizer,
    torchvision_available,
    write_tiny_videoscore2,
)

# The authors' regex (TIGER-AI-Lab/VideoScore2 eval/eval_vs2.py), to show which answers it misses.
UPSTREAM = (
    r"visual quality:\s*(\d+).*?text-to-video alignment:\s*(\d+).*?physical/common-sense consistency:\s*(\d+)"
)

ANSWERS = [
    # (answer, expected hard scores, does the upstream regex get them?)
    (
        "visual quality: 4;\ntext-to-video alignment: 3,\nphysical/common-sense consistency: 5",
        (4, 3, 5),
        True,
    ),
    (
        "<think>The frames are sharp but the hand merges with the cup. For visual quality: the resolution is "
        "high. Text-to-video alignment: the cat is there.</think>\nvisual quality: 4; text-to-video alignment: 5, "
        "physical/common-sense consistency: 2",
        (4, 5, 2),
        True,
    ),
    ("visual quality: 4; text-to-video alignment: 4, physical consistency: 3", (4, 4, 3), False),
    (
        "**Visual Quality**: 3\n**Text-to-Video Alignment**: 4\n**Physical/Common-sense Consistency**: 2",
        (3, 4, 2),
        False,
    ),
    (
        "visual quality: <5>;\ntext-to-video alignment: <4>,\nphysical/common-sense consistency: <4>",
        (5, 4, 4),
        False,
    ),
    ("Visual quality score: 4/5. Text alignment: 3/5. Physical consistency: 4/5.", (4, 3, 4), False),
    ("visual quality: 4.0; t2v_alignment: 2.0, commonsense consistency: 1.0", (4, 2, 1), False),
]


@pytest.mark.parametrize("answer,expected,upstream_ok", ANSWERS)
def test_parser_on_realistic_answers(answer, expected, upstream_ok):
    parsed = parse_scores(answer)
    assert (
        tuple(parsed[d].value for d in ("visual_quality", "text_alignment", "physical_consistency"))
        == expected
    )
    for hit in parsed.values():
        assert answer[hit.start] == str(hit.value)  # offsets point at the digit (soft scores need them)
    assert (re.search(UPSTREAM, answer, re.DOTALL | re.IGNORECASE) is not None) == upstream_ok


def test_upstream_regex_is_recorded():
    assert upstream_parse(ANSWERS[0][0]) == (4, 3, 5) and upstream_parse(ANSWERS[2][0]) is None


def test_parser_rejects_non_scores():
    assert parse_scores("I cannot evaluate this video.") == {}
    parsed = parse_scores(
        "visual quality: 4.5; text-to-video alignment: 45, physical/common-sense consistency: 0"
    )
    assert parsed == {}  # 4.5, 45 and 0 are not integer 1-5 scores
    thinking_only = parse_scores("<think>visual quality: 2 maybe</think> I am not sure.")
    assert thinking_only == {}  # labels inside the reasoning do not count once it is closed


def test_prompt_is_the_upstream_training_template():
    """The query equals TIGER-AI-Lab/VideoScore2 data/data_sft.py INPUT_TEMPLATE (stored in tests/eval/data with
    its commit), the text the SFT rows put after "<video>"; the older benchmark query is an option only."""
    upstream = json.loads((Path(__file__).parent / "data/videoscore2_input_template.json").read_text())
    prompt = "A playful kitten pounces on a dangling string"
    assert query_text(prompt) == upstream["template"].replace("$t2v_prompt", prompt)
    assert query_text(prompt) != query_text(prompt, "benchmark") and "DO NOT include" in query_text(
        prompt, "benchmark"
    )
    content = query_messages(prompt)[0]["content"]
    assert [c["type"] for c in content] == ["video", "text"]  # "<video>" precedes the text in training
    with pytest.raises(ValueError, match="unknown VideoScore2 prompt template"):
        query_text(prompt, "v0")


def _upstream_normed(probs):
    """The authors' ll_based_soft_score_normed (vs2_inference.py), restated: the digit with the largest
    probability times that probability over the digits' total."""
    best = max(range(5), key=lambda k: probs[k])
    return (best + 1) * probs[best] / sum(probs)


@pytest.mark.parametrize(
    "probs", [[0, 0, 0, 0.2, 0.8], [0.1, 0.2, 0.4, 0.2, 0.1], [0.05, 0.05, 0.3, 0.3, 0.3], [1, 0, 0, 0, 0]]
)
def test_authors_soft_score_equals_their_formula(probs):
    assert authors_soft_score(probs) == pytest.approx(_upstream_normed(probs))
    scaled = [3 * p for p in probs]  # unnormalised probabilities (a digit subset of the vocabulary)
    assert authors_soft_score(scaled) == pytest.approx(_upstream_normed(probs))


def test_soft_score_formulas_on_logits():
    ids = [3, 4, 5, 6, 7]
    logits = torch.full((10,), -1e9)
    logits[6], logits[7] = math.log(0.2), math.log(0.8)  # p(4) = 0.2, p(5) = 0.8
    assert soft_score(logits, ids) == pytest.approx(4.00)  # the authors' default: 5 * 0.8
    assert soft_score(logits, ids, "expected") == pytest.approx(4.80)
    logits[9] = 50.0  # a non-digit token dominating the vocabulary does not matter: renormalised over 1-5
    assert soft_score(logits, ids) == pytest.approx(4.00)
    processed = logits.clone()
    processed[[3, 4, 5, 6]] = -float("inf")  # top-k filtering of sampling: filtered digits have p = 0
    assert soft_score(processed, ids) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown soft score"):
        soft_score(logits, ids, "mean")


@pytest.fixture(scope="module")
def tiny_vs2(tmp_path_factory):
    path = tmp_path_factory.mktemp("vs2") / "VideoScore2"
    write_tiny_videoscore2(path)
    return path


def _video_inputs(scorer, prompt, grid=(2, 4, 4)):
    """What Qwen2.5-VL's processor produces for a video of grid (t, h, w) patches: the chat text with
    t*h*w/4 video tokens, flattened patches [t*h*w, 3*2*14*14] and the grid (built here: see the tiny module)."""
    from transformers import BatchFeature

    text = scorer.tokenizer.apply_chat_template(
        query_messages(prompt), tokenize=False, add_generation_prompt=True
    )
    n = grid[0] * grid[1] * grid[2] // 4
    ids = scorer.tokenizer(text.replace("<|video_pad|>", "<|video_pad|>" * n), return_tensors="pt")
    pixels = torch.randn(
        grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)
    )
    return BatchFeature({**ids, "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([list(grid)]),
                         "second_per_grid_ts": torch.tensor([1.0])})  # fmt: skip


def test_loading_and_generation_on_the_tiny_random_model(tiny_vs2):
    scorer = load_scorer("videoscore2", str(tiny_vs2), device="cpu", max_new_tokens=12)
    assert type(scorer.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    result = scorer.score_inputs(_video_inputs(scorer, "a cat on a sofa"))
    assert isinstance(result.raw, str) and len(result.raw) > 0  # random model: noise, parsed as missing
    assert result.details["unparsed"] and result.visual_quality is None
    with pytest.raises(ValueError, match="not found or without config.json"):
        VideoScore2Scorer(tiny_vs2.parent / "missing")
    if not torchvision_available():
        with pytest.raises(ValueError, match="torchvision"):
            scorer.build_inputs(np.zeros((4, 28, 28, 3), np.uint8), 2.0, "a cat")


@pytest.mark.skipif(
    not torchvision_available(), reason="transformers' Qwen2-VL video processor needs torchvision"
)
def test_processor_path_frames_to_scores(tiny_vs2, tmp_path):
    from magi_train.codecs import write_audio_video_mp4

    clip = write_audio_video_mp4(
        tmp_path / "c.mp4", (np.random.rand(26, 64, 64, 3) * 255).astype(np.uint8), None
    )
    scorer = VideoScore2Scorer(tiny_vs2, device="cpu", max_new_tokens=8)
    inputs = scorer.build_inputs(np.zeros((4, 56, 56, 3), np.uint8), 2.0, "a cat")
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]] and float(inputs["second_per_grid_ts"][0]) == 1.0
    assert isinstance(scorer.score(clip, "a cat").raw, str)


def test_soft_scores_at_the_digits_of_a_trained_tiny_model(tmp_path):
    """Teach the tiny model one answer, then check the scorer's hard scores and soft scores against the
    model's own probabilities at the digit positions, computed independently by one forward pass."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threading only adds overhead on a busy CPU
    try:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=0)
        path = write_tiny_videoscore2(tmp_path / "vs2", model=model, tokenizer=tokenizer)
        scorer = VideoScore2Scorer(
            path, device="cpu", max_new_tokens=80, decoding="greedy", soft_score="expected"
        )
        inputs = _video_inputs(scorer, "a cat on a sofa")
        answer = "<think>sharp frames</think>visual quality: 4;\ntext-to-video alignment: 3,\nphysical/common-sense consistency: 5"
        target = scorer.tokenizer(answer + "<|im_end|>", return_tensors="pt")["input_ids"]
        full = torch.cat([inputs["input_ids"], target], 1)
        labels = full.clone()
        labels[:, : inputs["input_ids"].shape[1]] = -100
        vision = {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
        m = scorer.model.train()
        opt = torch.optim.Adam(m.parameters(), lr=5e-3)
        for _ in range(100):
            loss = m(input_ids=full, attention_mask=torch.ones_like(full), labels=labels, **vision).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        result = scorer.score_inputs(inputs)
        assert result.raw.startswith(answer), result.raw
        assert result.hard == {"visual_quality": 4, "text_alignment": 3, "physical_consistency": 5}
        # independent check: logits at each digit from a forward pass over prompt + answer
        with torch.no_grad():
            logits = m(input_ids=full, attention_mask=torch.ones_like(full), **vision).logits[0]
        digit_ids = [scorer.tokenizer.convert_tokens_to_ids(str(s)) for s in range(1, 6)]
        prompt_len = inputs["input_ids"].shape[1]
        for dim, label in (("visual_quality", "visual quality: "), ("text_alignment", "alignment: "),
                           ("physical_consistency", "consistency: ")):  # fmt: skip
            k = len(scorer.tokenizer(answer[: answer.index(label) + len(label)])["input_ids"])
            assert int(target[0, k]) in digit_ids
            probs = torch.softmax(logits[prompt_len + k - 1, digit_ids], -1)
            expected = float((probs * torch.arange(1, 6)).sum())
            assert getattr(result, dim) == pytest.approx(expected, abs=1e-4)
        # the authors' decoding: sampling at T = 0.7, soft scores on the processed scores (temperature, then
        # transformers' default top-k = 50), authors' formula
        sampled = VideoScore2Scorer(path, device="cpu", max_new_tokens=80)
        sampled.model = m
        assert sampled.generate_kwargs() == {"do_sample": True, "temperature": 0.7, "output_scores": True}
        result = sampled.score_inputs(inputs)
        assert result.hard == {"visual_quality": 4, "text_alignment": 3, "physical_consistency": 5}
        assert result.details["soft_score"] == "authors" and result.details["upstream_agrees"]
        for dim, label in (("visual_quality", "visual quality: "), ("text_alignment", "alignment: "),
                           ("physical_consistency", "consistency: ")):  # fmt: skip
            k = len(scorer.tokenizer(answer[: answer.index(label) + len(label)])["input_ids"])
            scaled = logits[prompt_len + k - 1] / 0.7
            kth = torch.topk(scaled, 50).values[-1]
            processed = torch.where(scaled < kth, torch.tensor(-float("inf")), scaled)
            probs = torch.softmax(processed, -1)[digit_ids].tolist()
            assert getattr(result, dim) == pytest.approx(_upstream_normed(probs), abs=1e-4)
    finally:
        torch.set_num_threads(threads)


def _clip(path, frames, wave=None):
    from magi_train.codecs import write_audio_video_mp4

    return write_audio_video_mp4(path, frames, wave)


def test_proxy_scorer_orders_sharp_blurred_flickering_and_speech(tmp_path):
    rng = np.random.default_rng(0)
    texture = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    sharp = np.repeat(texture[None], 26, axis=0)
    flat = np.full((26, 64, 64, 3), 128, np.uint8)
    flicker = sharp.copy()
    flicker[::2] = 255 - flicker[::2]
    t = np.arange(int(26 / 25 * 44100)) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    silence = np.zeros_like(tone)
    scorer = ProxyScorer()
    speak, quiet = 'Dialogue:\n<A, English>: "hello there"', "Dialogue:\n<No dialogue>"
    s_sharp = scorer.score(_clip(tmp_path / "a.mp4", sharp, np.stack([tone, tone])), speak)
    s_flat = scorer.score(_clip(tmp_path / "b.mp4", flat, np.stack([silence, silence])), speak)
    s_flicker = scorer.score(_clip(tmp_path / "c.mp4", flicker, np.stack([silence, silence])), quiet)
    assert s_sharp.visual_quality > 4 and s_flat.visual_quality < 1.5
    assert s_sharp.physical_consistency > s_flicker.physical_consistency + 1
    assert s_sharp.text_alignment == 5 and s_flat.text_alignment == 1 and s_flicker.text_alignment == 5
    assert scorer.name == "proxy" and load_scorer("proxy").name == "proxy"
    with pytest.raises(ValueError, match="unknown video scorer"):
        load_scorer("videoscore")

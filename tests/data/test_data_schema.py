"""Sample validation: every convention of DESIGN.md's shard format, error messages that name key and field."""

import dataclasses
import io

import numpy as np
import pytest
import torch
import webdataset as wds

from magi_train.data.schema import (
    Clip,
    SampleError,
    count_tokens,
    decode_npy,
    encode_npy,
    expected_audio_len,
    validate_sample,
)
from magi_train.data.synthetic import synthetic_clip, write_corrupt_shard
from magi_train.data.writer import clip_to_sample

D = 32


def make_clip(t=3, h=4, w=6, text_len=4, **kw) -> Clip:
    return synthetic_clip(np.random.default_rng(0), "clip-a", t, h, w, text_len, D, **kw)


def test_valid_sample_decodes_to_fp32_clip():
    clip = make_clip(with_image=True)
    raw = clip_to_sample(clip)  # video float16 by default
    out = validate_sample(raw, D)
    assert out.key == "clip-a" and out.caption == clip.caption and out.meta == clip.meta
    assert out.video.dtype == out.audio.dtype == out.text.dtype == out.image.dtype == torch.float32
    assert out.video.shape == (48, 3, 4, 6) and out.audio.shape == (9, 64) and out.text.shape == (4, D)
    assert out.image.shape == (48, 1, 4, 6) and out.lowres is None
    torch.testing.assert_close(out.video, clip.video, atol=4e-3, rtol=1e-3)  # float16 rounding only
    torch.testing.assert_close(out.audio, clip.audio)  # audio is stored float32
    # tokens = T*(H/2)*(W/2) + A + L, by hand
    assert out.num_tokens == 3 * 2 * 3 + 9 + 4 == count_tokens((48, 3, 4, 6), 9, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.key = "other"


def test_audio_length_rule_is_named():
    assert [expected_audio_len(t) for t in (1, 2, 3, 21)] == [1, 5, 9, 81]
    raw = clip_to_sample(make_clip(t=3))
    raw["audio.npy"] = encode_npy(np.zeros((5, 64), np.float32))
    with pytest.raises(SampleError, match=r"'clip-a': audio.npy: length 5 != 4\*\(T-1\)\+1 = 9") as e:
        validate_sample(raw, D)
    assert (e.value.key, e.value.field, e.value.kind, e.value.label) == (
        "clip-a",
        "audio.npy",
        "length",
        "audio.npy: length",
    )


def test_text_width_and_missing_members_are_named():
    raw = clip_to_sample(make_clip())
    with pytest.raises(SampleError, match=r"text.npy: shape \[4, 32\], expected \[L, 64\]"):
        validate_sample(raw, text_dim=64)
    raw["text.txt"] = raw.pop("text.npy")
    with pytest.raises(SampleError, match="text.npy: missing .*text.txt only"):
        validate_sample(raw, D)
    raw = clip_to_sample(make_clip())
    del raw["meta.json"]
    with pytest.raises(SampleError, match="meta.json: missing"):
        validate_sample(raw, D)
    with pytest.raises(SampleError, match="__key__"):
        validate_sample({"video.npy": b""}, D)


def test_every_planted_defect_gets_its_reason(tmp_path):
    path = tmp_path / "corrupt.tar"
    expected = write_corrupt_shard(path, D, good=2)
    labels, good = {}, []
    for raw in wds.tarfile_to_samples()(iter([{"url": str(path)}])):
        try:
            good.append(validate_sample(raw, D).key)
        except SampleError as e:
            assert raw["__key__"] in str(e) and e.field in str(e)  # the message names key and field
            labels[raw["__key__"]] = e.label
    assert good == ["good-0", "good-1"]
    assert labels == expected


def test_npy_parser_handles_layouts_and_refuses_pickle():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((48, 2, 4, 6)).astype(np.float32)
    for variant in (a, a.astype(">f4"), np.asfortranarray(a), a.astype(np.float16)):
        buf = io.BytesIO()
        np.save(buf, variant)
        got = decode_npy(buf.getvalue(), "k", "video.npy")
        np.testing.assert_array_equal(got.astype(np.float32), variant.astype(np.float32))
    for bad, kind in [
        (np.arange(6), "dtype"),
        (np.zeros(3, np.float64), "dtype"),
        (np.array([None, 1], dtype=object), "needs pickle"),
    ]:
        buf = io.BytesIO()
        np.save(buf, bad, allow_pickle=True)
        with pytest.raises(SampleError) as e:
            decode_npy(buf.getvalue(), "k", "x.npy")
        assert e.value.kind == kind
    with pytest.raises(SampleError, match="truncated"):
        decode_npy(encode_npy(a)[:-1], "k", "video.npy")
    with pytest.raises(SampleError, match="truncated"):  # trailing garbage is as wrong as missing bytes
        decode_npy(encode_npy(a) + b"\0", "k", "video.npy")
    with pytest.raises(SampleError, match="not an .npy"):
        decode_npy(b"hello", "k", "video.npy")

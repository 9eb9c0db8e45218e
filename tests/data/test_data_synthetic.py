"""Synthetic clips: deterministic, unit scale, and learnable (text -> concept, video <-> audio); the CLI."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from magi_train.data.reader import ShardDataset
from magi_train.data.synthetic import concept_bank, main, synthetic_clips

D = 32


@pytest.fixture(scope="module")
def clips():
    return list(synthetic_clips(240, 1, [(3, 4, 6)], 4, D))


def concepts_of(clips):
    return np.array([c.meta["concept"] for c in clips])


def test_deterministic_given_the_seed():
    a = list(synthetic_clips(5, 7, [(3, 4, 6), (2, 6, 6)], (2, 6), D, with_image=True))
    b = list(synthetic_clips(5, 7, [(3, 4, 6), (2, 6, 6)], (2, 6), D, with_image=True))
    c = list(synthetic_clips(5, 8, [(3, 4, 6), (2, 6, 6)], (2, 6), D))
    for x, y in zip(a, b, strict=True):
        assert x.key == y.key and x.meta == y.meta
        for name in ("video", "audio", "text", "image"):
            assert torch.equal(getattr(x, name), getattr(y, name))
        torch.testing.assert_close(x.image, x.video[:, :1], rtol=0, atol=0)  # i2v: the clean first frame
    assert not torch.equal(a[0].audio, c[0].audio) and a[0].key != c[0].key
    assert {tuple(x.video.shape[1:]) for x in a} <= {(3, 4, 6), (2, 6, 6)}
    assert all(2 <= x.text.shape[0] <= 6 and x.audio.shape[0] == 4 * (x.video.shape[1] - 1) + 1 for x in a)


def test_values_are_about_unit_variance(clips):
    for name in ("video", "audio", "text"):
        values = torch.cat([getattr(c, name).flatten() for c in clips])
        assert abs(values.mean().item()) < 0.15 and 0.7 < values.std().item() < 1.4, name


def test_text_identifies_the_concept(clips):
    concepts = concepts_of(clips)
    assert set(concepts) == set(range(8))
    feats = np.stack([c.text.mean(0).numpy() for c in clips])
    train, test = slice(0, 120), slice(120, None)
    centroids = np.stack([feats[train][concepts[train] == k].mean(0) for k in range(8)])
    dist = ((feats[test][:, None] - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == concepts[test]).mean() == 1.0  # nearest centroid from held-out clips


def test_video_of_one_concept_is_alike(clips):
    # channel covariance: invariant to the random per-clip phase, specific to the concept's mixing and motion
    feats = []
    for c in clips:
        v = c.video.reshape(48, -1).numpy()
        cov = (v @ v.T).ravel()
        feats.append(cov / np.linalg.norm(cov))
    feats = np.stack(feats)
    sim = feats @ feats.T
    concepts = concepts_of(clips)
    same = concepts[:, None] == concepts[None, :]
    np.fill_diagonal(same, False)
    other = concepts[:, None] != concepts[None, :]
    assert sim[same].mean() > 0.8 and sim[other].mean() < 0.4


def test_audio_follows_the_video(clips):
    # audio latent 4t and the video at the grid origin of frame t share the phase: the audio's two leading
    # principal components (the phase) linearly predict the video for matched pairs, and fail for the audio
    # of another clip of the same concept
    concepts = concepts_of(clips)

    def r2(x, y):
        x = np.concatenate([x, np.ones((len(x), 1))], 1)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return 1 - ((x @ coef - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()

    for k in range(8):
        group = [c for c, ck in zip(clips, concepts, strict=True) if ck == k]
        audio = np.concatenate([c.audio.numpy()[::4] for c in group])  # [n*T, 64]
        video = np.concatenate([c.video.numpy()[:, :, 0, 0].T for c in group])  # [n*T, 48]
        shuffled = np.concatenate([c.audio.numpy()[::4] for c in group[1:] + group[:1]])
        _, _, vt = np.linalg.svd(audio - audio.mean(0), full_matrices=False)
        assert len(audio) > 40
        assert r2(audio @ vt[:2].T, video) > 0.9 and r2(shuffled @ vt[:2].T, video) < 0.3


def test_concepts_do_not_depend_on_the_data_seed():
    bank = concept_bank(D)
    assert bank is concept_bank(D) and len(bank) == 8 and bank.text.shape == (8, D)
    for seed in (0, 1, 99):  # train and val sets drawn with different seeds share the concepts
        for c in synthetic_clips(8, seed, [(2, 4, 4)], 2, D):
            dist = ((c.text.mean(0).numpy()[None] - bank.text) ** 2).sum(-1)
            assert dist.argmin() == c.meta["concept"]
    with pytest.raises(ValueError):
        bank.text[0, 0] = 1.0  # read-only: a caller cannot corrupt the cached bank


def test_cli_writes_readable_shards(tmp_path, capsys):
    out = tmp_path / "syn"
    main(
        [
            "--out",
            str(out),
            "--num-clips",
            "10",
            "--samples-per-shard",
            "4",
            "--sizes",
            "2x4x4,3x4x6",
            "--text-dim",
            "16",
            "--with-image",
            "--seed",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert "wrote 10 clips in 3 shard(s)" in printed and "clips per concept" in printed
    ds = ShardDataset(str(out), text_dim=16, max_tokens=10_000)
    batch = next(iter(ds))
    assert len(batch) == 10 and all(i is not None for i in batch.image)
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--sizes", "3x4"])
    with pytest.raises(ValueError, match="already holds"):  # a second run never mixes into old shards
        main(["--out", str(out), "--num-clips", "2"])


def test_cli_runs_as_a_module(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi_train.data.synthetic",
            "--out",
            str(tmp_path),
            "--num-clips",
            "3",
            "--text-dim",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 clips in 1 shard(s)" in done.stdout and (tmp_path / "synthetic-000000.tar").is_file()

"""DMD-2 validation videos (docs/dmd2.md "Validation videos"): the student's samples beside the guided teacher's.

The first validation clips, as the student's 8-step sampler and the teacher's 32-step UniPC + CFG sampler produce
them from the same noise and conditioning, are decoded with the codecs recipe=generate decodes with
(`inference/generate.py` `load_decoders`, `decode_clip`) and written as one mp4 per clip: frames side by side
[student | teacher], the student's sound in the left channel and the teacher's in the right.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from magi_train.codecs import AudioVAE, TurboVAE, VideoVAE
from magi_train.config import GenerateConfig
from magi_train.flow import dmd

log = logging.getLogger(__name__)

CAPTION = (
    "left: student (8-step) | right: teacher (32-step UniPC + CFG), same noise; sound: student L, teacher R"
)


def side_by_side(
    student: tuple[np.ndarray, Tensor], teacher: tuple[np.ndarray, Tensor]
) -> tuple[np.ndarray, Tensor]:
    """Two decoded clips (uint8 frames `[F, H, W, 3]`, stereo wave `[2, S]`) -> frames `[F, H, 2W, 3]` [student |
    teacher] (no gap) and a stereo wave: left = the student's two channels averaged, right = the teacher's."""
    (frames_s, wave_s), (frames_t, wave_t) = student, teacher
    assert frames_s.shape == frames_t.shape and wave_s.shape == wave_t.shape, (
        frames_s.shape, frames_t.shape, wave_s.shape, wave_t.shape,
    )  # fmt: skip
    return np.concatenate([frames_s, frames_t], axis=2), torch.stack([wave_s.mean(0), wave_t.mean(0)])


class SampleVideos:
    """Writes `<out>/clip<i>.mp4` of the first `count` clips of a validation batch and logs them to W&B.

    The decoders load on the first `write`, which the task calls on rank 0 only; they live here, outside the task's
    modules, so they reach neither checkpoints nor optimisers, and no rank but 0 holds them.
    """

    def __init__(self, gen_cfg: GenerateConfig, count: int):
        from magi_train.inference.generate import decoder_paths

        assert count > 0, count
        self.cfg, self.count = gen_cfg, count
        self._decoders: tuple[VideoVAE | TurboVAE, AudioVAE] | None = None
        if not gen_cfg.tiny_codecs:  # checked on every rank at the start, not at rank 0's first validation
            keys = ("generate.turbo_vae" if gen_cfg.turbo_vae else "generate.video_vae", "generate.audio_vae")
            for path, key in zip(decoder_paths(gen_cfg), keys, strict=True):
                if not Path(path).is_dir():
                    raise ValueError(
                        f"{key} (or generate.codecs_dir): {path!r} is not a directory; distill validation videos "
                        "decode with it (distill.sample_videos=0 turns them off)"
                    )

    def decoders(self, device: torch.device) -> tuple[VideoVAE | TurboVAE, AudioVAE]:
        """(video decoder, audio VAE), loaded once on `device` in the dtype recipe=generate uses there."""
        if self._decoders is None:
            from magi_train.inference.generate import load_decoders, resolve_precision

            self._decoders = load_decoders(self.cfg, device, resolve_precision(self.cfg.precision, device))
            log.info("validation videos: decoders loaded (%s)", type(self._decoders[0]).__name__)
        return self._decoders

    @torch.no_grad()
    def write(
        self,
        out: Path,
        student: dmd.Batch,
        teacher: dmd.Batch,
        device: torch.device,
        loggers: Sequence[Any],
        step: int,
    ) -> list[Path]:
        """Decode clips 0..count-1 of the student's and the teacher's samples ([video clips, audio clips]) into
        `out/clip<i>.mp4` (atomic writes) and log them as `samples/video<i>` to every WandbLogger."""
        from lightning.pytorch.loggers import WandbLogger

        from magi_train.codecs import OUTPUT_SAMPLE_RATE, write_audio_video_mp4
        from magi_train.eval.callback import training_rng_untouched
        from magi_train.inference.generate import FPS, decode_clip

        paths = []
        # as recipe=generate decodes (no autocast of the trainer's precision), leaving the training RNG as it was
        with training_rng_untouched(), torch.autocast(device.type, enabled=False):
            decoder, audio_vae = self.decoders(device)
            for i in range(min(self.count, len(student[0]))):
                clips = [
                    decode_clip(decoder, audio_vae, x[0][i], x[1][i], frames=x[1][i].shape[0])
                    for x in (student, teacher)
                ]
                frames, wave = side_by_side(*clips)
                path = write_audio_video_mp4(
                    out / f"clip{i}.mp4", frames, wave, fps=FPS, sample_rate=OUTPUT_SAMPLE_RATE
                )
                paths.append(path)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                for i, path in enumerate(paths):  # from the file: the mp4 keeps the sound
                    logger.log_video(
                        f"samples/video{i}", [str(path)], step=step, caption=[CAPTION], format=["mp4"]
                    )
        return paths


def validation_videos(gen_cfg: GenerateConfig | None, count: int) -> SampleVideos | None:
    """SampleVideos when `count` > 0 and `gen_cfg` names a video decoder and an audio VAE, else None (no videos)."""
    from magi_train.inference.generate import decoders_named

    if count == 0 or gen_cfg is None or not decoders_named(gen_cfg):
        return None
    return SampleVideos(gen_cfg, count)


__all__ = ["CAPTION", "SampleVideos", "side_by_side", "validation_videos"]

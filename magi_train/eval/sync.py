"""Audio-video lip synchronisation, SyncNet-style (Chung & Zisserman 2016, "Out of time"), as LSE-D / LSE-C.

The network is SyncNet's "S" model with the layer layout and parameter names of the public
`syncnet_v2.model` state dict (joonson/syncnet_python), so those weights load with `torch.load(...,
weights_only=True)` or from a safetensors conversion. Inputs follow that code: 25 fps video, 5-frame windows
of 224x224 face crops as raw 0-255 BGR floats `[N, 3, 5, 224, 224]`; 16 kHz audio -> 13 MFCCs at 100 Hz
(python_speech_features defaults) in 20-column windows `[N, 1, 13, 20]`, window i starting at MFCC 4i (the
audio of video frames i..i+4). The offset search compares each video window with the audio windows shifted
by -vshift..vshift frames: the offset is the shift with the smallest mean distance, LSE-D that distance and
LSE-C (confidence) the median minus the minimum of the mean distances (Wav2Lip's definitions of both).

There is no face detector here: `crop="center"` takes the centred square of each frame (talking-head clips);
`crop="none"` expects frames that are already face crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from magi_train.eval.media import read_audio, read_frames

VIDEO_FPS = 25  # SyncNet's video rate
AUDIO_RATE = 16000  # and audio rate (MFCCs at 100 Hz: 4 per video frame)
WINDOW = 5  # video frames per window (= 20 MFCC columns)
CROP = 224


class SyncNet(nn.Module):
    """SyncNet "S": an audio encoder on MFCC windows and a lip encoder on 5-frame face windows -> embeddings.

    Channel widths default to the released model; smaller ones give a tiny network of the same layout.
    """

    def __init__(
        self,
        audio_channels: tuple[int, ...] = (64, 192, 384, 256, 256, 512),
        lip_channels: tuple[int, ...] = (96, 256, 256, 256, 256, 512),
        embed_dim: int = 1024,
    ):
        super().__init__()
        a, v = audio_channels, lip_channels

        def block2d(cin: int, cout: int, relu_inplace: bool = True) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, (3, 3), padding=(1, 1)),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=relu_inplace),
            ]

        # indices match syncnet_v2's state dict keys (netcnnaud.0 / .4 / .8 / .11 / .14 / .18 ...)
        self.netcnnaud = nn.Sequential(
            *block2d(1, a[0]), nn.MaxPool2d((1, 1), (1, 1)),
            *block2d(a[0], a[1]), nn.MaxPool2d((3, 3), (1, 2)),
            *block2d(a[1], a[2]),
            *block2d(a[2], a[3]),
            *block2d(a[3], a[4]), nn.MaxPool2d((3, 3), (2, 2)),
            nn.Conv2d(a[4], a[5], (5, 4)), nn.BatchNorm2d(a[5]), nn.ReLU(),
        )  # fmt: skip
        self.netfcaud = nn.Sequential(
            nn.Linear(a[5], a[5]), nn.BatchNorm1d(a[5]), nn.ReLU(), nn.Linear(a[5], embed_dim)
        )
        self.netfclip = nn.Sequential(
            nn.Linear(v[5], v[5]), nn.BatchNorm1d(v[5]), nn.ReLU(), nn.Linear(v[5], embed_dim)
        )

        def block3d(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1)),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            ]

        self.netcnnlip = nn.Sequential(
            nn.Conv3d(3, v[0], (5, 7, 7), stride=(1, 2, 2)), nn.BatchNorm3d(v[0]), nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(v[0], v[1], (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(v[1]),
            nn.ReLU(inplace=True), nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            *block3d(v[1], v[2]),
            *block3d(v[2], v[3]),
            *block3d(v[3], v[4]), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            nn.Conv3d(v[4], v[5], (1, 6, 6)), nn.BatchNorm3d(v[5]), nn.ReLU(inplace=True),
        )  # fmt: skip

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        """MFCC windows `[N, 1, 13, 20]` -> `[N, embed]`."""
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        """Face windows `[N, 3, 5, 224, 224]` (0-255 BGR) -> `[N, embed]`."""
        return self.netfclip(self.netcnnlip(x).flatten(1))

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> SyncNet:
        """Load `syncnet_v2.model` (a state dict; torch.load with weights_only=True) or a .safetensors file.

        Widths are read from the weights unless given (`audio_channels`, `lip_channels`, `embed_dim`)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"SyncNet weights {str(path)!r} not found; give syncnet_v2.model (joonson/syncnet_python) "
                "or its safetensors conversion"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import pickle

            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(
                    f"{str(path)!r} holds more than tensors (pickled objects), which are never unpickled here; "
                    "save its state dict alone, or convert it to .safetensors"
                ) from err
        if not isinstance(state, dict):
            raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
        if not kwargs:  # widths from the weights (the released model, or a smaller one of the same layout)
            try:
                kwargs = {
                    "audio_channels": tuple(
                        int(state[f"netcnnaud.{i}.weight"].shape[0]) for i in (0, 4, 8, 11, 14, 18)
                    ),
                    "lip_channels": tuple(
                        int(state[f"netcnnlip.{i}.weight"].shape[0]) for i in (0, 4, 8, 11, 14, 18)
                    ),
                    "embed_dim": int(state["netfcaud.3.weight"].shape[0]),
                }
            except KeyError as err:
                raise ValueError(
                    f"{str(path)!r} is not a SyncNet 'S' state dict (no {err.args[0]})"
                ) from None
        net = cls(**kwargs)
        own = net.state_dict()
        # The released syncnet_v2.model predates BatchNorm's `num_batches_tracked` buffer (PyTorch 0.4): those,
        # and only those, may be missing. They only count updates in training mode, so eval output is unchanged.
        missing = sorted(k for k in set(own) - set(state) if not k.endswith(".num_batches_tracked"))
        unexpected = sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{str(path)!r} is not a SyncNet 'S' state dict of this size: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        state = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked")}, **state}
        net.load_state_dict(state, strict=True)
        return net.eval()


def mfcc_windows(audio: np.ndarray, num_windows: int) -> torch.Tensor:
    """`[num_windows, 1, 13, 20]` MFCC windows of 16 kHz mono audio, window i = MFCC columns 4i .. 4i+19."""
    import python_speech_features

    pcm = np.clip(np.asarray(audio, dtype=np.float32), -1, 1) * 32767  # the reference reads int16 wav samples
    mfcc = python_speech_features.mfcc(pcm, AUDIO_RATE).T.astype(np.float32)  # [13, M], 100 per second
    need = 4 * (num_windows - 1) + 20
    if mfcc.shape[1] < need:
        raise ValueError(
            f"audio too short for {num_windows} windows: {mfcc.shape[1]} MFCC frames, need {need}"
        )
    cols = torch.from_numpy(mfcc)
    return torch.stack([cols[:, 4 * i : 4 * i + 20] for i in range(num_windows)])[:, None]


def face_windows(frames: np.ndarray, crop: str = "center") -> torch.Tensor:
    """`[F - 4, 3, 5, 224, 224]` windows of RGB uint8 frames `[F, H, W, 3]` (BGR 0-255 floats, as the reference)."""
    from PIL import Image

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {frames.shape}")
    if len(frames) < WINDOW:
        raise ValueError(f"SyncNet needs at least {WINDOW} frames, got {len(frames)}")
    if crop not in ("center", "none"):
        raise ValueError(f"crop={crop!r}: use center or none")
    out = []
    for frame in frames:
        h, w = frame.shape[:2]
        if crop == "center":
            s = min(h, w)
            frame = frame[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        if frame.shape[:2] != (CROP, CROP):
            frame = np.asarray(Image.fromarray(frame).resize((CROP, CROP), Image.BICUBIC))
        out.append(frame[..., ::-1])  # RGB -> BGR (the reference reads frames with OpenCV)
    video = (
        torch.from_numpy(np.ascontiguousarray(np.stack(out))).float().permute(3, 0, 1, 2)
    )  # [3, F, 224, 224]
    return torch.stack([video[:, i : i + WINDOW] for i in range(len(frames) - WINDOW + 1)])


@dataclass(frozen=True)
class SyncResult:
    offset: (
        int  # frames, syncnet_python's sign: vshift - argmin, i.e. minus the audio shift k that matches best
    )
    lse_d: float  # mean embedding distance at the best offset (lower is better)
    lse_c: float  # median minus minimum of the mean distances over offsets (higher is better)
    mean_distances: list[float]  # per offset -vshift .. vshift


def offset_search(video_feat: torch.Tensor, audio_feat: torch.Tensor, vshift: int = 15) -> SyncResult:
    """Mean distance between video window t and audio window t + k for k in [-vshift, vshift] (zero-padded at
    the ends, as the reference); the offset, the best distance (LSE-D) and the confidence (LSE-C).

    The offset has syncnet_python's sign (`SyncNetInstance.evaluate`: `offset = vshift - minidx`, where column
    `minidx` compares audio window t + minidx - vshift): offset = -k for the best k. A clip whose sound comes
    d frames late (the audio of video frame t sits at audio window t + d) has offset -d."""
    if video_feat.shape != audio_feat.shape or video_feat.ndim != 2:
        raise ValueError(
            f"features must be [N, D] of equal shape, got {video_feat.shape} / {audio_feat.shape}"
        )
    n, span = len(video_feat), 2 * vshift + 1
    padded = torch.nn.functional.pad(audio_feat, (0, 0, vshift, vshift))
    dists = torch.stack(
        [
            torch.nn.functional.pairwise_distance(video_feat[[i]].expand(span, -1), padded[i : i + span])
            for i in range(n)
        ]
    )  # [N, span]: column j compares audio shifted by j - vshift
    mean = dists.mean(0)
    best = int(torch.argmin(mean))
    return SyncResult(vshift - best, float(mean[best]), float(mean.median() - mean[best]), mean.tolist())


class SyncScorer:
    """LSE-D / LSE-C of a clip with a SyncNet (weights from a local path)."""

    name = "syncnet"

    def __init__(
        self, net: SyncNet, device: str = "cpu", vshift: int = 15, crop: str = "center", batch: int = 20
    ):
        self.net, self.device, self.vshift, self.crop, self.batch = (
            net.to(device).eval(),
            device,
            vshift,
            crop,
            batch,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> SyncScorer:
        return cls(SyncNet.from_pretrained(path), **kwargs)

    @torch.no_grad()
    def features(self, frames: np.ndarray, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of every 5-frame window of the video and of the matching audio windows."""
        # as the reference: min(frames, audio frames) - 5 windows (the last MFCC window must fit)
        n = min(len(frames), len(audio) // (AUDIO_RATE // VIDEO_FPS)) - WINDOW
        if n < 1:
            raise ValueError(
                f"clip too short for SyncNet: {len(frames)} frames, {len(audio) / AUDIO_RATE:.2f} s audio"
            )
        lips, mfcc = face_windows(frames[: n + WINDOW - 1], self.crop), mfcc_windows(audio, n)
        v = [
            self.net.forward_lip(lips[i : i + self.batch].to(self.device)).cpu()
            for i in range(0, n, self.batch)
        ]
        a = [
            self.net.forward_aud(mfcc[i : i + self.batch].to(self.device)).cpu()
            for i in range(0, n, self.batch)
        ]
        return torch.cat(v), torch.cat(a)

    def score(self, video: str | Path) -> SyncResult:
        frames, fps = read_frames(video)
        if abs(fps - VIDEO_FPS) > 0.01:
            frames, fps = read_frames(video, fps=VIDEO_FPS)
        return offset_search(*self.features(frames, read_audio(video, AUDIO_RATE)), vshift=self.vshift)

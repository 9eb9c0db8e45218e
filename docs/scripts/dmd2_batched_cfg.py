"""Times the DMD-2 teacher's guided x0 with both CFG branches in one packed forward vs two forwards (docs/turbo_vae.md)."""

import time

import torch

from magi_train.flow import dmd
from magi_train.flow.sampling import Guidance
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.tasks.dmd2 import DiTCondition, DiTScore

torch.manual_seed(0)
torch.set_num_threads(1)
cfg = MODEL_CONFIGS["tiny"]
model = DiT(cfg).eval()
g = torch.Generator().manual_seed(0)
video = [
    torch.randn(48, 6, 16, 28, generator=g) for _ in range(2)
]  # 2 clips, 6 latent frames of 16x28 (256x448 /16)
audio = [torch.randn(21, 64, generator=g) for _ in range(2)]
text = [torch.randn(64, cfg.text_in_channels, generator=g) for _ in range(2)]
cond = DiTCondition(text, [None] * 2, [None] * 2)
uncond = cond.with_text([torch.zeros(1, cfg.text_in_channels)] * 2)
sigma = torch.tensor([0.4, 0.8])
x_t = [video, audio]
for name, batch in (
    ("two forwards", False),
    ("batched (2N clips)", True),
    ("two forwards", False),
    ("batched (2N clips)", True),
):
    score = DiTScore(model, batch_cfg=batch)
    with torch.no_grad():
        dmd.teacher_x0(score, x_t, sigma, cond, uncond, Guidance())
        t = time.perf_counter()
        for _ in range(5):
            dmd.teacher_x0(score, x_t, sigma, cond, uncond, Guidance())
    print(f"{name}: {(time.perf_counter() - t) / 5 * 1000:.1f} ms per guided teacher x0")

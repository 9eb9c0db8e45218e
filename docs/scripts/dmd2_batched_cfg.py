"""Times the DMD-2 teacher's guided x0 with both CFG branches in one packed forward vs two forwards
(docs/turbo_vae.md): `tiny` DiT with random weights, two 256x448 clips, fp32, 1 thread, interleaved calls
(magi_train/inference/bench.py `interleaved`; the teacher's CFG lives in tasks/, which inference/ does not import)."""

import torch

from magi_train.flow import dmd
from magi_train.flow.sampling import Guidance
from magi_train.inference.bench import interleaved
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.tasks.dmd2 import DiTCondition, DiTScore

torch.manual_seed(0)
torch.set_num_threads(1)
cfg = MODEL_CONFIGS["tiny"]
model = DiT(cfg).eval()
g = torch.Generator().manual_seed(0)
video = [torch.randn(48, 6, 16, 28, generator=g) for _ in range(2)]  # 6 latent frames of 16x28 (256x448 / 16)
audio = [torch.randn(21, 64, generator=g) for _ in range(2)]
text = [torch.randn(64, cfg.text_in_channels, generator=g) for _ in range(2)]
cond = DiTCondition(text, [None] * 2, [None] * 2)
uncond = cond.with_text([torch.zeros(1, cfg.text_in_channels)] * 2)
sigma, x_t = torch.tensor([0.4, 0.8]), [video, audio]
scores = {
    "batched (2N clips)": DiTScore(model, batch_cfg=True),
    "two forwards": DiTScore(model, batch_cfg=False),
}
with torch.no_grad():
    variants = {
        n: (lambda s=s: dmd.teacher_x0(s, x_t, sigma, cond, uncond, Guidance())) for n, s in scores.items()
    }
    times = interleaved(variants, torch.device("cpu"), repeats=7, warmup=1)
for name, seconds in times.items():
    print(f"{name}: {seconds * 1000:.1f} ms per guided teacher x0 (median of 7)")
print(f"two forwards / batched: {times['two forwards'] / times['batched (2N clips)']:.2f}")

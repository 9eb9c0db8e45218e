"""Toy teacher and DMD-2 distillation (arXiv 2405.14867) on the Gaussian-mixture toy, built on the same
`magi_train.flow.dmd` functions as the DiT recipe: backward simulation, real/fake scores, TTUR."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from magi_train.flow import dmd
from magi_train.flow.dmd import Batch
from magi_train.tools.toy.gmm import NULL_CLASS, NUM_CLASSES, sample_data


class ToyMLP(nn.Module):
    """Class-conditional velocity MLP over one or two modalities (2-D ring, optional 1-D part).

    Unlike the timestep-free DiT it takes the noise level s as an input: the DiT reads the noise level off
    thousands of latent tokens, but a single 2-D point carries almost no information about s, so a
    timestep-free toy model could only regress the s-averaged velocity. The DMD code passes s to every
    score model anyway; the DiT adapter ignores it.
    """

    def __init__(self, dims: tuple[int, ...] = (2,), hidden: int = 128, depth: int = 3, num_freqs: int = 8):
        super().__init__()
        self.dims = dims
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs).float(), persistent=False)
        width_in = sum(dims) + 1 + 2 * num_freqs + NUM_CLASSES + 1
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, sum(dims)))
        self.net = nn.Sequential(*layers)

    def forward(self, xs: Batch, sigma: Tensor, cond: Tensor) -> Batch:
        """xs: [[N, 2]] or [[N, 2], [N, 1]]; sigma [N]; cond: class labels [N] (NULL_CLASS = unconditional)."""
        s = sigma.view(-1, 1).to(xs[0])
        feats = [
            *xs,
            s,
            torch.sin(s * self.freqs),
            torch.cos(s * self.freqs),
            nn.functional.one_hot(cond, NUM_CLASSES + 1).to(xs[0]),
        ]
        return list(self.net(torch.cat(feats, dim=1)).split(list(self.dims), dim=1))


@dataclass
class TeacherConfig:
    """Flow-matching training of the toy teacher."""

    steps: int = 4000
    batch: int = 1024
    # cosine-decayed to 0. The teacher bounds the student: with 2000 steps its 100-step ODE puts 97% of the
    # samples within 3 std (student 96-97.5%), with 4000 steps 98% (student 98%)
    lr: float = 3e-3
    label_dropout: float = 0.1  # null class for the CFG branch (spec/dmd2.md §9)
    hidden: int = 128
    depth: int = 3
    seed: int = 0


def train_teacher(cfg: TeacherConfig, joint: bool = False, log_every: int = 0) -> ToyMLP:
    """Flow matching with uniform s and label dropout; Adam with a cosine decay."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ToyMLP((2, 1) if joint else (2,), cfg.hidden, cfg.depth)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    for step in range(cfg.steps):
        labels = torch.randint(NUM_CLASSES, (cfg.batch,), generator=gen)
        x0, _ = sample_data(labels, joint, gen)
        labels = torch.where(torch.rand(cfg.batch, generator=gen) < cfg.label_dropout, NULL_CLASS, labels)
        sigma = torch.rand(cfg.batch, generator=gen)
        # the critic's loss is exactly the flow-matching loss (velocity target eps - x0, per-modality means)
        loss = dmd.critic_loss(model, x0, sigma, labels, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"teacher step {step} loss {loss.item():.4f}")
    return model.requires_grad_(False).eval()


@torch.no_grad()
def euler_sample(model: ToyMLP, noise: Batch, labels: Tensor, num_steps: int = 100) -> Batch:
    """Deterministic Euler ODE x <- x + (s_next - s) v over uniform s from 1 to 0 (no guidance)."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    x = list(noise)
    n = len(labels)
    for i in range(num_steps):
        v = model(x, sigmas[i].expand(n), labels)
        x = [xi + (sigmas[i + 1] - sigmas[i]) * vi for xi, vi in zip(x, v, strict=True)]
    return x


def renoise_sample(
    model: ToyMLP,
    noise: Batch,
    labels: Tensor,
    num_steps: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> Batch:
    """The distilled few-step sampler (x0, then re-noise with fresh noise): backward simulation run to the end,
    i.e. `sampling.renoise_chain`, the loop of the DiT's `sample_distilled`."""
    return dmd.simulate_to_step(
        model, noise, num_steps, dmd.student_sigmas(num_steps, shift), labels, generator
    )


def toy_noise(n: int, joint: bool, generator: torch.Generator) -> Batch:
    """Pure noise for n samples of the toy (one tensor per modality)."""
    return [torch.randn(n, 2, generator=generator)] + (
        [torch.randn(n, 1, generator=generator)] if joint else []
    )


@dataclass
class DistillConfig:
    """DMD-2 on the toy. Defaults are the tested 4-step setting: spec/dmd2.md §9 (AdamW beta1 0, wd 0.01, clip
    10, TTUR 5, batch 512, score s ~ U[0.02, 0.98]) with 2000 instead of 3000 iterations (400 generator
    updates) at lr 3e-4 instead of 1e-4, to fit the CI budget (tests/toy)."""

    num_steps: int = 4  # student steps (1 = one-step generator)
    student_shift: float = 1.0  # student list = released schedule with this shift: [.999, .749, .4995, .2498]
    iters: int = 2000  # critic iterations; the generator is updated every `ttur`-th of them
    ttur: int = 5
    batch: int = 512
    lr_gen: float = 3e-4
    lr_critic: float = 3e-4
    betas: tuple[float, float] = (0.0, 0.999)  # beta1 = 0 as in the video recipes (SF, FastVideo)
    weight_decay: float = 0.01
    clip: float = 10.0
    normalizer: str = "batch"  # per-sample means over 2 (or 1) numbers are noisy in the toy (§9)
    guidance: float = 1.0  # real-score CFG; 1 keeps the teacher's own distribution as the fixed point
    weights: tuple[float, ...] | None = None  # per-modality DMD / critic weights (default 1 each)
    score_low: float = 0.02
    score_high: float = 0.98
    score_shift: float = 1.0
    flip_sign: bool = False  # negative control: ascend the DMD objective
    train_critic: bool = True  # negative control: False freezes the critic at the teacher
    ema: float = 0.0  # decay of an EMA of the student over generator updates (0 = off); returned if on
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "ttur", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"DistillConfig.ema is a decay in [0, 1), got {self.ema}")
        if self.iters < 0:
            raise ValueError(f"DistillConfig.iters must be >= 0, got {self.iters}")


def distill(teacher: ToyMLP, cfg: DistillConfig, log_every: int = 0) -> tuple[ToyMLP, dict[str, list[float]]]:
    """DMD-2 with backward simulation and TTUR; student and critic start as copies of the teacher.

    Every iteration: draw the student step k (from a generator seeded by the iteration, as ranks would),
    simulate the student to step k without grad, predict x0 at step k; every `ttur`-th iteration that x0
    (with grad) takes a generator step on the DMD loss; then the critic takes a flow-matching step on the
    detached x0 at an independently drawn noise level. Returns the student (its EMA if `cfg.ema`) and a loss
    history.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    joint = len(teacher.dims) > 1
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    critic = copy.deepcopy(teacher).requires_grad_(cfg.train_critic).train()
    opt_g = torch.optim.AdamW(
        student.parameters(), cfg.lr_gen, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    opt_c = torch.optim.AdamW(
        critic.parameters(), cfg.lr_critic, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema else None
    sigmas = dmd.student_sigmas(cfg.num_steps, cfg.student_shift)
    score = dict(low=cfg.score_low, high=cfg.score_high, shift=cfg.score_shift, generator=gen)
    history: dict[str, list[float]] = {"dmd": [], "critic": [], "g_abs": []}
    t0 = time.perf_counter()
    for it in range(cfg.iters):
        labels = torch.randint(NUM_CLASSES, (cfg.batch,), generator=gen)
        k = dmd.sample_step_index(cfg.num_steps, dmd.shared_generator(cfg.seed, it))
        x_k = dmd.simulate_to_step(student, toy_noise(cfg.batch, joint, gen), k, sigmas, labels, gen)
        if it % cfg.ttur == 0:
            x_g = dmd.student_x0(student, x_k, sigmas[k], labels)
            out = dmd.dmd_generator_loss(
                x_g,
                teacher,
                critic,
                dmd.sample_score_sigma(cfg.batch, **score),
                labels,
                uncond=torch.full_like(labels, NULL_CLASS),
                guidance=cfg.guidance,
                normalizer=cfg.normalizer,
                weights=cfg.weights,
                generator=gen,
            )
            loss = -out.loss if cfg.flip_sign else out.loss
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
            opt_g.step()
            if ema is not None:
                ema.update_parameters(student)
            history["dmd"].append(out.loss.item())
            history["g_abs"].append(float(sum(dmd.mean_abs(out.g))))
            x_fake = dmd.detach(x_g)
        else:
            with torch.no_grad():
                x_fake = dmd.student_x0(student, x_k, sigmas[k], labels)
        if cfg.train_critic:
            c_loss = dmd.critic_loss(
                critic,
                x_fake,
                dmd.sample_score_sigma(cfg.batch, **score),
                labels,
                weights=cfg.weights,
                generator=gen,
            )
            opt_c.zero_grad(set_to_none=True)
            c_loss.backward()
            nn.utils.clip_grad_norm_(critic.parameters(), cfg.clip)
            opt_c.step()
            history["critic"].append(c_loss.item())
        if log_every and it % log_every == 0:
            print(
                f"dmd it {it} dmd {history['dmd'][-1]:.3f} critic "
                f"{history['critic'][-1] if history['critic'] else float('nan'):.4f} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
    final = ema.module if ema is not None else student
    return final.requires_grad_(False).eval(), history

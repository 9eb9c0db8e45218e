"""Toy teacher and DMD-2 distillation (arXiv 2405.14867) on a `DataSpec` mixture, built on the same
`magi_train.flow.dmd` functions as the DiT recipe: backward simulation, guided real score, fake score, TTUR,
per-sample per-modality normaliser, optional diffusion GAN; plus the negative controls of issue 12."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from magi_train.flow import dmd
from magi_train.flow.dmd import Batch
from magi_train.flow.sampling import Guidance
from magi_train.tools.toy.gmm import DataSpec, sample_data

GuidanceSpec = Guidance | float | tuple[float, ...] | None  # what `dmd.guidance_scales` takes


class ToyMLP(nn.Module):
    """Class-conditional velocity MLP over the modalities of a spec (video [N, d], optional audio [N, d_a]).

    Unlike the timestep-free DiT it takes the noise level s as an input: the DiT reads the noise level off
    thousands of latent tokens, but a single low-dimensional point carries almost no information about s, so
    a timestep-free toy model could only regress the s-averaged velocity. The DMD code passes s to every
    score model anyway; the DiT adapter ignores it.
    """

    def __init__(
        self, dims: tuple[int, ...], num_classes: int, hidden: int = 128, depth: int = 3, num_freqs: int = 8
    ):
        super().__init__()
        self.dims, self.num_classes = tuple(dims), num_classes
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs).float(), persistent=False)
        width_in = sum(dims) + 1 + 2 * num_freqs + num_classes + 1
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width_in if i == 0 else hidden, hidden), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, sum(dims))

    def features(self, xs: Batch, sigma: Tensor, cond: Tensor) -> Tensor:
        """The last hidden layer [N, hidden] (the GAN head reads it, as DMD2's reads the critic's bottleneck)."""
        s = sigma.view(-1, 1).to(xs[0])
        feats = [
            *xs,
            s,
            torch.sin(s * self.freqs),
            torch.cos(s * self.freqs),
            nn.functional.one_hot(cond, self.num_classes + 1).to(xs[0]),
        ]
        return self.trunk(torch.cat(feats, dim=1))

    def forward(self, xs: Batch, sigma: Tensor, cond: Tensor) -> Batch:
        """xs: one [N, d_m] tensor per modality; sigma [N]; cond: labels [N] (num_classes = unconditional)."""
        return list(self.head(self.features(xs, sigma, cond)).split(list(self.dims), dim=1))


@dataclass
class TeacherConfig:
    """Flow-matching training of the toy teacher."""

    steps: int = 4000
    batch: int = 1024
    # cosine-decayed to 0. The teacher bounds the student: with 2000 steps its 100-step ODE puts 97% of the
    # ring's samples within 3 std (student 96-97.5%), with 4000 steps 98% (student 98%)
    lr: float = 3e-3
    label_dropout: float = 0.1  # null class for the CFG branch (spec/dmd2.md §9)
    hidden: int = 128
    depth: int = 3
    seed: int = 0


def _flow_match(
    model: ToyMLP,
    spec: DataSpec,
    draw: Callable[[], tuple[Batch, Tensor]],
    steps: int,
    lr: float,
    label_dropout: float,
    gen: torch.Generator,
    log_every: int = 0,
) -> None:
    """Flow matching of `model` on `draw()` = (x0, labels) batches: uniform s, label dropout to the null class,
    Adam with a cosine decay (the teacher's training, and the fit to guided samples)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for step in range(steps):
        x0, labels = draw()
        drop = torch.rand(len(labels), generator=gen) < label_dropout
        labels = torch.where(drop, spec.null_class, labels)
        sigma = torch.rand(len(labels), generator=gen)
        # the critic's loss is exactly the flow-matching loss (velocity target eps - x0, per-modality means)
        loss = dmd.critic_loss(model, x0, sigma, labels, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"flow matching step {step} loss {loss.item():.4f}")


def train_teacher(spec: DataSpec, cfg: TeacherConfig, log_every: int = 0) -> ToyMLP:
    """Flow matching with uniform s and label dropout; Adam with a cosine decay."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ToyMLP(spec.dims, spec.num_classes, cfg.hidden, cfg.depth)

    def draw() -> tuple[Batch, Tensor]:
        labels = torch.randint(spec.num_classes, (cfg.batch,), generator=gen)
        return sample_data(spec, labels, gen)[0], labels

    _flow_match(model, spec, draw, cfg.steps, cfg.lr, cfg.label_dropout, gen, log_every)
    return model.requires_grad_(False).eval()


def fit_guided(
    teacher: ToyMLP,
    spec: DataSpec,
    guidance: GuidanceSpec,
    steps: int,
    pool: int = 65536,
    ode_steps: int = 100,
    batch: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[ToyMLP, Batch, Tensor]:
    """The teacher fine-tuned by flow matching on `pool` samples of its own guided `ode_steps`-step ODE: a model
    whose score is the score of the guided distribution noised forward, which CFG's score is not (docs/dmd2.md,
    Guidance). Returns (model, pool samples, pool labels); label dropout as the teacher's."""
    gen = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(spec.num_classes, (pool,), generator=gen)
    samples = euler_sample(teacher, toy_noise(spec, pool, gen), labels, ode_steps, guidance)
    model = copy.deepcopy(teacher).requires_grad_(True).train()

    def draw() -> tuple[Batch, Tensor]:
        idx = torch.randint(pool, (batch,), generator=gen)
        return [x[idx] for x in samples], labels[idx]

    _flow_match(model, spec, draw, steps, lr, TeacherConfig.label_dropout, gen)
    return model.requires_grad_(False).eval(), samples, labels


def guided(model: ToyMLP, guidance: GuidanceSpec) -> dmd.ScoreModel:
    """The model as a ScoreModel with CFG inside (u + w (c - u) per modality, null class as uncond)."""

    def score(xs: Batch, sigma: Tensor, labels: Tensor) -> Batch:
        v = model(xs, sigma, labels)
        scales = dmd.guidance_scales(guidance, sigma, len(xs))
        if all(bool((w == 1).all()) for w in scales):
            return v
        v_u = model(xs, sigma, torch.full_like(labels, model.num_classes))
        return [u + w.view(-1, 1) * (c - u) for c, u, w in zip(v, v_u, scales, strict=True)]

    return score


@torch.no_grad()
def euler_sample(
    model: ToyMLP,
    noise: Batch,
    labels: Tensor,
    num_steps: int = 200,
    guidance: GuidanceSpec = None,
    shift: float = 1.0,
) -> Batch:
    """Deterministic Euler ODE x <- x + (s_next - s) v(x, s) from s = 1 to 0 with CFG `guidance` (the reference
    with many steps; with N steps and shift 5, the teacher's own few-step ODE sampler)."""
    from magi_train.flow.matching import shift_sigma

    sigmas = shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1), shift)
    score = guided(model, guidance)
    x = list(noise)
    n = len(labels)
    for i in range(num_steps):
        v = score(x, sigmas[i].expand(n), labels)
        x = [xi + (sigmas[i + 1] - sigmas[i]) * vi for xi, vi in zip(x, v, strict=True)]
    return x


def renoise_sample(
    model: ToyMLP,
    noise: Batch,
    labels: Tensor,
    num_steps: int,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    guidance: GuidanceSpec = None,
) -> Batch:
    """The distilled few-step sampler (x0, then re-noise with fresh noise) = backward simulation run to the end,
    i.e. `sampling.renoise_chain`, the loop of the DiT's `sample_distilled`; with `guidance`, the teacher's own
    N-step sampler with CFG at every step."""
    return dmd.simulate_to_step(
        guided(model, guidance), noise, num_steps, dmd.student_sigmas(num_steps, shift), labels, generator
    )


def toy_noise(spec: DataSpec, n: int, generator: torch.Generator) -> Batch:
    """Pure noise for n samples (one tensor per modality)."""
    return [torch.randn(n, d, generator=generator) for d in spec.dims]


@dataclass
class DistillConfig:
    """DMD-2 on the toy. Defaults = the production schedule of `recipe=dmd2_distill` (magi_train/config.py
    DistillConfig): 8 student steps of the released list (shift 5), score and critic noise levels u ~ U[0, 1)
    shifted by 5 and clamped to [0.02, 0.98], per-sample per-modality normaliser, TTUR 5, backward simulation,
    AdamW betas (0, 0.999) (Self-Forcing, FastVideo) wd 0.01, clip 10 (DMD2); toy-sized batch, lr and length."""

    num_steps: int = 8  # student steps
    student_shift: float = 5.0  # student list = the released schedule with this shift
    iters: int = 3000  # critic iterations; the generator is updated every `ttur`-th of them
    ttur: int = 5
    batch: int = 512
    lr_gen: float = 3e-4
    lr_critic: float = 3e-4
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    clip: float = 10.0
    normalizer: str = "per_sample"  # DMD2 / CausVid / Self-Forcing; "batch" = FastVideo
    guidance: GuidanceSpec = None  # CFG inside the real score (None/1: the teacher's own distribution)
    weights: tuple[float, ...] | None = None  # per-modality DMD / critic weights (default 1 each)
    score_low: float = 0.02  # DMD2 min/max step 0.02 / 0.98
    score_high: float = 0.98
    score_shift: float = 5.0  # Self-Forcing / the recipe's distill.score_shift
    score_method: str = "clamp"  # clamp | truncate (dmd.sample_score_sigma)
    critic_shift: float | None = None  # shift of the critic's noise levels; None = score_shift
    critic_warmup: int = 0  # critic-only iterations before the first student update
    # cosine decay of both learning rates to this fraction of their value over the run (1 = constant, as
    # Self-Forcing / DMD2 run); a convergence knob of the study
    lr_final: float = 1.0
    ema: float = 0.0  # decay of an EMA of the student over generator updates (0 = off); returned if on
    # GAN term (DMD2): a linear head on the critic's last hidden layer, real data vs student x0, both noised at the
    # same s ~ U[0, gan_sigma_max); weights as DMD2 SDXL (gen 5e-3, guidance_cls 1e-2). 0 = off
    gan_generator_weight: float = 0.0
    gan_critic_weight: float = 0.0
    gan_sigma_max: float = 1.0  # DMD2 diffusion_gan_max_timestep 1000 = the full range
    # negative controls (issue 12 item 3)
    flip_sign: bool = False  # ascend the DMD objective
    train_critic: bool = True  # False freezes the critic at the teacher
    critic_target: str = "velocity"  # "x0": the critic regresses x0 instead of the velocity
    fake_guidance: bool = False  # apply the real score's CFG to the fake score too
    backward_simulation: bool = True  # False: the student is trained only at step 0, from pure noise
    # what the critic learns: "step" = the x0 of this iteration's step k (DMD2, Self-Forcing: the mixture over
    # steps), "final" = the finished sample of the same chain (dmd.finish_from_step)
    critic_samples: str = "step"
    # one critic per student step (each learns only its step's x0, so the DMD direction of step k is the
    # difference of step k's own fake score and the real one); False = one critic for all steps (DMD2)
    critic_per_step: bool = False
    # > 0: every this many iterations the critic restarts from the real score (the teacher or its guided fit) with
    # fresh AdamW moments; its lr schedule and a GAN head carry on. 0 = never (DMD2)
    critic_reset: int = 0
    # > 0: distil towards the guided distribution without CFG inside the DMD gradient - the real score (and the
    # student's and critic's start) is the teacher fine-tuned for this many steps on samples of its guided
    # ODE (`fit_guided`), and the GAN's real samples are those samples. 0 = CFG inside the real score (DMD2)
    guided_fit_steps: int = 0
    guided_fit_pool: int = 65536  # guided ODE samples it is fitted on
    guided_fit_ode_steps: int = 100  # Euler steps of that ODE
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "ttur", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.lr_final <= 1.0:
            raise ValueError(f"DistillConfig.lr_final is a fraction in (0, 1], got {self.lr_final}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"DistillConfig.ema is a decay in [0, 1), got {self.ema}")
        if self.guided_fit_steps < 0 or self.guided_fit_pool < 1 or self.guided_fit_ode_steps < 1:
            raise ValueError(
                "DistillConfig.guided_fit_steps must be >= 0 and guided_fit_pool / guided_fit_ode_steps >= 1, got "
                f"{self.guided_fit_steps} / {self.guided_fit_pool} / {self.guided_fit_ode_steps}"
            )
        if self.iters < 0 or self.critic_warmup < 0 or self.critic_reset < 0:
            raise ValueError(
                "DistillConfig.iters / critic_warmup / critic_reset must be >= 0, got "
                f"{self.iters} / {self.critic_warmup} / {self.critic_reset}"
            )
        if self.critic_samples not in ("step", "final"):
            raise ValueError(
                f"DistillConfig.critic_samples must be 'step' or 'final', got {self.critic_samples!r}"
            )
        if self.critic_target not in ("velocity", "x0"):
            raise ValueError(
                f"DistillConfig.critic_target must be 'velocity' or 'x0', got {self.critic_target!r}"
            )

    @property
    def gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_critic_weight > 0


def _draw_class(pool: list, labels: Tensor, gen: torch.Generator) -> Batch:
    """For each label, a random sample of `pool` = (samples, their labels) of that class."""
    samples, pool_labels = pool
    out = torch.empty_like(labels)
    for c in labels.unique().tolist():
        where = (labels == c).nonzero().squeeze(1)
        members = (pool_labels == c).nonzero().squeeze(1)
        out[where] = members[torch.randint(len(members), (len(where),), generator=gen)]
    return [x[out] for x in samples]


def _gan_logits(critic: ToyMLP, head: nn.Linear, x: Batch, sigma: Tensor, labels: Tensor) -> Tensor:
    """The GAN head on the critic's last hidden layer: one real/fake logit per sample."""
    return head(critic.features(x, sigma, labels)).squeeze(1)


def _cosine(opt: torch.optim.Optimizer, steps: int, final: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr x (final + (1 - final) (1 + cos(pi i / steps)) / 2) at update i."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )


def _x0_critic_loss(
    critic: ToyMLP, x_g: Batch, sigma: Tensor, labels: Tensor, gen: torch.Generator
) -> Tensor:
    """Control: the critic regresses x0 (mean |x0_pred - x_g|^2 per modality) = the velocity loss weighted by s^2."""
    x0 = dmd.detach(x_g)
    x_t = dmd.noise_batch(x0, dmd.randn_like_batch(x0, gen), sigma)
    pred = dmd.predict_x0(critic, x_t, sigma, labels)
    return sum(dmd.modality_mean((p - t).pow(2)) for p, t in zip(pred, x0, strict=True))


def distill(
    teacher: ToyMLP, spec: DataSpec, cfg: DistillConfig, log_every: int = 0
) -> tuple[ToyMLP, dict[str, list[float]]]:
    """DMD-2 with backward simulation and TTUR; student and critic start as copies of the teacher.

    Every iteration: draw the student step k (from a generator seeded by the iteration, as ranks would),
    simulate the student to step k without grad, predict x0 at step k; every `ttur`-th iteration that x0
    (with grad) takes a generator step on the DMD loss (+ GAN); then the critic takes a flow-matching step
    (+ GAN discriminator) on the detached x0 at an independently drawn noise level. Returns the student (its
    EMA if `cfg.ema`) and a loss history.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    guidance, pool = cfg.guidance, None
    if cfg.guided_fit_steps > 0 and guidance is not None:
        teacher, *pool = fit_guided(
            teacher,
            spec,
            guidance,
            cfg.guided_fit_steps,
            cfg.guided_fit_pool,
            cfg.guided_fit_ode_steps,
            seed=cfg.seed,
        )
        guidance = None
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    num_critics = cfg.num_steps if cfg.critic_per_step else 1
    critics = [copy.deepcopy(teacher).requires_grad_(cfg.train_critic).train() for _ in range(num_critics)]
    heads = [nn.Linear(teacher.head.in_features, 1) for _ in range(num_critics)] if cfg.gan else []
    opt_g = torch.optim.AdamW(
        student.parameters(), cfg.lr_gen, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    critic_params = [p for m in critics + heads for p in m.parameters()]
    opt_c = torch.optim.AdamW(critic_params, cfg.lr_critic, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched_g = _cosine(opt_g, max(1, -(-cfg.iters // cfg.ttur)), cfg.lr_final)
    sched_c = _cosine(opt_c, cfg.iters + cfg.critic_warmup, cfg.lr_final)
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema else None
    sigmas = dmd.student_sigmas(cfg.num_steps, cfg.student_shift)
    score = dict(low=cfg.score_low, high=cfg.score_high, generator=gen, method=cfg.score_method)
    critic_shift = cfg.score_shift if cfg.critic_shift is None else cfg.critic_shift
    null = spec.null_class
    history: dict[str, list[float]] = {"dmd": [], "critic": [], "g_abs": [], "gan_g": [], "gan_d": []}
    t0 = time.perf_counter()

    for it in range(cfg.iters + cfg.critic_warmup):
        if cfg.critic_reset and it > 0 and it % cfg.critic_reset == 0:
            for c in critics:
                c.load_state_dict(teacher.state_dict())
            opt_c.state.clear()
        labels = torch.randint(spec.num_classes, (cfg.batch,), generator=gen)
        k = dmd.sample_step_index(cfg.num_steps, dmd.shared_generator(cfg.seed, it))
        k = k if cfg.backward_simulation else 0
        critic = critics[k if cfg.critic_per_step else 0]
        head = heads[k if cfg.critic_per_step else 0] if heads else None
        fake_score = guided(critic, guidance) if cfg.fake_guidance else critic
        x_k = dmd.simulate_to_step(student, toy_noise(spec, cfg.batch, gen), k, sigmas, labels, gen)
        train_it = it - cfg.critic_warmup
        if train_it >= 0 and train_it % cfg.ttur == 0:
            x_g = dmd.student_x0(student, x_k, sigmas[k], labels)
            out = dmd.dmd_generator_loss(
                x_g,
                teacher,
                fake_score,
                dmd.sample_score_sigma(cfg.batch, shift=cfg.score_shift, **score),
                labels,
                uncond=torch.full_like(labels, null),
                guidance=guidance,
                normalizer=cfg.normalizer,
                weights=cfg.weights,
                generator=gen,
            )
            loss = -out.loss if cfg.flip_sign else out.loss
            if head is not None and cfg.gan_generator_weight > 0:
                (
                    critic.requires_grad_(False),
                    head.requires_grad_(False),
                )  # DMD2: no critic grads in this phase
                s_gan = dmd.sample_gan_sigma(cfg.batch, cfg.gan_sigma_max, gen)
                x_gan = dmd.noise_batch(x_g, dmd.randn_like_batch(x_g, gen), s_gan)
                gan_g = dmd.gan_generator_loss(_gan_logits(critic, head, x_gan, s_gan, labels))
                loss = loss + cfg.gan_generator_weight * gan_g
                critic.requires_grad_(cfg.train_critic), head.requires_grad_(True)
                history["gan_g"].append(gan_g.item())
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
            opt_g.step()
            sched_g.step()
            if ema is not None:
                ema.update_parameters(student)
            history["dmd"].append(out.loss.item())
            history["g_abs"].append(float(sum(dmd.mean_abs(out.g))))
            x_fake = dmd.detach(x_g)
        else:
            with torch.no_grad():
                x_fake = dmd.student_x0(student, x_k, sigmas[k], labels)
        if not cfg.train_critic:
            continue
        if cfg.critic_samples == "final":
            x_fake = dmd.finish_from_step(student, x_fake, k, sigmas, labels, gen)
        s_critic = dmd.sample_score_sigma(cfg.batch, shift=critic_shift, **score)
        if cfg.critic_target == "x0":
            c_loss = _x0_critic_loss(critic, x_fake, s_critic, labels, gen)
        else:
            c_loss = dmd.critic_loss(critic, x_fake, s_critic, labels, weights=cfg.weights, generator=gen)
        if head is not None and cfg.gan_critic_weight > 0:
            if pool is None:
                real, _ = sample_data(spec, labels, gen)
            else:  # guided samples of each label's class
                real = _draw_class(pool, labels, gen)
            s_gan = dmd.sample_gan_sigma(cfg.batch, cfg.gan_sigma_max, gen)
            x_real, x_fake_t = dmd.diffusion_gan_inputs(real, x_fake, s_gan, gen)
            gan_d = dmd.gan_discriminator_loss(
                _gan_logits(critic, head, x_real, s_gan, labels),
                _gan_logits(critic, head, x_fake_t, s_gan, labels),
            )
            c_loss = c_loss + cfg.gan_critic_weight * gan_d
            history["gan_d"].append(gan_d.item())
        opt_c.zero_grad(set_to_none=True)
        c_loss.backward()
        nn.utils.clip_grad_norm_(critic_params, cfg.clip)
        opt_c.step()
        sched_c.step()
        history["critic"].append(c_loss.item())
        if log_every and it % log_every == 0:
            last_dmd = history["dmd"][-1] if history["dmd"] else float("nan")
            print(
                f"dmd it {it} dmd {last_dmd:.3f} critic {c_loss.item():.4f} ({time.perf_counter() - t0:.0f}s)"
            )
    final = ema.module if ema is not None else student
    return final.requires_grad_(False).eval(), history

"""DMD-2 distillation of the joint audio-video DiT into a few-step CFG-free student (Yin et al., arXiv 2405.14867).

Three roles share the DiT architecture: the frozen teacher (real score, CFG inside), the critic (fake score,
trainable, initialised from the teacher) and the student (generator). The LightningModule wires the pure
functions of `magi_train.flow.dmd` together under manual optimisation: the critic steps every iteration,
the student every `generator_every` iterations (two-time-scale rule), each role with its own AdamW,
clipping, schedule and non-finite guard (tasks/guard.py). `trainer.global_step` counts iterations (critic
steps, a skipped one included). The student's EMA and the validation samples of its 8-step sampler are handled by `tasks/ema.py StudentEMA` and `validation_step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import safetensors.torch
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from magi_train.config import DistillConfig, GenerateConfig, RoleConfig
from magi_train.data.reader import ClipBatch
from magi_train.flow import dmd
from magi_train.flow.dmd_metrics import distill_metrics
from magi_train.flow.matching import Mode, condition_velocities, drop_text, impose_conditions, sample_modes
from magi_train.flow.sampling import sample_distilled, sample_unipc
from magi_train.models import lora
from magi_train.models.dit import TEXT, DiT, PackedSeq
from magi_train.models.lora import adapter_parameters
from magi_train.models.tread import seed_tread
from magi_train.tasks.ema import EMA_KEY, ShardedEMA
from magi_train.tasks.guard import NonFiniteGuard, check_checkpoint_finite, grad_norm
from magi_train.tasks.optim import build_optimizer
from magi_train.tasks.pretrain import load_null_text
from magi_train.tasks.sample_videos import validation_videos
from magi_train.tasks.sharding import (
    RoleSetup,
    data_rank,
    device_mesh,
    micro_index,
    prepare_role,
    stream_seed,
)
from magi_train.utils.fileio import atomic_file

# ---------------------------------------------------------------------------------------------------------
# Conditioning and the DiT as a ScoreModel
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DiTCondition:
    """Conditioning of a batch of clips; teacher, critic and student receive the same object."""

    text: list[Tensor]  # per clip [L, D]
    first_frames: list[Tensor | None]  # i2v: clean first latent frame [48, 1, H, W], else None
    clean_audio: list[Tensor | None]  # a2v: clean audio latent [A, 64], else None

    def with_text(self, text: list[Tensor]) -> DiTCondition:
        """The same image/audio conditions with other text features (the CFG uncond branch)."""
        return dataclasses.replace(self, text=text)


class DiTScore:
    """The `dmd.ScoreModel` view of a timestep-free DiT: ([video clips, audio clips], sigma [N], cond) -> [v, a].

    sigma never reaches the DiT (no timestep input). Conditioning is by replacement, as in the sampler: the
    clean first frame (i2v) and the clean audio (a2v) replace the noisy inputs, and their velocity is set to
    (x_s - clean) / s, so that every role's x0 equals the condition there. The DMD gradient and the critic
    loss are then zero on conditioned parts, as the pretraining loss is. `autocast_dtype` runs a bf16-stored
    teacher under autocast.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None, batch_cfg: bool = False):
        self.model = model
        self.autocast_dtype = autocast_dtype
        if batch_cfg:  # dmd.teacher_x0 then runs the conditional and unconditional branches in one forward
            self.cond_uncond = self._cond_uncond

    def _cond_uncond(
        self, xs: dmd.Batch, sigma: Tensor, cond: DiTCondition, uncond: DiTCondition
    ) -> tuple[dmd.Batch, dmd.Batch]:
        """Both CFG branches as 2N clips of one packed forward (per-clip attention keeps them apart)."""
        video, audio = xs
        n = len(video)
        both = DiTCondition(
            cond.text + uncond.text,
            cond.first_frames + uncond.first_frames,
            cond.clean_audio + uncond.clean_audio,
        )
        v, a = self([video + video, audio + audio], torch.cat([sigma, sigma]), both)
        return [v[:n], a[:n]], [v[n:], a[n:]]

    def __call__(self, xs: dmd.Batch, sigma: Tensor, cond: DiTCondition) -> dmd.Batch:
        video, audio = xs
        video_in, audio_in = impose_conditions(video, audio, cond.first_frames, cond.clean_audio)
        device = video[0].device
        if self.autocast_dtype is not None:
            with torch.autocast(device.type, dtype=self.autocast_dtype):
                v, a = self.model(video_in, audio_in, cond.text)
        else:
            v, a = self.model(video_in, audio_in, cond.text)
        s = sigma.to(device).clamp_min(1e-6)  # model calls never use s = 0; guard the division anyway
        first_v, audio_v = condition_velocities(video, audio, cond.first_frames, cond.clean_audio, s)
        v, a = impose_conditions(v, a, first_v, audio_v)  # x0 = x_s - s v is then the condition there
        return [v, a]


class AdapterRole:
    """One DMD-2 role of a shared LoRA base (models/lora.py): the frozen base with adapter `name` active (NONE: the
    bare base, i.e. the teacher). Not a module, so the base is registered once (as `DMD2Task.base`) and its 15B
    weights are held once; a role shows only its own adapter's parameters to optimizers, EMAs and checkpoints."""

    def __init__(self, base: DiT, name: str):
        self.base, self.name = base, name
        self.cfg, self.block = base.cfg, base.block

    def __call__(self, *args, **kwargs):
        with lora.active(self.name):
            if self.name == lora.NONE and self.base.training:  # the teacher runs as in eval mode
                self.base.eval()
                try:
                    return self.base(*args, **kwargs)
                finally:
                    self.base.train()
            return self.base(*args, **kwargs)

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        for name, p in self.base.named_parameters(prefix):
            if f".lora.{self.name}." in name and self.name != lora.NONE:
                yield name, p

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    def requires_grad_(self, flag: bool = True) -> AdapterRole:
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def train(self, mode: bool = True) -> AdapterRole:  # the base's mode is the task's
        return self

    def eval(self) -> AdapterRole:
        return self

    def num_parameters(self) -> int:
        return self.base.num_parameters()


# ---------------------------------------------------------------------------------------------------------
# Optional GAN term: a small head on the critic's features (DMD2)
# ---------------------------------------------------------------------------------------------------------


class FeatureTap:
    """Keeps the output (and packing layout) of one critic layer from its latest forward."""

    def __init__(self, layer: nn.Module, adapter: str | None = None):
        """adapter: on a shared LoRA base, only forwards with this adapter active are kept (the critic's)."""
        self.value: tuple[Tensor, PackedSeq] | None = None
        self.adapter = adapter
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.adapter is None or lora.current() == self.adapter:
            self.value = (output, args[1])

    def pop(self) -> tuple[Tensor, PackedSeq]:
        if self.value is None:
            raise RuntimeError("no critic features captured: the critic did not run since the last pop")
        value, self.value = self.value, None
        return value


class DiscriminatorHead(nn.Module):
    """One logit per clip: an MLP scores every video and audio token of the critic's features, averaged per
    clip (a token-level "patch" discriminator; DMD2 puts a small conv head on the UNet bottleneck)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )

    def forward(self, h: Tensor, seq: PackedSeq) -> Tensor:
        logits = self.net(h.float()).squeeze(-1)  # [L], packed order [v1 a1 t1 | v2 a2 t2 | ...]
        keep = (seq.modality != TEXT).to(logits.dtype)
        lens = (seq.cu_seqlens[1:] - seq.cu_seqlens[:-1]).long()
        clip = torch.repeat_interleave(torch.arange(len(lens), device=logits.device), lens)
        total = logits.new_zeros(len(lens)).index_add(0, clip, logits * keep)
        count = logits.new_zeros(len(lens)).index_add(0, clip, keep)
        return total / count.clamp_min(1)


# ---------------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------------


def _noop() -> None:
    return None


class DMD2Task(L.LightningModule):
    """DMD-2 over named roles with backward simulation, TTUR, per-role AdamW and clipping, optional GAN."""

    def __init__(
        self,
        teacher: DiT,
        critic: DiT,
        student: DiT,
        cfg: DistillConfig,
        text_dim: int,
        seed: int = 0,
        accumulate: int = 1,
        sample_dir: str | None = None,
        max_nonfinite_steps: int = 20,
        setups: dict[str, RoleSetup] | None = None,
        sharded_ema: tuple[float, int] | None = None,
        base: DiT | None = None,
        codecs: GenerateConfig | None = None,
    ):
        """setups: how configure_model makes each role (teacher, critic, student) ready; under strategy=fsdp2 the
        roles arrive on the meta device and are filled from their sources there. sharded_ema: (decay, start_step)
        of the student EMA kept on the local shards under fsdp2 (other strategies use the StudentEMA callback).
        base: a shared LoRA base with adapters `critic` and `student` (models/lora.py); teacher, critic and student
        are then its AdapterRoles. With LoRA (shared or not) checkpoints hold the adapters (and GAN head) only.
        codecs: the run's generate.* node; when it names a video decoder and an audio VAE, validation writes
        [student | teacher] mp4s of `cfg.sample_videos` clips (tasks/sample_videos.py)."""
        super().__init__()
        if base is not None:
            self.base = base
            teacher, critic, student = (AdapterRole(base, n) for n in (lora.NONE, "critic", "student"))
        validate_distill(cfg)
        self.setups = setups or {}
        self.sharded_ema = sharded_ema
        self.student_ema: ShardedEMA | None = None
        self._configured = False
        if accumulate < 1:
            raise ValueError(f"gradient accumulation must be >= 1, got {accumulate}")
        self.automatic_optimization = False
        self.teacher = teacher.requires_grad_(False).eval()
        self.critic, self.student = critic, student
        self.cfg, self.seed, self.accumulate = cfg, seed, accumulate
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self.videos = validation_videos(codecs, cfg.sample_videos)  # not a module: outside checkpoints
        self.register_buffer("null_text", load_null_text(cfg.negative_text, text_dim), persistent=False)
        sigmas = dmd.student_sigmas(cfg.num_student_steps, cfg.shift)
        self.register_buffer("student_sigmas", sigmas, persistent=False)
        bf16 = torch.bfloat16 if cfg.teacher.dtype == "bf16" else None
        shared = (
            bf16 if base is not None else None
        )  # the roles of a bf16-stored shared base run as the teacher
        self.teacher_score = DiTScore(teacher, bf16, batch_cfg=cfg.batch_cfg)
        self.critic_score = DiTScore(critic, shared)
        self.student_score = DiTScore(student, shared)
        self.lora = bool(adapter_parameters(base if base is not None else critic))
        self.disc: DiscriminatorHead | None = None
        self._tap: FeatureTap | None = None
        if cfg.gan:
            layers = critic.block.layers
            index = len(layers) // 2 if cfg.gan_layer is None else cfg.gan_layer
            if not 0 <= index < len(layers):
                raise ValueError(
                    f"distill.gan_layer={cfg.gan_layer}: the critic has layers 0..{len(layers) - 1}"
                )
            self.disc = DiscriminatorHead(critic.cfg.hidden_size)
            self._tap = FeatureTap(layers[index], "critic" if base is not None else None)
        self.generator_stepped = False  # read (and reset) by StudentEMA after each generator update
        self._micro = 0  # micro-batch within the current iteration (gradient accumulation)
        self._gen_logs: dict[str, Tensor] = {}
        # non-finite steps are skipped and counted per role (tasks/guard.py)
        self.guards = {
            role: NonFiniteGuard(max_nonfinite_steps, f"distill.{role}.optim.lr", role)
            for role in ("student", "critic")
        }

    def configure_model(self) -> None:
        if self._configured:
            return
        self._configured = True
        mesh = device_mesh(self)
        if (
            self.shared_base
        ):  # one FSDP2 tree: the teacher's storage and source, the trained roles' checkpointing
            setup = self.setups.get("teacher", RoleSetup())
            setup = dataclasses.replace(setup, parallel=self.setups.get("student", RoleSetup()).parallel)
            prepare_role(self.base, setup, mesh, self.device, stream_seed(self.seed, 0, "teacher"), self.seed)
        else:
            for role in ("teacher", "critic", "student"):  # each its own FSDP2 tree on the same mesh
                setup = self.setups.get(role, RoleSetup())
                seed = stream_seed(self.seed, 0, role)
                prepare_role(getattr(self, role), setup, mesh, self.device, seed, self.seed)
        self.teacher.requires_grad_(False).eval()
        if mesh is None:
            return
        if self.disc is not None:
            from magi_train.models.parallelize import apply_fsdp_module

            apply_fsdp_module(self.disc, mesh)  # its gradients are reduced like the critic's
        if not self.cfg.save_teacher:
            self.checkpoint_skips = (
                "teacher.",
            )  # resumed checkpoints hold no teacher: it comes from its source
        if self.sharded_ema is not None:
            if self.shared_base:
                self.student_ema = ShardedEMA(*self.sharded_ema).attach(
                    self.base, keep=lambda name: ".lora.student." in name
                )
            else:
                keep = lora.is_adapter_key if self.lora else None
                self.student_ema = ShardedEMA(*self.sharded_ema).attach(self.student, keep=keep)

    @property
    def shared_base(self) -> bool:
        return "base" in self._modules

    def checkpoint_skip(self, key: str) -> bool:
        """State-dict keys a checkpoint leaves out: LoRA's frozen base (re-read from the teacher's source), or the
        teacher with save_teacher false."""
        if self.lora:
            return not (lora.is_adapter_key(key) or key.startswith("disc."))
        return not self.cfg.save_teacher and key.startswith("teacher.")

    def on_validation_epoch_start(self) -> None:
        if self.student_ema is not None and not self.trainer.sanity_checking:
            self.student_ema.swap()  # validation samples with the EMA student

    def on_validation_epoch_end(self) -> None:
        if self.student_ema is not None and not self.trainer.sanity_checking:
            self.student_ema.swap()

    def train(self, mode: bool = True) -> DMD2Task:
        super().train(mode)
        self.teacher.eval()  # the real score stays frozen in eval mode (a shared base's teacher: AdapterRole)
        return self

    # -- helpers -----------------------------------------------------------------------------------------------

    def _generator(
        self, step: int, name: str, device: torch.device | str | None = None, index: int | None = None
    ) -> torch.Generator:
        """The stream `name` of (iteration or validation batch `step`, data index `index`; default this rank's)."""
        device = self.device if device is None else device
        index = data_rank(self) if index is None else index
        return torch.Generator(device=device).manual_seed(stream_seed(self.seed, step, name, index))

    def conditioning(self, batch: ClipBatch, generator: torch.Generator) -> tuple[DiTCondition, DiTCondition]:
        """(cond, uncond) of a batch: modes drawn per clip; uncond = negative-prompt features, same image/audio."""
        n = len(batch)
        modes = sample_modes(n, self.cfg.mode_probs, generator=generator)
        images = batch.image if len(batch.image) == n else [None] * n
        first = [
            ((img if img is not None else v[:, :1]) if m == Mode.I2V else None)
            for m, img, v in zip(modes, images, batch.video, strict=True)
        ]
        audio = [a if m == Mode.A2V else None for m, a in zip(modes, batch.audio, strict=True)]
        cond = DiTCondition(list(batch.text), first, audio)
        uncond = cond.with_text(drop_text(batch.text, torch.ones(n, dtype=torch.bool), self.null_text))
        return cond, uncond

    def score_sigma(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.cfg
        return dmd.sample_score_sigma(
            n,
            c.score_sigma_min,
            c.score_sigma_max,
            c.score_shift,
            generator=generator,
            device=self.device,
            method=c.score_sigma_method,
        )

    def discriminate(self, x_t: dmd.Batch, sigma: Tensor, cond: DiTCondition) -> Tensor:
        """GAN logits [N] of latents already noised to sigma, read through the critic's features."""
        assert self.disc is not None and self._tap is not None
        self._tap.value = None
        self.critic_score(x_t, sigma, cond)
        return self.disc(*self._tap.pop())

    def gan_sigma(self, n: int, generator: torch.Generator) -> Tensor:
        """Noise levels of the diffusion-GAN inputs: uniform over the whole training range, as DMD2 draws them
        (flow/dmd.py sample_gan_sigma), not the DMD step's shifted and clamped levels."""
        return dmd.sample_gan_sigma(n, generator=generator, device=self.device)

    # -- the two objectives ------------------------------------------------------------------------------------

    def generator_objective(
        self, x_k: dmd.Batch, k: int, cond: DiTCondition, uncond: DiTCondition, generator: torch.Generator
    ) -> tuple[Tensor, dmd.Batch, dict[str, Tensor]]:
        """Student x0 at step k (with grad) and its DMD loss (+ GAN generator term). Returns (loss, x_g, logs)."""
        c = self.cfg
        x_g = dmd.student_x0(self.student_score, x_k, self.student_sigmas[k], cond)
        n = dmd.num_samples(x_g)
        sigma = self.score_sigma(n, generator)
        out = dmd.dmd_generator_loss(
            x_g,
            self.teacher_score,
            self.critic_score,
            sigma,
            cond,
            uncond,
            c.guidance,
            c.normalizer,
            [1.0, c.audio_weight],
            generator=generator,
        )
        g_video, g_audio = dmd.mean_abs(out.g)
        logs = {
            "dmd_loss": out.loss.detach(),
            "g_abs_video": g_video,
            "g_abs_audio": g_audio,
            "score_sigma": sigma.mean(),
            "step_index": torch.tensor(float(k)),
            "student_video_std": _modality_std(x_g[0]),
            "student_audio_std": _modality_std(x_g[1]),
        }
        loss = out.loss
        if c.gan:
            sigma_gan = self.gan_sigma(n, generator)
            x_t = dmd.noise_batch(x_g, dmd.randn_like_batch(x_g, generator), sigma_gan)
            gan = dmd.gan_generator_loss(self.discriminate(x_t, sigma_gan, cond))
            loss = loss + c.gan_generator_weight * gan
            logs["gan_generator_loss"] = gan.detach()
        return loss, x_g, logs

    def critic_samples(
        self, x_g: dmd.Batch, k: int, cond: DiTCondition, generator: torch.Generator
    ) -> dmd.Batch:
        """What the critic learns this iteration: step k's x0 (`distill.critic_samples=step`), or the finished
        sample of the same chain (`final`: dmd.finish_from_step, no grad)."""
        if self.cfg.critic_samples == "step":
            return x_g
        return dmd.finish_from_step(self.student_score, x_g, k, self.student_sigmas, cond, generator)

    def critic_objective(
        self, x_g: dmd.Batch, real: dmd.Batch, cond: DiTCondition, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching loss of the critic on detached student samples (+ GAN discriminator term)."""
        c = self.cfg
        x_g = dmd.detach(x_g)
        n = dmd.num_samples(x_g)
        sigma = self.score_sigma(n, generator)
        loss = dmd.critic_loss(self.critic_score, x_g, sigma, cond, generator=generator)
        logs = {"critic_loss": loss.detach()}
        if c.gan:  # DMD2: real and fake noised at the same levels, uniform over the training range
            sigma_gan = self.gan_sigma(n, generator)
            real_t, fake_t = dmd.diffusion_gan_inputs(real, x_g, sigma_gan, generator)
            fake = self.discriminate(fake_t, sigma_gan, cond)
            real_logits = self.discriminate(real_t, sigma_gan, cond)
            gan = dmd.gan_discriminator_loss(real_logits, fake)
            loss = loss + c.gan_critic_weight * gan
            logs["gan_critic_loss"] = gan.detach()
            logs["gan_real_logit"] = real_logits.detach().mean()
            logs["gan_fake_logit"] = fake.detach().mean()
        return loss, logs

    # -- the loop ----------------------------------------------------------------------------------------------

    def training_step(self, batch: ClipBatch, batch_idx: int) -> None:
        c, acc = self.cfg, self.accumulate
        it, micro = self.global_step, self._micro
        last = micro == acc - 1
        self._micro = 0 if last else micro + 1
        # every random draw of this micro-batch comes from streams of (iteration, data index): the same whether the
        # micro-batches of an iteration are spread over ranks or accumulated (cp ranks share their index)
        index = micro_index(self, micro, acc)
        seed_tread(stream_seed(self.seed, it, "tread", index), self.student, self.critic)  # TREAD's choice
        opt_s, opt_c = self.optimizers()
        sched_s, sched_c = self.lr_schedulers()
        noise_gen = self._generator(it, "train", index=index)
        cond, uncond = self.conditioning(batch, self._generator(it, "modes", "cpu", index=index))
        real = [[v.float() for v in batch.video], [a.float() for a in batch.audio]]

        # backward simulation: one k per iteration, the same on every rank and micro-batch (FSDP ranks must run the
        # same number of forwards)
        k = dmd.sample_step_index(c.num_student_steps, dmd.shared_generator(self.seed, it))
        x_k = dmd.simulate_to_step(
            self.student_score, dmd.randn_like_batch(real, noise_gen), k, self.student_sigmas, cond, noise_gen
        )
        if micro == 0:
            opt_s.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)

        if it % c.generator_every == 0:
            with self._critic_gradients_kept(opt_c):  # only student parameters take gradients in this phase
                loss, x_g, logs = self.generator_objective(x_k, k, cond, uncond, noise_gen)
                self.guards["student"].observe(loss)
                self.manual_backward(loss / acc)
            self._gen_logs = logs
            if last:
                self._gen_logs["grad_norm_student"], stepped = self._step(
                    opt_s, sched_s, c.student.optim.grad_clip, "student"
                )
                self.generator_stepped = stepped  # the EMA follows updates taken only
                if (
                    self.student_ema is not None and stepped
                ):  # StudentEMA's schedule (it counts iteration it + 1)
                    self.student_ema.update(copy=it + 1 <= self.sharded_ema[1])
        else:
            with torch.no_grad():
                x_g = dmd.student_x0(self.student_score, x_k, self.student_sigmas[k], cond)

        loss_c, logs_c = self.critic_objective(
            self.critic_samples(x_g, k, cond, noise_gen), real, cond, noise_gen
        )
        self.guards["critic"].observe(loss_c)
        self.manual_backward(loss_c / acc)
        if last:
            logs_c["grad_norm_critic"], _ = self._step(opt_c, sched_c, c.critic.optim.grad_clip, "critic")
        for role, guard in self.guards.items():
            logs_c[f"nonfinite_steps_{role}"] = torch.tensor(float(guard.total))
        logs_c["nonfinite_steps"] = torch.tensor(float(sum(g.total for g in self.guards.values())))

        n = len(batch)
        # generator values are logged on the iterations that computed them (every generator_every-th, TTUR)
        gen_logs, self._gen_logs = self._gen_logs, {}
        for name, value in {**gen_logs, **logs_c}.items():
            self.log(f"train/{name}", value, batch_size=n, prog_bar=name in ("dmd_loss", "critic_loss"))
        self.log("train/lr_student", opt_s.param_groups[0]["lr"], batch_size=n)
        self.log("train/lr_critic", opt_c.param_groups[0]["lr"], batch_size=n)
        self.log("train/clips", float(n), batch_size=n)

    @contextlib.contextmanager
    def _critic_gradients_kept(self, opt_c):
        """The generator phase leaves the critic's gradients as they were. Teacher and fake score run without grad;
        only the GAN generator term backpropagates through the critic, and what that writes into its gradients is
        discarded. (Lightning's toggle_optimizer, which flips requires_grad, is not used: FSDP2 gathers parameters
        with the requires_grad they had at its first all-gather, and the critic then loses gradients.)"""
        if not self.cfg.gan:
            yield
            return
        params = [p for g in opt_c.param_groups for p in g["params"]]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(params, kept, strict=True):
                p.grad = g

    def _step(self, opt, sched, clip: float, role: str) -> tuple[Tensor, bool]:
        """Clip, step, zero and schedule one role, unless its loss or gradient norm is not finite (then skipped and
        counted by the role's guard). Returns the pre-clip grad norm (local to the rank if sharded) and whether the
        update was taken."""
        norm = grad_norm(p for g in opt.param_groups for p in g["params"])
        counted = role == "critic"  # counted by Lightning: global_step = critic steps = iterations
        if not self.guards[role].check(norm, self.global_step, self.trainer.strategy.reduce_boolean_decision):
            opt.zero_grad(set_to_none=True)
            if counted:
                # Still stepped, with no gradients (AdamW then changes nothing): global_step must advance, since
                # max_steps, the data position and every noise seed follow it; so the skipped iteration is consumed
                # as in an uninterrupted run (exact resume) and the next one draws new noise. No schedule step: the
                # role's LR follows the updates it took.
                opt.step()
            return norm, False
        if clip > 0:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        if counted:
            opt.step()
        else:
            # same strategy/precision path as LightningOptimizer.step, without counting a second global step
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=_noop)
        opt.zero_grad(set_to_none=True)
        sched.step()
        return norm, True

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self._trainer is not None else 0
        opt_s, sched_s = build_optimizer(self.student.named_parameters(), self.cfg.student.optim, max_steps)
        critic = [*self.critic.named_parameters(prefix="critic")]
        if self.disc is not None:
            critic += [*self.disc.named_parameters(prefix="disc")]
        opt_c, sched_c = build_optimizer(critic, self.cfg.critic.optim, max_steps)
        return [
            {"optimizer": opt_s, "lr_scheduler": {"scheduler": sched_s, "interval": "step"}},
            {"optimizer": opt_c, "lr_scheduler": {"scheduler": sched_c, "interval": "step"}},
        ]

    # -- validation: the student's own 8-step sampler, with teacher and critic x0 side by side ---------------

    def validation_step(self, batch: ClipBatch, batch_idx: int) -> None:
        c, n = self.cfg, len(batch)
        gen = self._generator(batch_idx, "val")  # fixed per batch: comparable across checkpoints
        cond, uncond = self.conditioning(batch, self._generator(batch_idx, "val_modes", "cpu"))
        real = [[v.float() for v in batch.video], [a.float() for a in batch.audio]]
        noise = dmd.randn_like_batch(real, gen)
        video, audio = sample_distilled(
            self.student,
            noise[0],
            noise[1],
            cond.text,
            c.num_student_steps,
            c.shift,
            generator=gen,
            first_frames=cond.first_frames,
            clean_audio=cond.clean_audio,
        )
        x_g = [video, audio]
        sigma = torch.full((n,), c.sample_sigma, device=self.device)
        x_t = dmd.noise_batch(x_g, dmd.randn_like_batch(x_g, gen), sigma)
        x0_real = dmd.teacher_x0(self.teacher_score, x_t, sigma, cond, uncond, c.guidance)
        x0_fake = dmd.predict_x0(self.critic_score, x_t, sigma, cond)
        g = dmd.dmd_gradient(x_g, x0_real, x0_fake, c.normalizer)
        for m, name in enumerate(("video", "audio")):
            stats = {
                f"g_abs_{name}": dmd.modality_mean([xi.abs() for xi in g[m]]),
                f"teacher_gap_{name}": _mean_abs_diff(x0_real[m], x_g[m]),
                f"critic_gap_{name}": _mean_abs_diff(x0_fake[m], x_g[m]),
                f"sample_{name}_std": _modality_std(x_g[m]),
            }
            for key, value in stats.items():
                self.log(f"val/{key}", value, batch_size=n, sync_dist=True)
        # distance to the guided teacher's own samples (same noise) and audio-video coupling (flow/dmd_metrics.py)
        teacher = self.teacher_samples(batch_idx, batch, noise, cond, uncond)
        judge = lambda xt, s: dmd.teacher_x0(self.teacher_score, xt, s, cond, uncond, c.guidance)  # noqa: E731
        for key, value in distill_metrics(x_g, teacher, judge, c.sample_sigma, gen).items():
            self.log(f"val/{key}", value, batch_size=n, sync_dist=True)
        if batch_idx == 0 and self.sample_dir is not None and self.trainer.is_global_zero:
            self.save_samples(batch, x_g, x0_real, x0_fake, teacher)

    @torch.no_grad()
    def teacher_samples(
        self, batch_idx: int, batch: ClipBatch, noise: dmd.Batch, cond: DiTCondition, uncond: DiTCondition
    ) -> dmd.Batch:
        """The teacher's own samples of a validation batch (released base sampler: 32 UniPC steps, shift 5, the
        distillation's CFG) from the student's noise; computed once per validation batch (the teacher is frozen and
        the validation noise fixed) and cached in memory."""
        key = (
            batch_idx,
            tuple(tuple(v.shape) for v in batch.video),
            float(sum(t.float().sum() for t in batch.text)),
        )
        cache = self.__dict__.setdefault("_teacher_val_cache", {})
        if key not in cache:
            dtype = self.teacher_score.autocast_dtype

            def denoiser(video, audio, text):
                bf16 = dtype is not None
                with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=bf16):
                    v, a = self.teacher(video, audio, text)
                return [x.float() for x in v], [x.float() for x in a]

            video, audio = sample_unipc(
                denoiser,
                noise[0],
                noise[1],
                cond.text,
                uncond.text,
                num_steps=32,
                guidance=self.cfg.guidance,
                first_frames=cond.first_frames,
                clean_audio=cond.clean_audio,
            )
            cache[key] = [list(video), list(audio)]
        return cache[key]

    def save_samples(
        self, batch: ClipBatch, x_g: dmd.Batch, x0_real: dmd.Batch, x0_fake: dmd.Batch, teacher: dmd.Batch
    ) -> None:
        """Latents (safetensors) and a panel image [student sample | teacher x0 | critic x0] of a few clips; with
        codecs, decoded mp4s [student sample | teacher sample] of the first `sample_videos` clips (rank 0 only)."""
        from PIL import Image

        out = self.sample_dir / f"step{self.global_step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        for i in range(min(self.cfg.sample_clips, len(batch))):
            sources = {"student": x_g, "teacher_x0": x0_real, "critic_x0": x0_fake}
            tensors = {
                f"{src}_{mod}": x[m][i].detach().float().cpu().contiguous()
                for src, x in sources.items()
                for m, mod in enumerate(("video", "audio"))
            }
            atomic_file(out / f"clip{i}.safetensors", lambda p, t=tensors: safetensors.torch.save_file(t, p))
            panel = latent_panel([x[0][i] for x in sources.values()], [x[1][i] for x in sources.values()])
            atomic_file(out / f"clip{i}.png", lambda p, a=panel: Image.fromarray(a).save(p, format="PNG"))
            for logger in self.loggers:
                if isinstance(logger, WandbLogger):
                    caption = "student sample | teacher x0 | critic x0 (video mid frame ch 0-2; audio)"
                    logger.log_image(f"samples/clip{i}", [panel], step=self.global_step, caption=[caption])
        if self.videos is not None:
            self.videos.write(out, x_g, teacher, self.device, self.loggers, self.global_step)

    # -- checkpoints -------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora or not self.cfg.save_teacher:  # re-loaded from distill.teacher.checkpoint on resume
            for key in ("state_dict", "current_model_state"):
                if key in checkpoint:
                    checkpoint[key] = {
                        k: v for k, v in checkpoint[key].items() if not self.checkpoint_skip(k)
                    }
        # after StudentEMA's hook (the shadow is in state_dict) and before Lightning writes anything
        check_checkpoint_finite(
            checkpoint,
            self.global_step,
            "distill.student/critic.optim.lr",
            self.trainer.strategy.reduce_boolean_decision,
        )
        checkpoint["nonfinite_guard"] = {role: guard.state_dict() for role, guard in self.guards.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:  # fsdp2: the strategy loaded the sharded weights itself, strictly
            self._micro = 0
            for role, state in checkpoint.get("nonfinite_guard", {}).items():
                self.guards[role].load_state_dict(state)
            return
        if "current_model_state" in checkpoint:  # StudentEMA layout: state_dict holds the EMA student
            ema = checkpoint["state_dict"]
            checkpoint[EMA_KEY] = {
                k.removeprefix("student."): v for k, v in ema.items() if k.startswith("student.")
            }
            checkpoint["state_dict"] = checkpoint.pop("current_model_state")
        saved, own = set(checkpoint["state_dict"]), set(self.state_dict())
        missing, unexpected = sorted(own - saved), sorted(saved - own)
        if self.lora:  # adapters (and GAN head) only: the base comes from the teacher's source
            missing = [k for k in missing if not self.checkpoint_skip(k)]
            self.strict_loading = False
        elif not any(k.startswith("teacher.") for k in saved):
            missing = [k for k in missing if not k.startswith("teacher.")]  # teacher loaded from its path
            self.strict_loading = False
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this distillation setup (model config, distill.gan?): missing "
                f"{missing[:6]} ({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)})"
            )
        self._micro = 0  # checkpoints are written at iteration boundaries
        for role, state in checkpoint.get("nonfinite_guard", {}).items():
            self.guards[role].load_state_dict(state)


def validate_distill(cfg: DistillConfig) -> None:
    """Clear errors for settings DMD-2 cannot run with."""
    for name in ("critic", "student"):
        role: RoleConfig = getattr(cfg, name)
        if len(role.optim.betas) != 2:
            raise ValueError(f"distill.{name}.optim.betas={list(role.optim.betas)}: give two AdamW betas")
        if role.optim.schedule != "constant":
            raise ValueError(
                f"distill.{name}.optim.schedule={role.optim.schedule!r}: DMD-2 roles train at a "
                "constant LR after warm-up (spec/dmd2.md §1); use constant"
            )
    if cfg.teacher.dtype not in ("fp32", "bf16"):
        raise ValueError(f"distill.teacher.dtype={cfg.teacher.dtype!r}: use fp32 or bf16")
    if cfg.generator_every < 1 or cfg.num_student_steps < 1:
        raise ValueError(
            f"distill.generator_every={cfg.generator_every} and distill.num_student_steps="
            f"{cfg.num_student_steps} must be >= 1"
        )
    if cfg.critic_samples not in ("step", "final"):
        raise ValueError(f"distill.critic_samples={cfg.critic_samples!r}: use step or final")
    for name in ("sample_clips", "sample_videos"):
        if getattr(cfg, name) < 0:
            raise ValueError(
                f"distill.{name}={getattr(cfg, name)}: a number of validation clips, >= 0 (0: none)"
            )
    if not 0 < cfg.sample_sigma <= 1:
        raise ValueError(f"distill.sample_sigma={cfg.sample_sigma}: a noise level in (0, 1]")
    if not 0 <= cfg.ema.decay < 1:
        raise ValueError(f"distill.ema.decay={cfg.ema.decay}: use 0 (off) or a decay in (0, 1)")


# ---------------------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _modality_std(x: dmd.Modality) -> Tensor:
    mean = dmd.modality_mean(x)
    return (dmd.modality_mean([xi.float().pow(2) for xi in x]) - mean.pow(2)).clamp_min(0).sqrt().detach()


@torch.no_grad()
def _mean_abs_diff(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return dmd.modality_mean([(x.float() - y.float()).abs() for x, y in zip(a, b, strict=True)]).detach()


def _to_uint8(x: Tensor, scale: int) -> np.ndarray:
    """Latents (about unit scale) mapped from [-3, 3] to 0..255 and enlarged by nearest-neighbour `scale`."""
    img = ((x.detach().float().cpu().clamp(-3, 3) + 3) * (255 / 6)).round().to(torch.uint8)
    return img.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()


def latent_panel(videos: list[Tensor], audios: list[Tensor], gap: int = 4) -> np.ndarray:
    """One RGB image, one column per source: the middle latent frame of video channels 0-2 on top and the
    audio latent [64, A] in grey below, all on the same fixed [-3, 3] scale so that columns compare."""
    columns = []
    for v, a in zip(videos, audios, strict=True):
        frame = v[:3, v.shape[1] // 2]  # [3, H, W]
        vs = max(1, math.ceil(96 / max(frame.shape[1:])))
        top = _to_uint8(frame.permute(1, 2, 0), vs)  # H W 3
        wave = _to_uint8(a.T, 2)  # [128, 2A] grey
        bottom = np.repeat(wave[:, :, None], 3, axis=2)
        width = max(top.shape[1], bottom.shape[1])
        col = np.full((top.shape[0] + gap + bottom.shape[0], width, 3), 255, dtype=np.uint8)
        col[: top.shape[0], : top.shape[1]] = top
        col[top.shape[0] + gap :, : bottom.shape[1]] = bottom
        columns.append(col)
    height = max(c.shape[0] for c in columns)
    padded = [np.pad(c, ((0, height - c.shape[0]), (0, gap), (0, 0)), constant_values=255) for c in columns]
    return np.concatenate(padded, axis=1)[:, :-gap]


__all__ = [
    "DMD2Task",
    "DiTCondition",
    "DiTScore",
    "DiscriminatorHead",
    "FeatureTap",
    "latent_panel",
    "stream_seed",
    "validate_distill",
]

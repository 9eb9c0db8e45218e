"""Typed Hydra schemas: every config group is validated against these dataclasses (struct mode).

Values live in `configs/` and `recipes/`; these classes only fix names, types and defaults, so that a
misspelt key on the command line is an error instead of being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from magi_train.models.dit import MODEL_CONFIGS, DiTConfig


@dataclass
class SyntheticDataConfig:
    """Learnable synthetic clips written into the run directory before training (smoke runs, tests)."""

    enabled: bool = False
    num_clips: int = 256
    samples_per_shard: int = 64
    # (T, H, W) latent sizes mixed in the data, to exercise packing of unequal clips
    sizes: list[list[int]] = field(default_factory=lambda: [[3, 4, 6], [2, 6, 6], [4, 4, 4]])
    text_len: int = 8
    seed: int = 0


@dataclass
class DataConfig:
    """Webdataset shards of pre-encoded latents (DESIGN.md "Shard format")."""

    train_shards: str = MISSING  # path, brace pattern (`shard-{000000..000099}.tar`) or any webdataset url
    val_shards: str | None = None
    text_dim: int = 3584
    max_tokens: int = 16384  # token budget of one packed batch (video + audio + text over all clips)
    max_clips: int | None = None
    shuffle_buffer: int = 256
    num_workers: int = 2
    seed: int = 0
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class FlowConfig:
    """Flow-matching training objective."""

    sigma_sampling: str = "logit_normal"  # logit_normal | uniform
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    shift: float = 1.0  # time shift applied to the sampled sigma; the released sampler uses 5.0
    video_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    # conditioning mode mixture (weights, normalised): t2v, i2v (clean first frame), a2v (clean audio)
    mode_probs: dict[str, float] = field(default_factory=lambda: {"t2v": 0.8, "i2v": 0.1, "a2v": 0.1})
    text_drop_prob: float = 0.1  # learn the unconditional branch used by CFG
    # features that replace dropped text: null = one zero token; or a .npy [L, D] (e.g. negative prompt)
    null_text: str = "null"


@dataclass
class SRConfig:
    """Latent super-resolution inputs (recipe pretrain_sr), released values (spec §5)."""

    alpha: float = 0.8389  # VP re-noise a; zero-SNR DDPM sqrt(alpha_bar) at noise_value 220
    audio_noise_scale: float = 0.7  # audio condition = 0.7*eps + 0.3*audio
    lowres_factor: int = 2  # spatial factor used to derive the low-res latent when a shard lacks lowres.npy


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.9999  # 0 disables EMA
    ema_on_cpu: bool = False  # keep the EMA copy on CPU (big models)


@dataclass
class TrainerConfig:
    """The subset of lightning.Trainer arguments a recipe sets; see configs/trainer/."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: str = "auto"  # auto = bf16-mixed on GPUs with bf16, else 32-true
    max_steps: int = 100_000
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    val_check_interval: int | None = None  # training steps between validations; None = no validation
    limit_val_batches: int = 8
    checkpoint_every_n_steps: int = 1000
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_3
    find_unused_parameters: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "magi_train"
    entity: str | None = None
    mode: str = "offline"  # offline (sync later with `wandb sync`) | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None


@dataclass
class Config:
    """The root config. Recipes pick the groups; every value is overridable on the command line."""

    recipe: str = MISSING
    task: str = MISSING  # which runner in magi_train.recipes executes the recipe
    seed: int = 0
    dry_run: bool = False  # build everything (big models on the meta device), print, exit
    resume: bool = False  # continue from <run_dir>/checkpoints/last.ckpt
    ckpt_path: str | None = None  # or resume from this Lightning checkpoint
    init_from: str | None = None  # initial DiT weights: a released-format directory or our .ckpt
    run_dir: str = "${hydra:runtime.output_dir}"
    model: DiTConfig = field(default_factory=DiTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_configs() -> None:
    """Register the root schema (configs/config.yaml extends it) and the named model sizes.

    The sizes live once, in `MODEL_CONFIGS` of the model file; `model=tiny|small|magihuman_15b` selects
    one and any field stays overridable (`model.num_layers=8`).
    """
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name, model_cfg in MODEL_CONFIGS.items():
        cs.store(group="model", name=name, node=model_cfg)

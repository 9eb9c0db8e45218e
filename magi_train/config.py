"""Typed Hydra schemas: every config group is validated against these dataclasses (struct mode).

Values live in `configs/` and `recipes/`; these classes only fix names, types and defaults, so that a
misspelt key on the command line is an error instead of being dropped.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, OmegaConf

from magi_train.codecs.turbo_vae import TurboVAEConfig
from magi_train.flow.sampling import Guidance, SRGuidance
from magi_train.models.dit import MODEL_CONFIGS, DiTConfig
from magi_train.models.lora import LoRAConfig

T = TypeVar("T")


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
    # > 0: each packed batch holds clips of one aspect-ratio / duration bucket (latent T, H, W), at most
    # this many clips held while waiting (data/reader.py pack_bucketed); 0: pack in stream order
    bucket_buffer: int = 0
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
    # audio's noise level per clip (flow/matching.py sample_sigma_pair): shared = the video's (released schedule);
    # independent = its own draw of the same marginal; correlated = same marginal, Gaussian copula with
    # audio_sigma_correlation in [-1, 1] (the correlation of the underlying normals; 1 = shared, 0 = independent)
    audio_sigma: str = "shared"  # shared | independent | correlated
    audio_sigma_correlation: float = 0.5  # read by audio_sigma=correlated only
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
    """AdamW with linear warm-up, then a constant or cosine schedule (tasks/optim.py); clipping by global norm."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (pretraining: the DiT; DMD-2: the student)."""

    decay: float = 0.9999  # 0 disables
    start_step: int = 0  # optimizer steps before the average starts (DMD-2: a copy until then, Self-Forcing)
    on_cpu: bool = False  # keep the EMA copy on CPU (big models)


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
    # steps with a NaN/inf loss or gradient norm are skipped (tasks/guard.py); this many in a row stop the run
    max_nonfinite_steps: int = 20
    # under Slurm: on SIGUSR1 (sbatch --signal=USR1@120) save <run_dir>/hpc_ckpt_N.ckpt and requeue the job;
    # the requeued job resumes from it (Lightning SLURMEnvironment auto_requeue; launch/train.sbatch)
    slurm_requeue: bool = True


@dataclass
class StrategyConfig:
    name: str = "auto"  # auto | ddp | fsdp2 | deepspeed_stage_2 | deepspeed_stage_3 (magi_train/training/strategies.py)
    find_unused_parameters: bool = False
    # sharded strategies: fsdp2 keeps shards, gradients and the optimizer step on the host (CPUOffloadPolicy);
    # deepspeed the optimizer state (and the parameters at stage 3)
    offload: bool = False
    # fsdp2: processes = dp_replicate x dp_shard x cp; parameters sharded over dp_shard x cp, replicated over
    # dp_replicate (HSDP); cp ranks split each packed sequence (Ulysses context parallelism)
    dp_replicate: int = 1
    cp: int = 1
    reshard_after_forward: bool = True  # fsdp2: free each layer's gathered parameters after its forward
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the Lightning strategy


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
class GenerateConfig:
    """Sampling with any checkpoint (recipe `generate`, magi_train/inference/generate.py); released defaults."""

    prompt: str | None = None
    text_features: str | None = None  # or pre-computed T5-Gemma features: .npy / .safetensors [L, D]
    negative_prompt: str | None = None  # CFG uncond branch; None = the released negative prompt
    negative_text_features: str | None = None  # or its pre-computed features
    image: str | None = None  # i2v: first frame
    image_resize: str = "center_crop"  # center_crop (release) | none (the image must have the base size)
    audio: str | None = None  # a2v: driving audio (any file PyAV reads)
    seconds: float = 4.0  # the clip has seconds*25+1 frames
    width: int = 448  # base size (rounded down to multiples of 32, as the release does)
    height: int = 256
    sr_width: int | None = None  # SR size; needs sr_ckpt
    sr_height: int | None = None
    seed: int = 42  # the release's per-request default
    base_ckpt: str | None = None  # our .ckpt or a released-format directory
    distilled_ckpt: str | None = None  # instead of base_ckpt: the few-step distilled sampler, no CFG
    sr_ckpt: str | None = None
    base_model: str = "magihuman_15b"  # model config of a released-format base/distilled directory
    sr_model: str = "magihuman_15b"
    # a LoRA adapter (.safetensors in the exchange format, docs/lora.md) added live, not merged, to the base or
    # distilled DiT; its update alpha/rank x B A is multiplied by lora_scale (0: the bare base, 2: twice the update)
    lora: str | None = None
    lora_scale: float = 1.0
    sr_lora: str | None = None  # the same for the SR DiT
    sr_lora_scale: float = 1.0
    use_ema: bool = True  # EMA weights of our checkpoints when present
    steps: int = 32  # UniPC steps of the base sampler; released base / SR: 32 / 5 (spec §1)
    sr_steps: int = 5
    shift: float = 5.0  # of the base and SR UniPC schedules (released, spec §4.4)
    # distilled sampler: None = the values the checkpoint was distilled with (its distill.num_student_steps /
    # distill.shift), else the released 8 steps / shift 5 (released-format directories carry no config)
    distilled_steps: int | None = None
    distilled_shift: float | None = None
    cfg: bool = True  # classifier-free guidance of the base sampler
    guidance: Guidance = field(default_factory=Guidance)  # its scales (released; spec §4.5)
    # CFG in the SR stage too (the release's sr_cfg_number=2; its configs run without, as the default here), with
    # per-latent-frame video scales (spec §5 item 5); the uncond branch is the same negative prompt
    sr_cfg: bool = False
    sr_guidance: SRGuidance = field(default_factory=SRGuidance)
    sr_alpha: float = 0.8389  # released SR re-noise a and audio noise scale (spec §5)
    sr_audio_noise_scale: float = 0.7
    codecs_dir: str | None = None  # a folder with video_vae/ audio_vae/ text_encoder/
    video_vae: str | None = None  # each defaults to codecs_dir/<name>
    audio_vae: str | None = None
    text_encoder: str | None = None
    # video decoder: a TurboVAED directory (the release's default: config json + checkpoint with ema_state_dict,
    # e.g. its turbo_vae/ or a distill_vae run's <run_dir>/turbo_vae); None = the Wan2.2 VAE decoder
    turbo_vae: str | None = None
    # CFG: the conditional and unconditional branches as two clips of one packed forward (False: two forwards)
    batch_cfg: bool = True
    tiny_codecs: bool = False  # write random tiny codecs into codecs_dir first (smoke runs: noise output)
    output: str = "${run_dir}/sample.mp4"  # a JSON of settings and timings is written next to it
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA) | fp32 | bf16
    progress: bool = True


def _role_optim() -> OptimConfig:
    # constant LR 2e-6 of the video DMD recipes (CausVid, Self-Forcing; spec/dmd2.md §1); beta1 = 0 (Self-Forcing,
    # FastVideo); grad norm 10 per role (DMD2, CausVid, Self-Forcing)
    return OptimConfig(lr=2e-6, betas=[0.0, 0.999], warmup_steps=0, schedule="constant", grad_clip=10.0)


@dataclass
class TeacherConfig:
    """The frozen teacher of DMD-2 (real score, CFG inside)."""

    checkpoint: str | None = (
        None  # any DiT weight source (models/weights.py): our .ckpt or a released directory
    )
    dtype: str = "bf16"  # fp32 | bf16 (block linears stored in bf16 as released, run under autocast)
    # when `checkpoint` does not exist: train it first with these overrides of `python -m magi_train` (the smoke
    # experiment's teacher); empty = an error naming the missing checkpoint
    train_overrides: list[str] = field(default_factory=list)


@dataclass
class RoleConfig:
    """A trained network of DMD-2 (critic or student): initial weights, optimiser, memory options."""

    checkpoint: str | None = None  # any DiT weight source; None = a copy of the teacher
    optim: OptimConfig = field(default_factory=_role_optim)
    activation_checkpointing: Any = "none"  # none | full | selective | every_k (true / false: full / none)


@dataclass
class DistillConfig:
    """DMD-2 distillation into a few-step CFG-free student (recipe dmd2_distill, docs/dmd2.md)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    critic: RoleConfig = field(default_factory=RoleConfig)
    student: RoleConfig = field(default_factory=RoleConfig)
    generator_every: int = 5  # TTUR: critic every iteration, student every N (DMD2, Self-Forcing)
    num_student_steps: int = 8  # the released distilled sampler
    shift: float = 5.0  # of the student's step list (released distilled schedule)
    score_shift: float = 5.0  # of the DMD / critic noise levels (Self-Forcing 5)
    score_sigma_min: float = 0.02  # DMD2 min/max step 0.02 / 0.98
    score_sigma_max: float = 0.98
    score_sigma_method: str = "clamp"  # clamp | truncate (flow/dmd.py sample_score_sigma)
    guidance: Guidance = field(default_factory=Guidance)  # CFG inside the teacher (released scales)
    # the teacher's conditional and unconditional branches as 2N clips of one packed forward (False: two forwards)
    batch_cfg: bool = True
    negative_text: str = "null"  # uncond features: null (one zero token) or a .npy [L, D], as flow.null_text
    normalizer: str = "per_sample"  # per_sample (DMD2) | batch (FastVideo) | none
    # what the critic learns: step (the x0 of this iteration's step k: DMD2, Self-Forcing) | final (the finished
    # sample of the same chain, K - 1 - k more student forwards; the toy's study, docs/dmd2_toy.md)
    critic_samples: str = "step"
    audio_weight: float = 1.0  # weight of the audio DMD term (per-modality means)
    mode_probs: dict[str, float] = field(default_factory=lambda: {"t2v": 0.8, "i2v": 0.1, "a2v": 0.1})
    gan: bool = False  # DMD2 GAN term: a head on the critic's features, real latents from the shards
    gan_generator_weight: float = 5e-3  # DMD2 SDXL
    gan_critic_weight: float = 1e-2  # DMD2
    gan_layer: int | None = None  # critic layer whose output feeds the head; None = the middle layer
    # EMA of the student (Self-Forcing: 0.99, copied until step 200)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.99, start_step=200))
    save_teacher: bool = True  # False: checkpoints omit the frozen teacher, re-loaded from its path on resume
    sample_clips: int = 2  # validation clips whose latents and x0 panels are saved per validation
    sample_sigma: float = 0.5  # noise level at which teacher and critic x0 of the samples are shown
    # validation clips decoded into [student | teacher] mp4s with sound (docs/dmd2.md "Validation videos") when the
    # generate.* codecs name a video decoder and an audio VAE; 0 = none
    sample_videos: int = 2


@dataclass
class VAEDistillConfig:
    """Recipe distill_vae (magi_train/tasks/vae_distill.py, docs/turbo_vae.md): a TurboVAED student learns to
    reproduce the frames the Wan2.2 decoder makes of the latents in the shards; EMA exported as the release's
    layout. The optimiser is `optim`, the EMA `ema` (decay 0 exports the raw weights)."""

    teacher: str = MISSING  # Wan2.2 VAE directory (diffusers AutoencoderKLWan: Wan2.2-TI2V-5B-Diffusers/vae)
    tiny_teacher: bool = False  # write a random tiny Wan2.2 VAE at `teacher` first (smoke runs)
    student: TurboVAEConfig = field(default_factory=TurboVAEConfig)  # the released architecture by default
    init_from: str | None = None  # a TurboVAED directory to start from (e.g. the released turbo_vae/)
    l1_weight: float = 1.0  # mean |student - teacher| over pixels in [-1, 1]
    ssim_weight: float = 0.2  # 1 - SSIM of the frames (torchmetrics, window 11 or the frame size)
    teacher_cache: int = 0  # clips whose teacher frames are kept in CPU memory (the teacher is frozen)
    export_dir: str = "${run_dir}/turbo_vae"  # json + checkpoint.ckpt (ema_state_dict): generate.turbo_vae


@dataclass
class EvalSuiteConfig:
    """An eval suite (group `suite`, configs/suite/): a jsonl of prompts under eval/, a benchmark's own files in a
    local folder (Verse-Bench, TalkVid-Bench: docs/eval.md "Benchmark suites"), or the latency table."""

    name: str = "smoke"
    kind: str = "quality"  # quality (VideoScore2-style scores + WER) | latency (Base / SR / Decode seconds)
    # quality prompts: jsonl (`prompts`) | versebench | talkvid_bench (the benchmark folder `root`)
    format: str = "jsonl"
    prompts: str | None = None  # jsonl, relative to the repository root or absolute
    root: str | None = None  # benchmark folder (format versebench / talkvid_bench), absolute or relative
    subsets: list[str] = field(default_factory=list)  # the benchmark's subsets to read; empty: all of them
    limit: int | None = None  # only the first N prompts
    seconds: float | None = None  # clip length for every prompt (else the prompt's, else generate.seconds)
    # latency: rows of the table, each {name, width, height[, sr_width, sr_height]}; N timed runs per row
    resolutions: list[dict[str, Any]] = field(default_factory=list)
    repeats: int = 3
    warmup: int = 1


@dataclass
class EvalASRConfig:
    """Speech transcription for WER/CER (magi_train/eval/asr.py)."""

    backend: str = (
        "pocketsphinx"  # pocketsphinx (built-in English model) | whisper | transformers | glm_asr | none
    )
    path: str | None = None  # local model directory (whisper / glm_asr); nothing is downloaded
    device: str = "auto"
    dtype: str = "auto"
    # whisper: Whisper's English normaliser for English, Whisper's basic one (in-word apostrophes kept) for other
    # languages, CJK per character | basic: the basic one for every language (magi_train/eval/text.py)
    normalizer: str = "whisper"
    fold_chinese: bool = False  # traditional -> simplified Chinese (OpenCC t2s) before scoring zh / yue


@dataclass
class EvalScorerConfig:
    """Video quality scorer (magi_train/eval/videoscore.py)."""

    backend: str = "proxy"  # videoscore2 (needs path) | proxy (no weights, smoke runs) | none
    path: str | None = None  # local copy of TIGER-Lab/VideoScore2
    device: str = "auto"
    dtype: str = "auto"
    # defaults = VideoScore2 as trained and as its authors score (docs/eval.md, "Video scores")
    fps: float = 2.0  # frames per second of training (video_fps)
    max_new_tokens: int = 1024
    max_frames: int | None = 10  # training's video_maxlen; None: every frame at fps (not as trained)
    min_pixels: int | None = None  # per frame; None = the processor's (128*28*28)
    max_pixels: int | None = 691200  # training's video_max_pixels (960*720)
    prompt_template: str = (
        "training"  # training (data_sft.py INPUT_TEMPLATE) | benchmark (the older eval query)
    )
    decoding: str = "sample"  # sample (the authors': temperature, processed scores) | greedy (raw logits)
    temperature: float = 0.7
    soft_score: str = "authors"  # authors (top digit x its renormalised probability) | expected (sum s*p(s))
    seed: int = 0  # sampling seed, set before every clip


@dataclass
class EvalConfig:
    """Recipe `evaluate` (magi_train/eval/runner.py): generate (via generate()) or reuse clips, score, report.

    Models: `checkpoint` (one model, sampled with the `generate.*` settings), or `models` = {name: {key: value}}
    with keys of `generate` (base_ckpt, distilled_ckpt, sr_ckpt, ...) or `clips_dir` (reuse existing clips
    <clips_dir>/<prompt id>.mp4); or `clips_dir` alone. Without any of them, generate.base_ckpt/distilled_ckpt.
    """

    suite: EvalSuiteConfig = field(default_factory=EvalSuiteConfig)
    checkpoint: str | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    clips_dir: str | None = None
    generate_overrides: dict[str, Any] = field(
        default_factory=dict
    )  # generate.* values for eval's clips only
    reuse: bool = True  # keep clips already in <run_dir>/clips/<model>/ instead of sampling them again
    asr: EvalASRConfig = field(default_factory=EvalASRConfig)
    scorer: EvalScorerConfig = field(default_factory=EvalScorerConfig)
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0  # bootstrap and pair-sheet randomness (clips use generate.seed)
    compare: list[str] = field(default_factory=list)  # report.json files of other runs to add as rows
    # a CSV of pairwise judgements (system_a, system_b, winner[, rater, prompt_id]) to summarise
    preference: str | None = None
    preference_resample: str = (
        "auto"  # auto | raters+prompts | raters | prompts | judgements (bootstrap units)
    )
    bt_alpha: float = 0.01  # Bradley-Terry L2 regularisation, the same for every fit
    pair_sheet: bool = False  # with >= 2 models: write blind side-by-side sheets, one per rater
    pair_sheet_raters: int = 1  # raters r01..rNN, each with their own order and A/B placement
    reference: str | None = (
        "davinci_magihuman"  # paper row(s): magi_train/eval/reference/<name>.json or a path
    )
    # splitting and resuming (docs/eval.md): this task's share of the prompts; merge_only builds the report from
    # the per-clip caches of all shards and samples nothing
    num_shards: int = 1
    shard_index: int = 0
    merge_only: bool = False
    full_checksums: bool = (
        False  # provenance: sha256 of whole weight files (else of their first and last 8 MiB)
    )
    sync_weights: str | None = None  # SyncNet weights (syncnet_v2.model or .safetensors): adds LSE-D / LSE-C
    sync_vshift: int = 15  # offsets searched, in frames (+-)
    # training-time evaluation (magi_train/eval/callback.py EvalCallback): every N optimizer steps sample the
    # suite's first `callback_prompts` prompts with the model being trained, log the scores and
    # `callback_videos` clips (with sound) to the loggers; 0 disables
    every_n_steps: int = 0
    callback_prompts: int = 4
    callback_videos: int = 2


@dataclass
class Config:
    """The root config. Recipes pick the groups; every value is overridable on the command line."""

    recipe: str = MISSING
    task: str = MISSING  # pretrain | pretrain_sr | dmd2 | vae_distill | generate | evaluate (see __main__.py)
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
    ema: EMAConfig = field(default_factory=EMAConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    vae_distill: VAEDistillConfig = field(default_factory=VAEDistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # group `lora` (configs/lora/): train low-rank adapters on a frozen base (models/lora.py, docs/lora.md); null: off
    lora: LoRAConfig | None = None


def narrow(node: Any, cls: type[T]) -> T:
    """The one way to turn a config node into its typed dataclass (interpolations resolved against the root)."""
    obj = OmegaConf.to_object(node)
    if not isinstance(obj, cls):
        raise TypeError(f"config node {node._key()!r} is {type(obj).__name__}, expected {cls.__name__}")
    return obj


def register_configs() -> None:
    """Register the root schema (configs/config.yaml extends it) and the named model sizes.

    The sizes live once, in `MODEL_CONFIGS` of the model file; `model=tiny|small|magihuman_15b` selects
    one and any field stays overridable (`model.num_layers=8`).
    """
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name, model_cfg in MODEL_CONFIGS.items():
        cs.store(group="model", name=name, node=model_cfg)
    OmegaConf.register_new_resolver("magi_slurm_count", slurm_count, replace=True)


def slurm_count(value: Any, key: str) -> int:
    """Resolver of configs/hydra/launcher/slurm.yaml: sbatch needs node / GPU counts as numbers."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"hydra/launcher=slurm needs {key} as a number >= 1 (GPUs per node for trainer.devices, nodes "
            f"for trainer.num_nodes), got {value!r}: add e.g. {key}=8"
        )
    return value


def _creatable(path: Path) -> bool:
    """Whether `path` is, or can be made, a directory this process writes into."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


class RunDirCheck(Callback):
    """Hydra callback (configs/config.yaml `hydra.callbacks`): a run or sweep directory that cannot be created or
    written ends with one short error naming the key (exit 2), before Hydra writes its logs there."""

    @staticmethod
    def _check(path: str, key: str) -> None:
        if not _creatable(Path(path)):
            print(
                f"error: {key}={path} cannot be created or written: pass {key}=<a writable directory>",
                file=sys.stderr,
            )
            sys.exit(2)  # a SystemExit passes through Hydra's error report

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

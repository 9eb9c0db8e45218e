"""Strategy configs build the intended Lightning strategies (FSDP, ZeRO-2/3, offload, mixed precision);
resume picks the newest checkpoint; evaluation passes are even across ranks; consolidation of every format."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from omegaconf import OmegaConf

import magi_train.data.distributed as even
from magi_train.config import EMAConfig, StrategyConfig, narrow
from magi_train.data.distributed import EvenAcrossRanks
from magi_train.models.checkpoint import load_released
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.weights import read_dit_state, source_kind
from magi_train.tools.consolidate import consolidate
from magi_train.training.resume import find_resume_checkpoint, newest_checkpoint
from magi_train.training.strategies import build_strategy, deepspeed_autocast_config
from magi_train.training.trainer import check_ema_strategy

STRATEGY_DIR = Path(__file__).resolve().parents[2] / "configs" / "strategy"


def strategy_cfg(compose, name: str, *extra: str) -> StrategyConfig:
    cfg = compose(["recipe=pretrain_base", "experiment=smoke", f"strategy={name}", "run_dir=/tmp/x", *extra])
    return narrow(cfg.strategy, StrategyConfig)


def test_every_strategy_config_composes_and_builds(compose):
    names = sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))
    assert {
        "ddp",
        "fsdp2",
        "fsdp2_offload",
        "fsdp",
        "fsdp_offload",
        "deepspeed_stage_2",
        "deepspeed_stage_2_offload",
        "deepspeed_stage_3",
        "deepspeed_stage_3_offload",
    } <= set(names)
    for name in names:
        if name.startswith("deepspeed") and not _has_deepspeed():
            continue
        built = build_strategy(strategy_cfg(compose, name), "bf16-mixed")
        assert built is not None, name


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def test_ddp_config(compose):
    s = build_strategy(strategy_cfg(compose, "ddp", "strategy.find_unused_parameters=true"))
    assert isinstance(s, DDPStrategy) and s._ddp_kwargs["find_unused_parameters"] is True


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_offload", "fsdp", "fsdp_offload"])
def test_fsdp2_configs(compose, name):
    """fsdp / fsdp_offload (FSDP1, retired) now select FSDP2: Lightning's ModelParallelStrategy with our mesh."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from magi_train.training.strategies import parallel_config

    cfg = strategy_cfg(compose, name, "strategy.cp=2", "strategy.dp_replicate=2")
    assert cfg.name == "fsdp2" and cfg.offload is name.endswith("offload")
    s = build_strategy(cfg, "bf16-mixed")
    assert isinstance(s, ModelParallelStrategy) and (s.dp_replicate, s.cp) == (2, 2)
    plan = parallel_config(cfg, "bf16-mixed", True, 2, False)
    assert (plan.param_dtype, plan.activation_checkpointing, plan.ac_every, plan.offload) == (
        "bf16",
        "full",  # true = full
        2,
        cfg.offload,
    )
    assert parallel_config(cfg, "32-true", False, 1, False).param_dtype == "fp32"


def test_fsdp1_is_retired_with_a_pointer(compose):
    with pytest.raises(ValueError, match="retired: use strategy=fsdp2"):
        build_strategy(StrategyConfig(name="fsdp"))
    with pytest.raises(ValueError, match="need strategy=fsdp2"):
        build_strategy(strategy_cfg(compose, "ddp", "strategy.cp=2"))


def test_context_parallel_needs_divisible_heads():
    from magi_train.models.parallelize import check_context_parallel

    tiny = MODEL_CONFIGS["tiny"]  # 4 query heads, 2 KV heads
    for cp in (1, 2, 4):
        check_context_parallel(tiny, cp)  # 4 KV-replicated ranks are fine
    with pytest.raises(ValueError, match="choose cp among"):
        check_context_parallel(tiny, 3)


@pytest.mark.parametrize(
    "name",
    ["deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload"],
)
def test_deepspeed_configs(compose, name):
    pytest.importorskip("deepspeed")
    stage, offload = int(name[len("deepspeed_stage_")]), name.endswith("offload")
    s = build_strategy(strategy_cfg(compose, name), "bf16-mixed")
    assert isinstance(s, DeepSpeedStrategy)
    zero = s.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) is offload
    assert ("offload_param" in zero) is (offload and stage == 3)
    assert s.config.get("zero_force_ds_cpu_optimizer", True) is not offload
    # bf16 = DeepSpeed's torch autocast over fp32 parameters; Lightning must not cast module or inputs
    assert s.config["torch_autocast"] == deepspeed_autocast_config("bf16-mixed")
    assert s.config["torch_autocast"]["lower_precision_safe_modules"] == [
        "magi_train.models.dit.ModalityLinear"
    ]
    assert s.precision_plugin.precision == "32-true" and "bf16" not in s.config
    fp32 = build_strategy(strategy_cfg(compose, name), "32-true")
    assert "torch_autocast" not in fp32.config


def test_bad_strategy_settings_are_clear_errors(compose):
    with pytest.raises(ValueError, match="needs a sharded strategy"):
        build_strategy(strategy_cfg(compose, "ddp", "strategy.offload=true"))
    with pytest.raises(ValueError, match="use one of"):
        build_strategy(strategy_cfg(compose, "ddp", "strategy.name=zero9"))
    if _has_deepspeed():
        with pytest.raises(ValueError, match="bf16-mixed"):
            build_strategy(strategy_cfg(compose, "deepspeed_stage_3"), "bf16-true")
    cfg = compose(
        ["recipe=pretrain_base", "experiment=smoke", "strategy=deepspeed_stage_3", "run_dir=/tmp/x"]
    )
    with pytest.raises(ValueError, match="ema.decay=0"):  # smoke keeps an EMA
        check_ema_strategy(narrow(cfg.ema, EMAConfig), narrow(cfg.strategy, StrategyConfig))
    check_ema_strategy(narrow(cfg.ema, EMAConfig), strategy_cfg(compose, "ddp"))
    check_ema_strategy(EMAConfig(decay=0.0), narrow(cfg.strategy, StrategyConfig))


# ---------------------------------------------------------------------------------------------------------
# resume: the newest checkpoint, files or sharded directories
# ---------------------------------------------------------------------------------------------------------


def _touch(path: Path, at: float, step: int, directory: bool = False) -> None:
    """A checkpoint that verifies (training/resume.py): a torch file, or a DeepSpeed directory with its marker."""
    if directory:
        (path / "checkpoint").mkdir(parents=True)
        (path / ".complete").write_text(f'{{"global_step": {step}}}')
        path = path / "checkpoint" / "mp_rank_00_model_states.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    os.utime(path, (at, at))


def test_resume_picks_the_newest_checkpoint(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    now = time.time()
    with pytest.raises(ValueError, match="hydra.run.dir"):
        find_resume_checkpoint(tmp_path, resume=True)
    _touch(tmp_path / "checkpoints" / "last.ckpt", now - 30, 2, directory=True)  # a DeepSpeed checkpoint
    _touch(tmp_path / "hpc_ckpt_1.ckpt", now - 20, 3)
    assert find_resume_checkpoint(tmp_path, resume=True) == str(tmp_path / "hpc_ckpt_1.ckpt")
    _touch(tmp_path / "checkpoints" / "last-v1.ckpt", now - 10, 4)  # Lightning's name after changed settings
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last-v1.ckpt"

    assert find_resume_checkpoint(tmp_path) is None  # not a Slurm job: resume only when asked
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "magi", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "last-v1.ckpt")
    assert find_resume_checkpoint(tmp_path, slurm_requeue=False) is None


# ---------------------------------------------------------------------------------------------------------
# evaluation passes of equal length on every rank
# ---------------------------------------------------------------------------------------------------------


def test_even_across_ranks_truncates_to_the_shortest_rank(monkeypatch):
    assert list(EvenAcrossRanks(range(5), limit=3)) == [0, 1, 2]  # one process: just the limit
    assert list(EvenAcrossRanks(range(5))) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(even, "_world", lambda: 2)
    counts = []

    def other_rank_has(n_other: int):
        def min_over_ranks(n: int) -> int:
            counts.append(n)
            return min(n, n_other)

        return min_over_ranks

    monkeypatch.setattr(even, "_min_over_ranks", other_rank_has(2))
    assert list(EvenAcrossRanks(range(5), limit=4)) == [0, 1]
    assert counts == [4]  # this rank held (and reported) its first `limit` batches
    monkeypatch.setattr(even, "_min_over_ranks", other_rank_has(9))
    assert list(EvenAcrossRanks(range(3))) == [0, 1, 2]  # no limit: counted, then read again


# ---------------------------------------------------------------------------------------------------------
# consolidation of single-file and FSDP (distributed-checkpoint) formats; DeepSpeed in test_distributed.py
# ---------------------------------------------------------------------------------------------------------


def _lightning_state(model: DiT, wrapper: str = "") -> dict[str, torch.Tensor]:
    return {f"model.{wrapper}{k}": v for k, v in model.state_dict().items()}


def test_consolidate_lightning_checkpoint_with_ema(tmp_path):
    torch.manual_seed(0)
    raw, ema = DiT(MODEL_CONFIGS["tiny"]), DiT(MODEL_CONFIGS["tiny"])
    magi_config = {"model": OmegaConf.to_container(OmegaConf.structured(MODEL_CONFIGS["tiny"]))}
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": _lightning_state(ema),
            "current_model_state": _lightning_state(raw),
            "magi_config": magi_config,
        },
        ckpt,
    )
    assert source_kind(ckpt) == "lightning"
    for weights, source in (("auto", ema), ("ema", ema), ("raw", raw)):
        out = consolidate(ckpt, tmp_path / f"out-{weights}", weights=weights)
        loaded = DiT(MODEL_CONFIGS["tiny"])
        load_released(loaded, out)
        for k, v in source.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
    torch.save({"state_dict": _lightning_state(raw)}, tmp_path / "no-ema.ckpt")
    with pytest.raises(ValueError, match="no EMA"):
        read_dit_state(tmp_path / "no-ema.ckpt", "ema")
    with pytest.raises(ValueError, match="--model"):  # no stored config
        consolidate(tmp_path / "no-ema.ckpt", tmp_path / "x")
    small = consolidate(tmp_path / "no-ema.ckpt", tmp_path / "y", model="tiny", dtype_policy="base")
    assert (small / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="do not fit the model config"):
        consolidate(tmp_path / "no-ema.ckpt", tmp_path / "z", model="small")
    with pytest.raises(
        ValueError, match=r"another model config \(model.num_layers"
    ):  # --model vs the stored one
        consolidate(ckpt, tmp_path / "z", model="small")


def test_consolidate_fsdp_sharded_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(1)
    model = DiT(MODEL_CONFIGS["tiny"])
    # Lightning's FSDP sharded layout: DCP entries "model" (+ optimizer states) and meta.pt for the rest;
    # FSDP wrapper names in the keys as a sharded state dict may carry them
    path = tmp_path / "last.ckpt"
    state = {"model": _lightning_state(model, "_fsdp_wrapped_module."), "optimizer_0": {"x": torch.ones(3)}}
    dcp.save(state, checkpoint_id=path)
    magi_config = {"model": OmegaConf.to_container(OmegaConf.structured(MODEL_CONFIGS["tiny"]))}
    torch.save({"global_step": 5, "magi_config": magi_config}, path / "meta.pt")
    assert source_kind(path) == "dcp"
    loaded = DiT(MODEL_CONFIGS["tiny"])
    load_released(loaded, consolidate(path, tmp_path / "released"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        read_dit_state(path, "ema")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="none of the known kinds"):
        source_kind(tmp_path / "empty")


def test_a_gloo_process_group_is_destroyed_before_the_interpreter_exits(tmp_path):
    # Lightning destroys only NCCL groups at exit (training/trainer.py destroy_process_group_at_exit). The checker
    # is registered first, so atexit runs it after the hook under test.
    script = f"""
import atexit, torch.distributed as dist
from magi_train.training.trainer import destroy_process_group_at_exit
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
destroy_process_group_at_exit()
destroy_process_group_at_exit()  # once per process
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "initialized at exit: False" in out.stdout, out.stdout + out.stderr

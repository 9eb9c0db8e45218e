"""models/weights.py, the one DiT loader: every source kind through `load_dit`, bit-equal to the model that wrote it,
EMA / raw told apart, and the errors a user meets (missing or foreign files, another model config)."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi_train.models.checkpoint import INDEX_NAME, SINGLE_NAME, export_released
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.weights import load_dit, read_dit_state
from magi_train.tools.consolidate import consolidate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[2]
TINY = MODEL_CONFIGS["tiny"]
# The sets a checkpoint may hold: a loader that returns the wrong one fails the bit-equality check.
SETS = ("ema", "raw", "teacher", "critic")


def _random_dit(seed: int) -> DiT:
    """A tiny DiT whose every tensor (zero-initialised heads and the RoPE buffer included) is random."""
    torch.manual_seed(seed)
    model = DiT(TINY)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.normal_()
    return model


@pytest.fixture(scope="module")
def dits() -> dict[str, DiT]:
    return {name: _random_dit(i) for i, name in enumerate(SETS)}


def _magi_config(task: str = "pretrain", **model) -> dict:
    """What ConfigInCheckpoint stores: the resolved root config (here only the parts the loader reads)."""
    return {"task": task, "model": {**dataclasses.asdict(TINY), **model}}


def _under(prefix: str, model: DiT, wrapper: str = "") -> dict[str, torch.Tensor]:
    """A LightningModule's keys for a DiT held as `prefix` (maybe inside wrappers)."""
    return {f"{prefix}{wrapper}{k}": v for k, v in model.state_dict().items()}


def _same(a: DiT, b: DiT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


# ---------------------------------------------------------------------------------------------------------
# writers, one per source kind, as the real writers lay the files out
# ---------------------------------------------------------------------------------------------------------


def _released(tmp: Path, dits, layout: str) -> Path:
    if layout == "file":
        return export_released(dits["ema"], tmp / "released", dtype_policy="fp32") / SINGLE_NAME
    out = export_released(dits["ema"], tmp / "released", dtype_policy="fp32", max_shard_bytes=2**20)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, with an index
    return out / INDEX_NAME if layout == "index" else out


def _pretrain_ckpt(tmp: Path, dits) -> Path:
    # Lightning's EMA layout; the raw weights as a compiled, activation-checkpointed module names them
    path = tmp / "last.ckpt"
    torch.save(
        {
            "state_dict": _under("model.", dits["ema"]),
            "current_model_state": _under("model.", dits["raw"], "_orig_mod._checkpoint_wrapped_module."),
            "magi_config": _magi_config(),
            "global_step": 2,
        },
        path,
    )
    return path


def _dmd2_ckpt(tmp: Path, dits) -> Path:
    # StudentEMA's layout: state_dict = the raw roles with the EMA student, current_model_state = the raw roles
    raw = {
        **_under("teacher.", dits["teacher"]),
        **_under("critic.", dits["critic"]),
        **_under("student.", dits["raw"]),
    }
    path = tmp / "dmd2.ckpt"
    ema = {**raw, **_under("student.", dits["ema"])}
    torch.save({"state_dict": ema, "current_model_state": raw, "magi_config": _magi_config("dmd2")}, path)
    return path


def _dcp(tmp: Path, dits) -> Path:
    import torch.distributed.checkpoint as dcp

    # Lightning's FSDPStrategy (state_dict_type=sharded): DCP entries "model" and the optimizer states, meta.pt
    # for everything else; FSDP wrapper names in the keys as a sharded state dict may carry them
    path = tmp / "last.ckpt"
    state = {
        "model": _under("model.", dits["raw"], "_fsdp_wrapped_module."),
        "optimizer_0": {"x": torch.ones(3)},
    }
    dcp.save(state, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": 2, "magi_config": _magi_config()}, path / "meta.pt")
    return path


def _write_deepspeed(state_file: Path, out: Path) -> None:
    """Save as Lightning's DeepSpeedStrategy does: a ZeRO-2 and a ZeRO-3 engine (1 process, CPU, gloo) around the
    LightningModule wrapper (`_forward_module.model.<dit key>`), the rest of the checkpoint as client state."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as tests/scale/deepspeed_cpu.py
    deepspeed.init_distributed(dist_backend="gloo")
    saved = torch.load(state_file, weights_only=True)
    for stage in (2, 3):
        task, wrapper = torch.nn.Module(), torch.nn.Module()
        task.model = DiT(TINY)
        task.model.load_state_dict(saved["state"])
        wrapper._forward_module = task
        engine, *_ = deepspeed.initialize(
            model=wrapper,
            optimizer=torch.optim.AdamW(wrapper.parameters()),
            config={
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": stage},
                "zero_allow_untested_optimizer": True,
            },
        )
        client = {"magi_config": saved["magi_config"], "global_step": 2}
        engine.save_checkpoint(out / f"zero{stage}", tag="checkpoint", client_state=client)


@pytest.fixture(scope="module")
def deepspeed_dirs(dits, tmp_path_factory) -> Path:
    """`zero2/` and `zero3/` of the raw weights, written in a child process (DeepSpeed sets up a process group)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("deepspeed")
    torch.save({"state": dits["raw"].state_dict(), "magi_config": _magi_config()}, root / "source.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, __file__, str(root / "source.pt"), str(root)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return root


# case: (write the source -> (path, model config to pass), weights asked, kind, which, expected set, wrong set)
CASES = {
    "released-dir": (
        lambda t, d: (_released(t, d, "dir"), TINY),
        "auto",
        "released",
        "released",
        "ema",
        "raw",
    ),
    "released-index": (
        lambda t, d: (_released(t, d, "index"), TINY),
        "auto",
        "released",
        "released",
        "ema",
        "raw",
    ),
    "released-file": (
        lambda t, d: (_released(t, d, "file"), TINY),
        "raw",
        "released",
        "released",
        "ema",
        "raw",
    ),
    "pretrain-ema": (lambda t, d: (_pretrain_ckpt(t, d), None), "ema", "lightning", "ema", "ema", "raw"),
    "pretrain-auto": (lambda t, d: (_pretrain_ckpt(t, d), TINY), "auto", "lightning", "ema", "ema", "raw"),
    "pretrain-raw": (lambda t, d: (_pretrain_ckpt(t, d), None), "raw", "lightning", "raw", "raw", "ema"),
    "dmd2-ema": (lambda t, d: (_dmd2_ckpt(t, d), None), "ema", "lightning", "ema", "ema", "raw"),
    "dmd2-raw": (lambda t, d: (_dmd2_ckpt(t, d), None), "raw", "lightning", "raw", "raw", "ema"),
    "dcp": (lambda t, d: (_dcp(t, d), None), "auto", "dcp", "raw", "raw", "ema"),
    "deepspeed-zero2": (None, "auto", "deepspeed", "raw", "raw", "ema"),
    "deepspeed-zero3": (None, "raw", "deepspeed", "raw", "raw", "ema"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_source_kind_loads_bit_equal(case, dits, tmp_path, request):
    write, weights, kind, which, expected, wrong = CASES[case]
    if write is None:  # deepspeed: written once for both stages (a child process)
        source, cfg = request.getfixturevalue("deepspeed_dirs") / case.removeprefix("deepspeed-"), None
    else:
        source, cfg = write(tmp_path, dits)
    loaded = load_dit(source, cfg, weights, what="init_from")
    assert (loaded.source, loaded.weights, loaded.path) == (kind, which, str(source))
    assert _same(loaded.model, dits[expected])
    # the control: every tensor of the other set differs, so a loader returning it would fail the line above
    other = dits[wrong].state_dict()
    assert all(not torch.equal(v, other[k]) for k, v in loaded.model.state_dict().items())
    assert not any(_same(loaded.model, dits[role]) for role in ("teacher", "critic"))
    if kind != "released":  # the run's config travels with the checkpoint
        assert loaded.config["model"] == _magi_config()["model"]
        assert loaded.task == loaded.config["task"]


def test_dtype_policy_base_and_consolidate_round_trip(dits, tmp_path):
    ckpt = _pretrain_ckpt(tmp_path, dits)
    loaded = load_dit(ckpt, weights="raw", dtype_policy="base")
    linear = "block.layers.1.mlp.up_gate_proj.weight"
    state = loaded.model.state_dict()
    assert state[linear].dtype == torch.bfloat16 and state["final_norm_video.weight"].dtype == torch.float32
    assert torch.equal(state[linear], dits["raw"].state_dict()[linear].bfloat16())
    out = consolidate(ckpt, tmp_path / "released", weights="raw")
    assert _same(load_dit(out, TINY).model, dits["raw"])


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


def test_missing_junk_and_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(
        ValueError, match="init_from=.*missing.ckpt does not exist; expected a released-format"
    ):
        load_dit(tmp_path / "missing.ckpt", what="init_from")
    with pytest.raises(ValueError, match="nowhere.*model.safetensors"):
        load_dit(tmp_path / "nowhere", TINY)
    with pytest.raises(ValueError, match="init_from is not set"):
        load_dit("", what="init_from")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read .*junk.ckpt as a Lightning checkpoint"):
        load_dit(tmp_path / "junk.ckpt")
    torch.save({"weights": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="has no 'state_dict': not a Lightning checkpoint"):
        load_dit(tmp_path / "foreign.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"empty is a directory of none of the known kinds \(contents: empty\)"
    ):
        load_dit(tmp_path / "empty")
    with pytest.raises(ValueError, match="weights='current': use one of"):
        load_dit(tmp_path / "junk.ckpt", weights="current")


def test_another_model_config_names_the_differing_field(dits, tmp_path):
    ckpt = _pretrain_ckpt(tmp_path, dits)
    small = dataclasses.replace(TINY, num_layers=2, mm_layers=[0, 1])
    with pytest.raises(
        ValueError, match=r"init_from=.* another model config \(model.num_layers: checkpoint 4, this run 2"
    ):
        load_dit(ckpt, small, what="init_from")
    torch.save(
        {"state_dict": _under("model.", dits["raw"])}, tmp_path / "no-config.ckpt"
    )  # foreign: no config
    with pytest.raises(ValueError, match="stores no model config"):
        load_dit(tmp_path / "no-config.ckpt")
    with pytest.raises(ValueError, match="init_from=.*do not fit the model config; missing"):
        load_dit(tmp_path / "no-config.ckpt", small, what="init_from")
    with pytest.raises(ValueError, match="(?s)init_from: checkpoint .* does not match the model"):
        load_dit(_released(tmp_path, dits, "file"), small, what="init_from")


def test_unknown_model_config_fields_are_rejected(dits, tmp_path):
    path = tmp_path / "future.ckpt"
    torch.save(
        {"state_dict": _under("model.", dits["raw"]), "magi_config": _magi_config(moe_experts=8)}, path
    )
    message = r"model config has unknown fields \['moe_experts'\]; was it written by another version\?"
    with pytest.raises(ValueError, match=message):
        load_dit(path)
    with pytest.raises(ValueError, match=message):
        consolidate(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ema_asked_where_there_is_none(dits, tmp_path):
    torch.save(
        {"state_dict": _under("model.", dits["raw"]), "magi_config": _magi_config()}, tmp_path / "a.ckpt"
    )
    with pytest.raises(ValueError, match="weights=ema but .*a.ckpt holds no EMA weights"):
        load_dit(tmp_path / "a.ckpt", weights="ema")
    assert load_dit(tmp_path / "a.ckpt").weights == "raw"  # auto falls back to the trained weights
    with pytest.raises(ValueError, match="weights=ema but .* holds no EMA weights"):
        read_dit_state(_dcp(tmp_path, dits), "ema")  # a DCP checkpoint of a run without EMA


def test_released_weights_need_a_model_config(dits, tmp_path):
    source = _released(tmp_path, dits, "dir")
    with pytest.raises(ValueError, match="released-format weights carry no model config"):
        load_dit(source)
    with pytest.raises(ValueError, match="is a released-format checkpoint"):
        read_dit_state(source)


if __name__ == "__main__":  # the DeepSpeed writer's child process (fixture `deepspeed_dirs`)
    _write_deepspeed(Path(sys.argv[1]), Path(sys.argv[2]))

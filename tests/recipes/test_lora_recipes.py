"""LoRA (lora=default) with every training recipe: only adapters train and are saved, the base stays bitwise the
same, resume is exact, and shared-base DMD-2 equals three-copy DMD-2 with the same adapters."""

import csv
from pathlib import Path

import pytest
import torch

import magi_train.training.run as run_module
from magi_train.__main__ import run
from magi_train.models import lora
from magi_train.models.checkpoint import export_released, load_released
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.models.weights import load_dit
from magi_train.tools.consolidate import consolidate, export_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
FAST = [
    "experiment=smoke",
    "lora=default",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=null",
    "trainer.log_every_n_steps=1",
    "data.synthetic.num_clips=32",
    "data.max_tokens=128",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny released-format base with non-zero heads (a fresh DiT predicts v = 0 and no adapter could move it)."""
    torch.manual_seed(0)
    model = DiT(MODEL_CONFIGS["tiny"])
    for head in (model.final_linear_video, model.final_linear_audio):
        torch.nn.init.normal_(head.weight, std=0.05)
    return export_released(model, tmp_path_factory.mktemp("base") / "tiny", dtype_policy="fp32")


def _captured(monkeypatch) -> dict:
    """Keep the task that `fit` trained (to look at its weights after training)."""
    seen = {}
    fit = run_module.fit

    def keep(ctx, nodes, task, *args, **kwargs):
        seen["task"] = task
        return fit(ctx, nodes, task, *args, **kwargs)

    monkeypatch.setattr(run_module, "fit", keep)
    return seen


def _column(path: Path, key: str) -> list[float]:
    return [float(r[key]) for r in csv.DictReader(path.open()) if r.get(key)]


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not lora.is_adapter_key(k)}


@pytest.mark.parametrize("recipe", ["pretrain_base", "pretrain_sr"])
def test_lora_pretraining_learns_keeps_the_base_and_saves_adapters_only(
    compose, tmp_path, base_dir, recipe, monkeypatch, smoke
):
    seen = _captured(monkeypatch)
    reference = DiT(MODEL_CONFIGS["tiny"])
    load_released(reference, base_dir)
    args = [f"recipe={recipe}", f"run_dir={tmp_path}", f"init_from={base_dir}", "model=tiny"]
    run(
        compose(
            [*args, *FAST, "trainer.max_steps=24", "trainer.checkpoint_every_n_steps=24", "optim.lr=1e-2"]
        )
    )
    model = seen["task"].model
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained and all(lora.is_adapter_key(k) for k in trained)  # the optimizer holds adapters only
    opt = seen["task"].trainer.optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in lora.adapter_parameters(model)
    }
    base = _base_state(model)
    ref = reference.state_dict()
    if recipe == "pretrain_sr":  # the SR config only changes how text is placed, not the weights
        assert base.keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in base.items())  # the base is bitwise unchanged
    assert any(
        p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".B")
    )  # the adapters moved
    loss = _column(tmp_path / "metrics.csv", "train/loss")
    # control: the same run with lr 0 sees the same clips and noise, so what differs is learning alone
    frozen = tmp_path / "frozen"
    run(compose([*args[:1], f"run_dir={frozen}", *args[2:], *FAST, "trainer.max_steps=24", "optim.lr=0"]))
    still = _column(frozen / "metrics.csv", "train/loss")
    assert len(loss) == len(still) == 24 and loss[0] == still[0]
    learned, control = sum(loss[-8:]) / 8, sum(still[-8:]) / 8
    assert learned < 0.95 * control, (learned, control)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state_dict"] and all(lora.is_adapter_key(k) for k in saved["state_dict"])
    assert (
        ckpt.stat().st_size < 0.05 * Path(smoke["base"]).stat().st_size
    )  # a full tiny checkpoint (with EMA)


def _forward(model: DiT, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    video = [torch.randn(48, 2, 4, 4, generator=gen)]
    audio = [torch.randn(5, 64, generator=gen)]
    text = [torch.randn(3, MODEL_CONFIGS["tiny"].text_in_channels, generator=gen)]
    with torch.no_grad():
        v, a = model(video, audio, text)
    return torch.cat([v[0].flatten(), a[0].flatten()])


def test_lora_pretraining_resumes_exactly(compose, tmp_path, base_dir):
    common = [f"init_from={base_dir}", "recipe=pretrain_base", *FAST, "trainer.checkpoint_every_n_steps=3"]
    run(compose([*common, f"run_dir={tmp_path / 'straight'}", "trainer.max_steps=6"]))
    run(compose([*common, f"run_dir={tmp_path / 'split'}", "trainer.max_steps=3"]))
    run(compose([*common, f"run_dir={tmp_path / 'split'}", "trainer.max_steps=6", "resume=true"]))
    a, b = (_column(tmp_path / n / "metrics.csv", "train/loss") for n in ("straight", "split"))
    assert len(a) == 6 and a == b
    sa = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "split/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("ema.") for k in sa)  # the adapters' EMA travels with them

    # a LoRA run's checkpoint loads as its base + its (EMA) adapter, and consolidates merged
    ckpt = tmp_path / "straight/checkpoints/last.ckpt"
    live = load_dit(ckpt)
    assert live.weights == "ema" and live.lora["adapter"] == "default" and live.lora["base"] == str(base_dir)
    bare = DiT(MODEL_CONFIGS["tiny"])
    load_released(bare, base_dir)
    out = consolidate(ckpt, tmp_path / "merged")
    merged = DiT(MODEL_CONFIGS["tiny"])
    load_released(merged, out)
    y_live, y_merged, y_bare = _forward(live.model), _forward(merged), _forward(bare)
    assert (y_live - y_bare).abs().max() > 1e-4  # control: the adapter changes the output
    assert (y_live - y_merged).abs().max() <= 1e-5
    adapter = export_adapter(ckpt, tmp_path / "adapter.safetensors")  # the exchange format (generate.lora)
    again = DiT(MODEL_CONFIGS["tiny"])
    load_released(again, base_dir)
    lora.load_adapter(again, adapter)
    assert torch.equal(_forward(again), y_live)


def test_lora_needs_a_base(compose, tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        run(compose(["recipe=pretrain_base", f"run_dir={tmp_path}", *FAST, "trainer.max_steps=1"]))


def _dmd2(tmp: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "recipe=dmd2_distill", f"run_dir={tmp}", f"distill.teacher.checkpoint={teacher}", "model=tiny", *FAST,
        "distill.generator_every=2", "distill.ema.start_step=0", *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> tuple[list[float], list[float]]:
    """Per-iteration critic losses and the student's DMD losses of its iterations (generator_every=2; Lightning
    repeats an on-step value on the rows that do not log it)."""
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    critic = [float(r["train/critic_loss"]) for r in rows if r.get("train/critic_loss")]
    dmd = [float(r["train/dmd_loss"]) for r in rows if r.get("train/dmd_loss") and int(r["step"]) % 2 == 0]
    return critic, dmd


def test_shared_base_dmd2_equals_three_copies_and_resumes(compose, tmp_path, base_dir, monkeypatch):
    seen = _captured(monkeypatch)
    common = ["trainer.checkpoint_every_n_steps=3", "distill.gan=true", "distill.critic.optim.lr=1e-2"]
    shared, copies = tmp_path / "shared", tmp_path / "copies"
    run(compose(_dmd2(shared, base_dir, *common, "trainer.max_steps=5")))
    task = seen["task"]
    assert task.shared_base and len([m for m in task.modules() if isinstance(m, DiT)]) == 1  # one base
    reference = DiT(MODEL_CONFIGS["tiny"])
    load_released(reference, base_dir)
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in _base_state(task.base).items())  # teacher = frozen base
    critic, student = (lora.adapter_parameters(task.base, n) for n in ("critic", "student"))
    assert all(c is not s for c, s in zip(critic, student, strict=True))
    assert any(p.abs().sum() > 0 for p in student[1::2]) and any(p.abs().sum() > 0 for p in critic[1::2])

    run(compose(_dmd2(copies, base_dir, *common, "trainer.max_steps=5", "lora.shared_base=false")))
    assert not seen["task"].shared_base
    (c_shared, d_shared), (c_copies, d_copies) = _losses(shared), _losses(copies)
    assert len(c_shared) == 5 and len(d_shared) >= 3
    assert c_shared == pytest.approx(c_copies, rel=1e-6, abs=1e-7)
    assert d_shared == pytest.approx(d_copies, rel=1e-6, abs=1e-7)

    ckpt = torch.load(shared / "checkpoints" / "last.ckpt", weights_only=True)
    keys = [*ckpt["state_dict"], *ckpt.get("current_model_state", {})]
    assert keys and all(lora.is_adapter_key(k) or k.startswith("disc.") for k in keys)  # adapters + GAN head

    student = load_dit(shared / "checkpoints" / "last.ckpt")  # the base + the student's EMA adapter
    assert student.task == "dmd2" and student.lora["adapter"] == "student" and student.weights == "ema"

    # the critic learns: 12 iterations against the same ones with both learning rates 0 (same data and noise)
    longer, frozen = tmp_path / "longer", tmp_path / "frozen"
    run(compose(_dmd2(longer, base_dir, *common, "trainer.max_steps=12")))
    lr0 = ["distill.critic.optim.lr=0", "distill.student.optim.lr=0"]
    run(compose(_dmd2(frozen, base_dir, *common, "trainer.max_steps=12", *lr0)))
    learned, still = _losses(longer)[0], _losses(frozen)[0]
    assert learned[0] == still[0]
    assert sum(learned[-4:]) < 0.95 * sum(still[-4:]), (learned, still)

    split = tmp_path / "split"
    run(compose(_dmd2(split, base_dir, *common, "trainer.max_steps=3")))
    run(compose(_dmd2(split, base_dir, *common, "trainer.max_steps=5", "resume=true")))
    assert _losses(split) == _losses(shared)

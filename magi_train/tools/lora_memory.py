"""`python -m magi_train.tools.lora_memory`: peak host memory of DMD-2 with three copies of the model vs one shared
LoRA base, measured (docs/lora.md, "Memory").

Each variant runs `recipe=dmd2_distill` for a few iterations in its own process on a model whose weights dominate
memory (the `small` width cut to a few layers, random released-format weights written first, few tokens), and
reports that process's peak resident memory above what it held after its imports (torch, Lightning, magi_train),
during training (from the start of Trainer.fit: the roles are built) and over the whole run (loading included):
- full: three trainable-size copies, critic and student fully trained (today's default);
- copies: three copies, critic and student train LoRA adapters only (the reference of the shared base);
- shared: `lora.shared_base=true`, one frozen base for teacher, critic and student.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "full": [],
    "copies": ["lora=default", "lora.shared_base=false"],
    "shared": ["lora=default", "lora.shared_base=true"],
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def state_mib(task) -> float:
    """Bytes (MiB) of every distinct storage the task holds after training: parameters (a shared base counted
    once), gradients, buffers (EMA), optimizer states. Exact, unlike the resident-set peaks beside it."""
    import torch

    tensors = [*task.parameters(), *task.buffers()]
    tensors += [p.grad for p in task.parameters() if p.grad is not None]
    for opt in task.trainer.optimizers:
        tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def child(overrides: list[str]) -> None:
    """Run one variant; print {baseline, peak, train_peak, seconds} (MiB) as JSON on the last line. train_peak: the
    peak from the start of Trainer.fit (roles built and loaded) to the end, so loading transients do not count."""
    import torch

    import magi_train.training.run as run_module
    from magi_train.__main__ import compose, run

    torch.set_num_threads(2)
    cfg = compose(overrides)
    baseline = _rss_mib()  # after the imports and the config
    fit, seen = run_module.fit, {}

    def measured_fit(ctx, nodes, task, *args, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        out = fit(ctx, nodes, task, *args, **kwargs)
        seen["train_peak"] = _status_mib("VmHWM")
        seen["state"] = state_mib(task)
        return out

    run_module.fit = measured_fit
    start = time.perf_counter()
    run(cfg)
    print(json.dumps({"baseline": baseline, "peak": _rss_mib(), "train_peak": seen["train_peak"],
                      "state": seen["state"], "seconds": time.perf_counter() - start}))  # fmt: skip


def write_base(out: Path, layers: int) -> Path:
    import torch

    from magi_train.models.checkpoint import export_released
    from magi_train.models.dit import DiT

    cfg = _model_cfg(layers)
    torch.manual_seed(0)
    model = DiT(cfg)
    for head in (model.final_linear_video, model.final_linear_audio):
        torch.nn.init.normal_(head.weight, std=0.02)
    return export_released(model, out, dtype_policy="fp32", overwrite=True)


def _model_cfg(layers: int):
    import copy

    from magi_train.models.dit import MODEL_CONFIGS

    cfg = copy.deepcopy(MODEL_CONFIGS["small"])
    cfg.num_layers, cfg.mm_layers, cfg.gelu7_layers = layers, [0], [0]
    return cfg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m magi_train.tools.lora_memory", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--layers", type=int, default=2, help="layers of the `small` width (layer 0 modality-specific)"
    )
    p.add_argument(
        "--steps", type=int, default=2, help="DMD-2 iterations per variant (the student steps on each)"
    )
    p.add_argument("--tokens", type=int, default=96, help="data.max_tokens: few, so that weights dominate")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--teacher-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="distill.teacher.dtype: bf16 stores the (shared) base's block linears in bf16")  # fmt: skip
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        child(a.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = write_base(Path(tmp) / "base", a.layers)
        common = [
            "recipe=dmd2_distill", "experiment=smoke", "model=small", f"model.num_layers={a.layers}",
            "model.mm_layers=[0]", "model.gelu7_layers=[0]", f"distill.teacher.checkpoint={base}",
            f"distill.teacher.dtype={a.teacher_dtype}", f"trainer.max_steps={a.steps}", "distill.generator_every=1",
            "trainer.val_check_interval=null", "trainer.checkpoint_every_n_steps=100000",
            "trainer.enable_progress_bar=false", f"data.max_tokens={a.tokens}", "data.synthetic.num_clips=8",
            "data.synthetic.samples_per_shard=8", "data.num_workers=0", "distill.ema.decay=0",
            f"lora.rank={a.rank}", f"lora.alpha={a.rank}",
        ]  # fmt: skip
        rows = {}
        for name in a.variants:
            overrides = [*common[:-2], *VARIANTS[name], *(common[-2:] if VARIANTS[name] else [])]
            overrides.append(f"run_dir={Path(tmp) / name}")
            cmd = [sys.executable, "-m", "magi_train.tools.lora_memory", "--child", *overrides]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"DMD-2, `small` width cut to {a.layers} layers, teacher {a.teacher_dtype}, {a.steps} iterations, "
          f"{a.tokens} tokens; peak RSS above the post-import baseline (MiB)")  # fmt: skip
    print("| variant | model state MiB | vs copies | training peak RSS MiB | vs copies | whole-run peak RSS MiB "
          "| vs copies | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    ref = rows.get("copies")
    for name, r in rows.items():
        values = {
            "state": r["state"],
            "train_peak": r["train_peak"] - r["baseline"],
            "peak": r["peak"] - r["baseline"],
        }
        cells = []
        for key, value in values.items():
            base = ref[key] - (0 if key == "state" else ref["baseline"]) if ref else None
            cells += [f"{value:,.0f}", f"{value / base:.2f}x" if base else "-"]
        print(f"| {name} | {' | '.join(cells)} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()

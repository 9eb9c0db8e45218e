"""`python -m magi_train.tools.plan`: per-GPU memory of DMD-2 model state for a model size and GPU counts
(the planner is magi_train/training/memory.py; what it counts and leaves out is said there)."""

from __future__ import annotations

import argparse

from magi_train.models.dit import MODEL_CONFIGS
from magi_train.training.memory import H100_GIB, TRAINABLE_BYTES, format_table, memory_table, role_parameters


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m magi_train.tools.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="magihuman_15b", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--teacher-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--ema-on-cpu", action="store_true", help="keep the student EMA off the GPUs")
    ap.add_argument("--gpu-gib", type=float, default=H100_GIB, help="memory of one GPU in GiB (H100 80GB)")
    args = ap.parse_args(argv)
    params = role_parameters(MODEL_CONFIGS[args.model])
    per = ", ".join(f"{k} {v} B" for k, v in TRAINABLE_BYTES.items())
    print(
        f"model {args.model}: {params.total:,} parameters per role ({params.block_linear:,} in block linears)"
    )
    print(f"teacher {args.teacher_dtype} (frozen); critic and student trainable: {per}; EMA fp32 4 B")
    print("model state only, activations excluded; every role fully sharded over all GPUs\n")
    print(
        format_table(
            memory_table(params, tuple(args.gpus), args.teacher_dtype, not args.ema_on_cpu), args.gpu_gib
        )
    )


if __name__ == "__main__":
    main()

"""`python -m magi_train.tools.plan`: per-GPU memory (model state + activations) of a training recipe for a model
size, clip size, strategy, context parallelism and GPU counts (the planner is magi_train/training/memory.py; what it
counts and leaves out is said there).

    python -m magi_train.tools.plan --recipe dmd2_distill --clip 448x256x5 --gpus 8 16 32 64 --ac
    python -m magi_train.tools.plan --table     # the 15B table of docs/scale.md
    python -m magi_train.tools.plan --measure   # re-measure the activation constants on the tiny model
"""

from __future__ import annotations

import argparse

from magi_train.models.dit import MODEL_CONFIGS
from magi_train.training.memory import (
    H100_GIB,
    RECIPES,
    PlanSpec,
    clip_tokens,
    format_plan,
    measure_constants,
    parse_clip,
    plan,
    role_parameters,
)

# (recipe, clip, cp, activation checkpointing) of the docs table: the released sizes (spec §4.2), 5 s clips
TABLE = [
    ("pretrain_base", "448x256x5", 1, True),
    ("pretrain_sr", "896x512x5", 1, True),
    ("pretrain_sr", "1920x1088x5", 4, True),
    ("dmd2_distill", "448x256x5", 1, True),
]


def describe(recipe: str, model: str, clip: str, strategy: str, cp: int, ac: bool, tokens: int) -> str:
    w, h, s = parse_clip(clip)
    return (
        f"{recipe}, model {model}, one {w}x{h} {s:g} s clip ({tokens:,} tokens) per micro-batch, strategy "
        f"{strategy}, cp {cp}, activation checkpointing {ac}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m magi_train.tools.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="dmd2_distill", choices=RECIPES)
    ap.add_argument("--model", default="magihuman_15b", choices=sorted(MODEL_CONFIGS))
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument(
        "--clip", default="448x256x5", help="WIDTHxHEIGHTxSECONDS of one clip (default 256p, 5 s)"
    )
    ap.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch instead of --clip")
    ap.add_argument("--strategy", default="fsdp2", choices=["fsdp2", "ddp"])
    ap.add_argument("--cp", type=int, default=1, help="context-parallel ranks per sequence")
    ap.add_argument(
        "--ac", nargs="?", const="full", default="none", choices=["none", "full", "selective"],
        help="activation checkpointing: full (the bare flag: every layer) or selective",
    )  # fmt: skip
    ap.add_argument("--teacher-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--gpu-gib", type=float, default=H100_GIB, help="memory of one GPU in GiB (H100 80GB)")
    ap.add_argument("--table", action="store_true", help="print the 15B table of docs/scale.md")
    ap.add_argument("--measure", action="store_true", help="measure the activation constants (tiny, CPU)")
    args = ap.parse_args(argv)
    if args.measure:
        for name, value in measure_constants().items():
            print(f"{name}: {value:.2f} bytes")
        return
    cfg = MODEL_CONFIGS[args.model]
    params = role_parameters(cfg)
    print(
        f"model {args.model}: {params.total:,} parameters per role ({params.block_linear:,} in block linears)"
    )
    runs = (
        [(r, c, cp, ac) for r, c, cp, ac in TABLE]
        if args.table
        else [(args.recipe, args.clip, args.cp, args.ac)]
    )
    for recipe, clip, cp, ac in runs:
        tokens = args.tokens if args.tokens and not args.table else clip_tokens(*parse_clip(clip))
        spec = PlanSpec(
            recipe=recipe, strategy=args.strategy, cp=cp, tokens=tokens, activation_checkpointing=ac,
            teacher_dtype=args.teacher_dtype, ema=not args.no_ema, gpus=tuple(args.gpus),
        )  # fmt: skip
        print(f"\n{describe(recipe, args.model, clip, args.strategy, cp, ac, tokens)} (GiB per GPU)\n")
        print(format_plan(plan(cfg, spec), args.gpu_gib))


if __name__ == "__main__":
    main()

"""`python -m magi_train.tools.plan`: per-GPU memory (model state + activations) of a training recipe for a model
size, clip size, strategy, context parallelism and GPU counts (the planner is magi_train/training/memory.py; what it
counts and leaves out is said there).

    python -m magi_train.tools.plan --recipe dmd2_distill --clip 448x256x5 --gpus 8 16 32 64 --ac
    python -m magi_train.tools.plan --recipe dmd2_distill --lora --fp8 --gpus 1 --ac   # shared-base LoRA DMD-2
    python -m magi_train.tools.plan --table     # the 15B tables of docs/scale.md (the LoRA rows included)
    python -m magi_train.tools.plan --measure   # re-measure the activation constants on the tiny model
"""

from __future__ import annotations

import argparse

from magi_train.models.dit import MODEL_CONFIGS
from magi_train.training.memory import (
    H100_GIB,
    H200_GIB,
    RECIPES,
    PlanSpec,
    clip_tokens,
    format_plan,
    format_plan_rows,
    lora_parameters,
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
# the LoRA table (issue 11): 256p, activation checkpointing; each recipe full (three DMD-2 copies), then LoRA with
# the frozen base in bf16 and in fp8, on these devices
LORA_DEVICES = [("H200", H200_GIB, 1), ("H100", H100_GIB, 1), ("H100", H100_GIB, 8)]
LORA_RANK = 32


def lora_table(cfg, rank: int = LORA_RANK, clip: str = "448x256x5") -> str:
    """The LoRA rows of the docs table: full and LoRA (bf16 / fp8 base) pretraining and DMD-2 per device."""
    entries = []
    for recipe in ("pretrain_base", "dmd2_distill"):
        for lora, base in ((None, "bf16"), (rank, "bf16"), (rank, "fp8")):
            setting = f"{recipe} " + ("full" if lora is None else f"LoRA r{rank}, {base} base")
            if recipe == "dmd2_distill":
                setting += ", three copies" if lora is None else ", shared base"
            for device, gib, n in LORA_DEVICES:
                spec = PlanSpec(
                    recipe=recipe, tokens=clip_tokens(*parse_clip(clip)), activation_checkpointing=True,
                    gpus=(n,), lora_rank=lora, base_dtype=base,
                )  # fmt: skip
                entries.append((setting, device, gib, plan(cfg, spec)[0]))
    return format_plan_rows(entries)


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
    ap.add_argument(
        "--lora", action="store_true", help="LoRA adapters on a frozen base (shared base in DMD-2)"
    )
    ap.add_argument("--lora-rank", type=int, default=LORA_RANK)
    ap.add_argument(
        "--fp8", action="store_true", help="with --lora: the frozen base in fp8 (e4m3, per-row scales)"
    )
    ap.add_argument("--gpu-gib", type=float, default=H100_GIB, help="memory of one GPU in GiB (H100 80GB)")
    ap.add_argument("--table", action="store_true", help="print the 15B table of docs/scale.md")
    ap.add_argument("--measure", action="store_true", help="measure the activation constants (tiny, CPU)")
    args = ap.parse_args(argv)
    if args.fp8 and not args.lora:
        ap.error("--fp8 stores LoRA's frozen base: add --lora")
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
        lora = args.lora and not args.table
        spec = PlanSpec(
            recipe=recipe, strategy=args.strategy, cp=cp, tokens=tokens, activation_checkpointing=ac,
            teacher_dtype=args.teacher_dtype, ema=not args.no_ema, gpus=tuple(args.gpus),
            lora_rank=args.lora_rank if lora else None, base_dtype="fp8" if lora and args.fp8 else "bf16",
        )  # fmt: skip
        what = describe(recipe, args.model, clip, args.strategy, cp, ac, tokens)
        if lora:
            adapters = lora_parameters(cfg, args.lora_rank)
            what += f", LoRA rank {args.lora_rank} ({adapters:,} adapter parameters per set), {spec.base_dtype} base"
        print(f"\n{what} (GiB per GPU)\n")
        print(format_plan(plan(cfg, spec), args.gpu_gib))
    if args.table:
        adapters = lora_parameters(cfg, LORA_RANK)
        print(
            f"\nLoRA (issue 11): rank {LORA_RANK} ({adapters:,} adapter parameters per set) on every layer's "
            f"block linears, one 448x256 5 s clip per micro-batch, fsdp2, activation checkpointing; GiB per GPU "
            f"against one GPU's memory (H200 141GB, H100 80GB)\n"
        )
        print(lora_table(cfg))


if __name__ == "__main__":
    main()

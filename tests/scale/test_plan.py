"""The memory planner (training/memory.py): its model-state arithmetic, its parameter counts against the model, its
activation estimate against activations measured on tiny-structured models of other sizes, and the stop it makes
before a run that cannot fit."""

import pytest
import torch

from magi_train.models.checkpoint import released_dtype
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.tools.plan import main as plan_main
from magi_train.training.memory import (
    GIB,
    PlanSpec,
    RoleParameters,
    activation_bytes,
    check_plan,
    clip_tokens,
    measure_activation_bytes,
    plan,
    role_parameters,
    teacher_bytes,
    tiny_like,
    trainable_bytes,
)


def test_model_state_arithmetic_by_hand():
    # 1e9 block-linear + 1e6 other parameters: teacher bf16 2 B / fp32 4 B per block-linear parameter; each trained
    # role 16 B (fp32 master, fp32 grads, AdamW); EMA 4 B; fsdp2 divides by the GPUs, ddp does not
    p = RoleParameters(block_linear=10**9, other=10**6, largest_layer=10**8)
    assert teacher_bytes(p, "bf16") == 2_004_000_000 and teacher_bytes(p, "fp32") == 4_004_000_000
    assert trainable_bytes(p) == 16_016_000_000


def test_plan_rows_follow_the_parameter_counts():
    cfg = MODEL_CONFIGS["tiny"]
    params = role_parameters(cfg)
    model = DiT(cfg)
    assert params.total == model.num_parameters()
    bf16 = sum(t.numel() for n, t in model.named_parameters() if released_dtype(n, "base") == torch.bfloat16)
    assert params.block_linear == bf16
    assert params.largest_layer == max(
        sum(t.numel() for t in layer.parameters()) for layer in model.block.layers
    )
    spec = PlanSpec(recipe="dmd2_distill", strategy="fsdp2", tokens=1000, gpus=(1, 4))
    one, four = plan(cfg, spec)
    assert one.trainable == pytest.approx(2 * 16 * params.total / GIB)  # critic + student
    assert one.teacher == pytest.approx((2 * params.block_linear + 4 * params.other) / GIB)
    assert one.ema == pytest.approx(4 * params.total / GIB)
    assert four.trainable == pytest.approx(one.trainable / 4) and four.activations == one.activations
    (ddp,) = plan(cfg, PlanSpec(recipe="pretrain_base", strategy="ddp", tokens=1000, gpus=(4,)))
    assert (
        ddp.trainable == pytest.approx(16 * params.total / GIB) and ddp.teacher == 0
    )  # replicated, one role
    (cp,) = plan(cfg, PlanSpec(recipe="pretrain_base", cp=2, tokens=1000, gpus=(4,)))
    assert cp.activations == pytest.approx(activation_bytes(cfg, 500, False) / GIB)  # each cp rank: half


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_a_measured_forward_of_another_size(checkpointing):
    # constants were measured at widths 128/256 with 4/8 layers and 1,792 tokens; check at 192 x 6 layers, 3,000
    cfg = tiny_like(192, 6)
    measured = measure_activation_bytes(cfg, 3000, checkpointing)
    estimate = activation_bytes(cfg, 3000, checkpointing, recompute=False)
    print(
        f"checkpointing {checkpointing}: measured {measured / 2**20:.1f} MiB, planned {estimate / 2**20:.1f} MiB"
    )
    assert abs(estimate - measured) <= 0.2 * measured
    # control: the two modes differ by far more than the tolerance
    other = activation_bytes(cfg, 3000, not checkpointing, recompute=False)
    assert abs(other - measured) > 0.5 * measured


def test_clip_tokens_match_the_release():
    # spec §4.2: 4 s at 448x256 -> 2,912 video tokens (26 latent frames of 8 x 14), 101 audio latents
    assert clip_tokens(448, 256, 4, text_tokens=0) == 2912 + 101
    assert clip_tokens(1920, 1088, 4, text_tokens=0) == 53_040 + 101


def test_a_run_that_cannot_fit_stops_with_what_to_change():
    cfg = MODEL_CONFIGS["magihuman_15b"]
    spec = PlanSpec(recipe="dmd2_distill", strategy="ddp", tokens=clip_tokens(448, 256, 5), gpus=(8,))
    (row,) = plan(cfg, spec)
    with pytest.raises(ValueError, match="strategy=fsdp2.*activation_checkpointing=full"):
        check_plan(row, 79.65, spec)
    fits = PlanSpec(
        recipe="dmd2_distill", tokens=clip_tokens(448, 256, 5), activation_checkpointing=True, gpus=(16,)
    )
    check_plan(plan(cfg, fits)[0], 79.65, fits)  # 16 H100 with checkpointing: fits


def test_plan_cli_prints_the_docs_table(capsys):
    plan_main(["--table"])
    out = capsys.readouterr().out
    assert out.count("| 64 |") == 4 and "1920x1088" in out

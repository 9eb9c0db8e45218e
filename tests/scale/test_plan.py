"""The memory planner (training/memory.py): its model-state arithmetic, its parameter counts against the model, its
activation estimate against activations measured on tiny-structured models of other sizes, and the stop it makes
before a run that cannot fit."""

import pytest
import torch

from magi_train.models.checkpoint import released_dtype
from magi_train.models.dit import MODEL_CONFIGS, DiT, ModalityLinear
from magi_train.tools.plan import main as plan_main
from magi_train.training.memory import (
    GIB,
    LORA_TARGETS,
    PlanSpec,
    RoleParameters,
    activation_bytes,
    check_plan,
    clip_tokens,
    lora_activation_bytes,
    lora_parameters,
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
    # fp8 e4m3 base: 1 B per block-linear parameter + one fp32 scale per output channel (here 10^5 rows)
    p.block_linear_rows = 10**5
    assert teacher_bytes(p, "fp8") == 10**9 + 4 * 10**5 + 4 * 10**6


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


def _adapter_count_of_the_model(cfg, rank: int) -> tuple[int, int, int]:
    """(adapter parameters, output rows, parameters of one adapter per stacked weight) counted on the model built on
    the meta device: every LoRA-target ModalityLinear of each layer, one A [r, in] + B [out, r] per expert slice of
    its [E*out, in] weight."""
    with torch.device("meta"):
        model = DiT(cfg)
    params = rows = stacked = 0
    for layer in model.block.layers:
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] in LORA_TARGETS:
                assert isinstance(module, ModalityLinear)
                experts = module.num_modality
                out_rows, in_features = module.weight.shape
                params += experts * rank * (out_rows // experts + in_features)
                rows += out_rows
                stacked += rank * (out_rows + in_features)
    return params, rows, stacked


@pytest.mark.parametrize("name", ["tiny", "small", "magihuman_15b"])
def test_lora_adapter_count_matches_the_model_layout(name):
    cfg = MODEL_CONFIGS[name]
    for rank in (1, 32):
        counted, rows, stacked = _adapter_count_of_the_model(cfg, rank)
        assert lora_parameters(cfg, rank) == counted
        # control: one adapter on the whole stacked weight (shared by the experts) is a different count
        assert stacked != counted
    assert role_parameters(cfg).block_linear_rows == rows


def test_lora_rows_one_frozen_base_adapters_trained_fp8_halves_the_base():
    cfg = MODEL_CONFIGS["magihuman_15b"]
    params, adapters = role_parameters(cfg), lora_parameters(cfg, 32)
    tokens = clip_tokens(448, 256, 5)

    def row(recipe, **kw):
        return plan(
            cfg, PlanSpec(recipe=recipe, tokens=tokens, activation_checkpointing=True, gpus=(1,), **kw)
        )[0]

    full = row("dmd2_distill")
    shared = row("dmd2_distill", lora_rank=32)
    shared_fp8 = row("dmd2_distill", lora_rank=32, base_dtype="fp8")
    pretrain = row("pretrain_base", lora_rank=32)
    # shared-base DMD-2: one base + critic and student adapters (16 B each) + the student adapter's EMA (4 B)
    assert shared.teacher == pytest.approx(teacher_bytes(params, "bf16") / GIB)
    assert shared.trainable == pytest.approx(2 * 16 * adapters / GIB) and shared.ema == pytest.approx(
        4 * adapters / GIB
    )
    state = lambda r: r.trainable + r.teacher + r.ema  # noqa: E731
    assert state(shared) < 0.1 * state(full)  # against three full copies (two of them trained)
    # LoRA pretraining: the same base, one adapter set
    assert pretrain.teacher == shared.teacher and pretrain.trainable == pytest.approx(shared.trainable / 2)
    # fp8: the block linears' bytes halve; the scales (4 B per output row) and the fp32 rest stay
    bf16_linears = shared.teacher * GIB - 4 * params.other
    fp8_linears = shared_fp8.teacher * GIB - 4 * params.other - 4 * params.block_linear_rows
    assert fp8_linears == pytest.approx(bf16_linears / 2) == pytest.approx(params.block_linear)
    assert shared_fp8.teacher < 0.51 * shared.teacher
    # activations: the full forward's plus the r-wide adapter intermediates, negligible at 15B
    extra = lora_activation_bytes(cfg, 32, tokens, True)
    assert shared.activations * GIB == pytest.approx(full.activations * GIB + extra)
    assert lora_activation_bytes(cfg, 32, tokens, False) < 1e-3 * activation_bytes(cfg, tokens, False)
    # eight GPUs shard the base and the adapters, not the activations
    (eight,) = plan(cfg, PlanSpec(recipe="dmd2_distill", tokens=tokens, activation_checkpointing=True, gpus=(8,),
                                  lora_rank=32))  # fmt: skip
    assert eight.teacher == pytest.approx(shared.teacher / 8) and eight.activations == shared.activations
    for bad, match in (({"base_dtype": "fp8"}, "set lora_rank"), ({"lora_rank": 0}, "a rank >= 1"),
                       ({"lora_rank": 8, "base_dtype": "int4"}, "use one of")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            plan(cfg, PlanSpec(tokens=tokens, gpus=(1,), **bad))


def test_plan_cli_prints_the_lora_rows(capsys):
    plan_main(["--table"])
    out = capsys.readouterr().out
    assert out.count("shared base |") == 6 and out.count("| H200 (140.40) |") == 6
    plan_main(["--recipe", "dmd2_distill", "--lora", "--fp8", "--gpus", "1", "--ac"])
    out = capsys.readouterr().out
    assert "LoRA rank 32" in out and "fp8 base" in out

"""AdamW parameter groups of the pretraining optimizer: decay on matrices only, chosen by name (FSDP-safe)."""

import torch

from magi_train.config import OptimConfig
from magi_train.models.dit import MODEL_CONFIGS, DiT
from magi_train.tasks.optim import build_optimizer


def test_weight_decay_groups_by_name():
    model = DiT(MODEL_CONFIGS["tiny"])
    opt, _ = build_optimizer(model, OptimConfig(weight_decay=0.1), max_steps=10)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    no_decay_names = {ids[id(p)] for p in no_decay["params"]}
    assert no_decay_names == {n for n, p in model.named_parameters() if p.ndim == 1}  # norms and biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # Flat 1-D shards (what FSDP hands the optimizer) keep their groups: the rule reads names, not shapes.
    flat = torch.nn.Module()
    flat.register_parameter("proj_weight", torch.nn.Parameter(torch.zeros(12)))
    flat.register_parameter("q_norm_weight", torch.nn.Parameter(torch.zeros(4)))
    opt, _ = build_optimizer(flat, OptimConfig(weight_decay=0.1), max_steps=10)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]

"""Making a DiT role ready inside `configure_model`, for every strategy.

Without a device mesh (one process, DDP, DeepSpeed) the role arrives with its weights and only gets activation
checkpointing and compile. Under `strategy=fsdp2` it arrives on the meta device: it is cast to its storage dtypes,
parallelised (context parallel, FSDP2 per layer), materialised shard by shard on the device, and each rank fills its
own shards from the role's weight source (or initialises them), so no rank ever holds a whole role.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import lightning as L
import torch

from magi_train.models.dit import DiT
from magi_train.models.lora import adapter_parameters, init_adapters
from magi_train.models.parallelize import ParallelConfig, data_parallel_rank, parallelize
from magi_train.models.weights import apply_dtype_policy, init_weights, load_into


@dataclass
class RoleSetup:
    """How one role is made ready. source: its weight source under fsdp2 (None: initialise, or a resumed run's
    checkpoint fills it after configure_model); weights: auto | ema | raw of that source."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str | None = None
    weights: str = "auto"
    dtype_policy: str = "fp32"  # "base": block linears stored bf16 (a frozen teacher)
    what: str = "checkpoint"  # the config key of the source, for errors


def device_mesh(module: L.LightningModule):
    """The (dp_replicate, dp_shard, cp) mesh of strategy=fsdp2, None under every other strategy."""
    mesh = getattr(module, "_device_mesh", None)
    return mesh if mesh is not None and "cp" in (mesh.mesh_dim_names or ()) else None


def data_rank(module: L.LightningModule) -> int:
    """This process's index among the readers of different samples (cp ranks of one group share theirs)."""
    mesh = device_mesh(module)
    return data_parallel_rank(mesh)[0] if mesh is not None else module.global_rank


def stream_seed(seed: int, step: int, name: str, index: int = 0) -> int:
    """A seed per (run seed, optimizer step, stream, data index), index = data-parallel rank x accumulation +
    micro-batch: noise is reproducible on resume without saved RNG state, differs between the micro-batches of a
    step, and does not depend on how they are spread over ranks and accumulation (cp ranks share theirs)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{name}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def micro_index(module: L.LightningModule, micro: int, accumulate: int) -> int:
    """The data index (stream_seed) of micro-batch `micro` of this rank within the current optimizer step."""
    return data_rank(module) * accumulate + micro


def prepare_role(
    model: DiT, setup: RoleSetup, mesh, device: torch.device, seed: int, adapter_seed: int | None = None
) -> DiT:
    """Parallelise `model` in place (see the module docstring); returns it. LoRA adapters on it (models/lora.py)
    are initialised from `adapter_seed` (default `seed`), as `add_adapters` does off the meta device."""
    if mesh is None:
        return parallelize(model, None, setup.parallel)
    adapters = adapter_parameters(model)
    apply_dtype_policy(model, setup.dtype_policy)  # on the meta device: no memory
    for p in adapters:  # trained in fp32 whatever the base's storage
        p.data = p.data.float()
    parallelize(model, mesh, setup.parallel)
    model.to_empty(device=device)
    if setup.source:
        load_into(model, setup.source, setup.weights, what=setup.what)
    else:
        init_weights(model, seed)
    if adapters:
        init_adapters(model, seed if adapter_seed is None else adapter_seed)
    return model


__all__ = ["RoleSetup", "data_rank", "device_mesh", "micro_index", "prepare_role", "stream_seed"]

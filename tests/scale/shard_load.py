"""Sharded loading on 2 gloo processes (torchrun): a released-format directory is loaded into an FSDP2 model built on
the meta device; each rank reads only its rows. Writes each rank's peak-RSS growth during the load (bytes) and
whether the loaded shards equal the file.

    torchrun --nproc_per_node 2 tests/scale/shard_load.py RELEASED_DIR MODEL_JSON OUT.json
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from magi_train.models.dit import DiT, DiTConfig
from magi_train.models.parallelize import ParallelConfig, build_mesh
from magi_train.models.weights import load_released
from magi_train.tasks.sharding import RoleSetup, prepare_role


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    source, model_json, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    mesh = build_mesh("cpu", dist.get_world_size())
    with torch.device("meta"):
        model = DiT(DiTConfig(**json.loads(Path(model_json).read_text())))
    full_bytes = model.num_parameters() * 4
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status("VmRSS")
    prepare_role(model, RoleSetup(ParallelConfig(), source=source), mesh, torch.device("cpu"), seed=0)
    growth = _status("VmHWM") - before
    # the shards hold the file's values: gather a few whole tensors and compare with a plain load
    with torch.device("meta"):
        plain = DiT(model.cfg)
    plain = plain.to_empty(device="cpu")
    load_released(plain, source)
    ref = plain.state_dict()
    equal = all(
        torch.equal(v.full_tensor(), ref[k])
        for k, v in list(model.state_dict().items())[:: max(1, len(ref) // 6)]
    )
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {"growth": growth, "equal": equal})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"full_fp32_bytes": full_bytes, "ranks": parts}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

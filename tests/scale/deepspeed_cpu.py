"""Test-only entry point: `python -m magi_train` with DeepSpeed on CPU (gloo), past Lightning's CUDA-only gates.

Lightning's DeepSpeedStrategy refuses any accelerator but CUDA in `setup_environment` (and
index-less devices in `setup_distributed`); DeepSpeed itself
runs on its CPU accelerator with gloo. This subclass skips only those checks and is swapped in where
magi_train/training/strategies.py imports the class, so everything else (config, ZeRO stage, checkpoints) is the
production path. Lightning re-launches this script for rank 1 with the same arguments.
"""

import deepspeed
import lightning.pytorch.strategies as lightning_strategies
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own version only adds the CUDA check

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed takes its device rank from the root device's index, which CPU devices lack
        return torch.device("cpu", self.local_rank)

    def setup_distributed(self) -> None:
        # as DeepSpeedStrategy.setup_distributed, minus the check that device indices match local ranks
        # (CPU devices have no index)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


lightning_strategies.DeepSpeedStrategy = CPUDeepSpeedStrategy
# DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op on first use (minutes on 2 cores);
# gloo does every collective without it.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

if __name__ == "__main__":
    import runpy

    # Run magi_train/__main__.py as the main module (Hydra finds configs/ next to it) while this script
    # stays sys.argv[0], so that Lightning re-launches this script, patch included, for the other rank.
    runpy.run_module("magi_train", run_name="__main__", alter_sys=False)

"""DDP for calibration: processes and collectives without the DistributedDataParallel wrapper.

Calibration has no gradient, and torch's DDP refuses a module with no trainable parameter (Lightning
issue #3430).  Nothing needs the wrapper: the callbacks reduce their own statistics with explicit
float64 all-reduces.  So this strategy is Lightning's DDP (launch, process group, samplers, barriers)
with the wrap replaced by a broadcast of rank 0's weights, which keeps every rank's model identical.

    trainer.strategy: calibration_ddp          # torchrun / SLURM / `python cli.py` with devices > 1
    trainer.strategy: calibration_ddp_spawn    # CPU tests, notebooks
"""
from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.ddp import _sync_module_states


class CalibrationDDPStrategy(DDPStrategy):
    strategy_name = "calibration_ddp"

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)


for _name, _method in (("calibration_ddp", "popen"), ("calibration_ddp_spawn", "spawn")):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(
            _name, CalibrationDDPStrategy, description=f"DDP without the gradient wrapper ({_method})", start_method=_method
        )


def dist_ready() -> bool:
    """True inside an initialised torch.distributed process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()

"""ptdp_compiler: unmodified single-device PyTorch transformers → PTD-P training programs.

    import ptdp_compiler as ptdp
    pm = ptdp.parallelize(model, dp=2, codegen="aot_eager")
    loss = pm.train_step(pm.dp_shard(x), targets=pm.dp_shard(y))
"""
from . import errors
from .api import ParallelModule, parallelize
from .config import ParallelConfig
from .errors import (CaptureError, ConfigError, InputShapeError, PTDPError, RankError,
                     ShardingError, WorldSizeError, WorldTimeoutError)
from .runtime.launch import LocalWorld, launch

__version__ = "0.1.0"


def __getattr__(name):  # lazy: the planner is not needed to train
    if name in ("plan", "Cluster"):
        from . import planner
        return getattr(planner, name)
    raise AttributeError(f"module 'ptdp_compiler' has no attribute {name!r}")

__all__ = ["parallelize", "launch", "LocalWorld", "ParallelModule", "ParallelConfig", "errors",
           "PTDPError", "ConfigError", "WorldSizeError", "CaptureError", "InputShapeError",
           "ShardingError", "RankError", "WorldTimeoutError", "plan", "Cluster"]

"""ptdp_compiler: unmodified single-device PyTorch transformers → PTD-P training programs.

    import ptdp_compiler as ptdp
    pm = ptdp.parallelize(model, dp=2, codegen="aot_eager")
    loss = pm.train_step(pm.dp_shard(x), targets=pm.dp_shard(y))
"""
from . import errors
from .api import ParallelModule, parallelize
from .backend import backend
from .config import ParallelConfig
from .errors import (CaptureError, CheckpointError, ConfigError, InputShapeError, PTDPError,
                     RankError, ShardingError, WorldSizeError, WorldTimeoutError)
from .errors import MemoryLimitError
from .runtime.checkpoint import load_hf
from .runtime.launch import LocalWorld, launch

__version__ = "0.1.0"

from .planner import Cluster, plan  # noqa: E402

__all__ = ["parallelize", "backend", "launch", "LocalWorld", "ParallelModule", "ParallelConfig", "errors",
           "PTDPError", "ConfigError", "WorldSizeError", "CaptureError", "InputShapeError",
           "ShardingError", "RankError", "WorldTimeoutError", "plan", "Cluster", "load_hf",
           "CheckpointError", "MemoryLimitError"]

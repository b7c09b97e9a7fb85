"""Named errors. Each says what is wrong and what to change, and is raised before
any process-group work where the problem can be seen that early."""


class PTDPError(Exception):
    """Base class of every error ptdp_compiler raises on purpose."""


class ConfigError(PTDPError, ValueError):
    """The parallel configuration cannot work (sizes, divisibility, unknown options)."""


class WorldSizeError(ConfigError):
    """dp·tp·pp differs from the number of ranks."""


class ExpertParallelError(ConfigError):
    """ep cannot split the model's experts: ep does not divide dp or the number of experts,
    or the model has no routed experts."""


class ContextParallelError(ConfigError):
    """cp cannot split the model along the sequence: its attention was not found, or an op
    mixes tokens in a way context parallelism does not handle (named in the message)."""


class MemoryLimitError(ConfigError):
    """The layout is predicted to need more memory per rank than ``memory_limit=``; the
    message gives the predicted breakdown and the cheapest change that fits."""


class CaptureError(PTDPError):
    """The model's forward could not be captured as one graph."""


class InputShapeError(PTDPError, ValueError):
    """Arguments to train_step / dp_shard have shapes the configuration cannot split."""


class ShardingError(PTDPError):
    """A graph node cannot be sharded by the tensor-parallel passes."""


class RankError(PTDPError, RuntimeError):
    """A rank of a launched world raised; carries the rank and its traceback."""

    def __init__(self, rank: int, exc_repr: str, tb: str):
        self.rank, self.exc_repr, self.traceback = rank, exc_repr, tb
        super().__init__(f"rank {rank} failed: {exc_repr}\n--- traceback of rank {rank} ---\n{tb}")


class WorldTimeoutError(PTDPError, TimeoutError):
    """A launched world did not finish within its timeout (a hang is a failure)."""


class PipelinePeerError(PTDPError, RuntimeError):
    """A pipeline send/recv failed or timed out: the peer stage died or is stuck."""


class CheckpointError(PTDPError, RuntimeError):
    """A checkpoint is missing, incomplete (an interrupted save) or of a different model."""

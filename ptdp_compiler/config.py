"""ParallelConfig: the single source of truth for a parallel layout, validated up front."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

from .errors import ConfigError, WorldSizeError

RECOMPUTE_MODES = ("none", "selective", "full")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
CODEGENS = ("inductor", "aot_eager")
PRECISIONS = ("fp32", "bf16", "fp16")


def parse_bytes(limit) -> Optional[int]:
    """``memory_limit=``: an int (bytes) or a string such as "80GiB", "512 MiB", "1.5GB"."""
    import re
    if limit is None:
        return None
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0:
        return int(limit)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(limit), re.I)
    if isinstance(limit, bool) or isinstance(limit, (int, float)) or not m:
        raise ValueError(f"memory_limit={limit!r}: give a positive number of bytes or a "
                         "string like '80GiB' / '512MiB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1}
    for i, p in enumerate("KMGT"):
        scale[f"{p}IB"], scale[f"{p}B"] = 1024 ** (i + 1), 1000 ** (i + 1)
    return int(float(m.group(1)) * scale[unit])


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    # expert parallelism: routed experts split over ep of the dp ranks (ep divides dp; the
    # world stays tp·pp·dp; passes/expert_parallel.py)
    ep: int = 1
    # fully sharded data parallelism (ZeRO-3 / FSDP): parameters, gradients and optimizer
    # state split over dp_shard ranks, gathered per layer inside the compiled graph
    # (passes/fully_shard.py); beside the replicated dp it is HSDP. World: tp·pp·dp·dp_shard·cp
    dp_shard: int = 1
    # dp_shard: free each layer's gathered weights after its forward and gather them again
    # in backward (FSDP2's default), or keep them for backward (False: one all-gather less,
    # the full weights live from forward to backward)
    reshard_after_forward: bool = True
    # context parallelism: every activation sharded along the sequence over cp ranks,
    # attention gathers what it needs (passes/context_parallel.py)
    cp: int = 1
    virtual_stages: int = 1
    microbatches: int = 1
    sequence_parallel: bool = False
    # SP: re-gather a column-parallel linear's input in backward and keep only its sequence
    # shard (Megatron; Korthikanti's activation formulas), or keep the gathered tensor
    # (False: what DTensor plans do — (t-1)/t fewer all-gather bytes per such input in
    # backward, 2sbh(1-1/t) more activation bytes each)
    sp_regather: bool = True
    recompute: Union[str, dict] = "none"
    # what the recompute mode saves may still be recomputed by the partitioner where that
    # is free (pointwise ops fused into backward kernels, as torch.compile does); False
    # saves exactly Korthikanti et al.'s Table 2 set (passes/recompute.py)
    recompute_pointwise: bool = True
    schedule: Optional[str] = None     # None: "interleaved" when virtual_stages > 1, else "1f1b"
    scatter_gather: bool = True        # pp boundaries replicated over tp travel as 1/t slices
    codegen: str = "inductor"
    # Inductor's compute/communication reordering of the collectives (codegen/inductor_options
    # .py); PTDP_COMM_REORDER=0/1 overrides it. Helps where collectives run asynchronously
    comm_reorder: bool = False
    # pipeline: a chunk's backward computes and sends its input gradient first and its
    # weight gradients after the send (codegen/split_backward.py); False: one backward
    split_backward: bool = True
    loss_fn: Optional[Callable] = None
    seed: int = 0
    bucket_mb: float = 25.0
    precision: str = "fp32"              # fp32 | bf16 | fp16 (runtime/precision.py)
    distributed_optimizer: bool = False  # shard optimizer state + master weights over dp
    # a large weight matrix left replicated at tp > 1 is a ShardingError, not a warning
    # (passes/tp_coverage.py)
    strict: bool = False
    # such a weight (computed whole) is stored split over tp and all-gathered where read
    # (passes/tp_gather_weights.py); False keeps it whole on every rank, as Megatron does
    shard_replicated_weights: bool = True
    # bytes per rank (or "80GiB"): a layout predicted to need more is refused with
    # MemoryLimitError before anything is compiled (planner/memory.py)
    memory_limit: Optional[Union[int, str]] = None

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.dp_shard * self.cp

    @property
    def data_parallel(self) -> int:
        """Ranks reading different samples of the global batch (dp × dp_shard)."""
        return self.dp * self.dp_shard

    def validate(self) -> "ParallelConfig":
        """Raise a named error for any impossible or unsupported setting."""
        for name in ("tp", "pp", "dp", "ep", "dp_shard", "cp", "virtual_stages",
                     "microbatches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
        for name in ("sp_regather", "comm_reorder", "split_backward", "distributed_optimizer",
                     "recompute_pointwise", "strict", "reshard_after_forward",
                     "shard_replicated_weights"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"{name}={v!r}: must be True or False")
        if self.codegen not in CODEGENS:
            raise ConfigError(f"codegen={self.codegen!r}: choose one of {CODEGENS}")
        if self.comm_reorder and self.codegen != "inductor":
            raise ConfigError(f"comm_reorder=True reorders Inductor's schedule; codegen="
                              f"{self.codegen!r} runs the graph as traced: use "
                              "codegen='inductor' or comm_reorder=False")
        if self.schedule is None:
            object.__setattr__(self, "schedule",
                               "interleaved" if self.virtual_stages > 1 else "1f1b")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: choose one of {SCHEDULES}")
        rc = self.recompute
        if isinstance(rc, dict):
            if set(rc) != {"budget_bytes"} or not isinstance(rc["budget_bytes"], int):
                raise ConfigError(f"recompute={rc!r}: a dict must be {{'budget_bytes': int}}")
        elif rc not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute={rc!r}: choose one of {RECOMPUTE_MODES} or "
                              "{'budget_bytes': N}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("sequence_parallel=True needs tp > 1 (it splits the tensor-parallel "
                              "all-reduces); set tp >= 2 or sequence_parallel=False")
        if self.dp % self.ep:
            from .errors import ExpertParallelError
            raise ExpertParallelError(
                f"ep={self.ep} does not divide dp={self.dp}: expert-parallel ranks are "
                "data-parallel ranks of the dense part; choose ep dividing dp (e.g. dp=ep)")
        if self.ep > 1 and self.dp_shard > 1:
            from .errors import ExpertParallelError
            raise ExpertParallelError(
                f"ep={self.ep} with dp_shard={self.dp_shard} is not supported yet: expert "
                "parallelism carves ep out of the replicated dp; use dp=ep with dp_shard=1, "
                "or ep=1")
        if self.distributed_optimizer and self.dp_shard > 1:
            raise ConfigError(
                f"distributed_optimizer=True with dp_shard={self.dp_shard} is redundant: "
                "dp_shard already shards the optimizer state (and the parameters and "
                "gradients) over its ranks; drop distributed_optimizer")
        if self.virtual_stages > 1 and self.pp == 1:
            raise ConfigError(f"virtual_stages={self.virtual_stages} needs pp > 1")
        if self.pp > 1:
            from .schedules import check_schedule_args
            check_schedule_args(self.schedule, self.pp, self.virtual_stages, self.microbatches)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: choose one of {PRECISIONS}")
        if self.memory_limit is not None:
            try:
                object.__setattr__(self, "memory_limit", parse_bytes(self.memory_limit))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError("loss_fn must be callable as loss_fn(output, target)")
        return self

    def check_world(self, world_size: int):
        if self.world_size != world_size:
            names = [n for n in ("dp", "dp_shard", "pp", "cp", "tp")
                     if n in ("dp", "pp", "tp") or getattr(self, n) > 1]
            prod = "·".join(names)
            vals = "·".join(str(getattr(self, n)) for n in names)
            raise WorldSizeError(
                f"{prod} = {vals} = {self.world_size}, but the world has "
                f"{world_size} rank(s): choose {', '.join(names)} whose product is {world_size}, or "
                f"start {self.world_size} ranks (ptdp.launch(fn, world_size={self.world_size}) "
                "or torchrun)")

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loss_fn"] = getattr(self.loss_fn, "__name__", None) if self.loss_fn else None
        return d

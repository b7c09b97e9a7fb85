"""The plan as data: everything the passes decided, printable by ``explain``.

Nothing is decided in the runtime: it reads placements (how each parameter is
laid out across the mesh), collectives, chunks and recompute tags from here.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Shard:
    """Split along ``dim`` over the tp ranks. ``outer`` > 1: the dimension is laid out as
    ``(outer, t, inner)`` with the rank index in the middle — each of ``outer`` blocks
    (e.g. q, k, v of a fused projection) is split separately, so a rank holds its own
    slice of every block (the weight rows are permuted for it)."""
    dim: int
    outer: int = 1

    def __str__(self):
        return f"Shard({self.dim})" if self.outer == 1 else f"Shard({self.dim}, blocks={self.outer})"

    def runs(self, size: int, t: int, r: int) -> list:
        """Rank ``r``'s part of a dimension of full ``size`` as ``(local start, full start,
        length)`` runs in local order (padding and replicated tails aside)."""
        block = size // (self.outer * t)
        return [(b * block, b * (size // self.outer) + r * block, block)
                for b in range(self.outer)]


@dataclasses.dataclass
class ParamPlan:
    name: str                     # as model.named_parameters() reports it
    full_shape: tuple
    placement: Optional[Shard] = None     # over the tp axis; None: replicated
    role: str = ""                # what the tp analysis found it to be
    local_shape: Optional[tuple] = None   # this rank's shape (None: full)
    grad_tp_reduce: bool = False  # replicated, but sees tp-partial gradients (SP): summed over tp
    ep: int = 1                   # > 1: a routed expert's tensor, dim 0 split over the ep ranks
    # dp_shard > 1: this rank stores a flat 1/dp_shard of the local tensor, this many
    # elements (zero-padded), gathered in the graph (passes/fully_shard.py)
    fsdp_numel: Optional[int] = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.full_shape:
            n *= s
        return n


@dataclasses.dataclass
class CollectivePlan:
    kind: str            # all_reduce | all_gather | reduce_scatter | send | recv
    axis: str            # dp | tp | pp
    where: str           # graph node or runtime phase
    bytes_per_microbatch: int = 0
    note: str = ""


@dataclasses.dataclass
class Plan:
    params: dict = dataclasses.field(default_factory=dict)          # name -> ParamPlan
    collectives: list = dataclasses.field(default_factory=list)     # CollectivePlan
    loss_weighting: str = ""
    pass_log: list = dataclasses.field(default_factory=list)        # (pass name, summary)
    recompute: Optional[dict] = None
    pipeline: Optional[dict] = None   # chunks, cuts, boundary shapes, tied weights, schedule
    fsdp_buckets: list = dataclasses.field(default_factory=list)  # (key, names, full bytes)

"""What tensor parallelism left whole, and why: nothing is replicated silently.

After the tensor-parallel walk, every parameter gets a coverage row: its placement, the
bytes this rank holds, and, for a replicated weight, the reason — the op that stopped
the column/row analysis (with the model's source line), a key/value projection with
fewer heads than ranks, an embedding that is not the token embedding, a router. A
weight matrix that stays replicated at tp > 1 and is large (>= 1 MiB, or >= 2% of the
model's parameters) is named in a ``ReplicatedWeightWarning``; ``strict=True`` makes it
a ``ShardingError`` before any work starts. Such a weight is then stored split over tp
and gathered where read (``tp_gather_weights``): its row says so, and it is still named,
since its compute stays whole.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ShardingError

from . import analyze as _an

aten = torch.ops.aten
LARGE_BYTES, LARGE_FRACTION = _an.LARGE_BYTES, _an.LARGE_FRACTION


class ReplicatedWeightWarning(UserWarning):
    """A large weight matrix stays whole on every tensor-parallel rank."""


@dataclasses.dataclass
class Coverage:
    name: str
    full_shape: tuple
    placement: object          # None: replicated
    local_bytes: int
    reason: str = ""           # why it is replicated ("" when sharded)
    large: bool = False        # computed whole, a matrix, and >= 1 MiB or >= 2% of the model
    gathered: bool = False     # computed whole but stored split, gathered where read

    @property
    def sharded(self) -> bool:
        """Stored split over tp (gathered weights included: their storage is split)."""
        return self.placement is not None


def _where(n: fx.Node) -> str:
    return f"'{n.name}' ({n.target}) at {source_line(n)}"


def _reason(ph: fx.Node, analysis: _an.Analysis) -> str:
    """Why parameter placeholder ``ph`` was left replicated."""
    name = _an.param_name(ph)
    if name in analysis.kept_replicated:
        return analysis.kept_replicated[name]
    for n, lin in analysis.linears.items():
        if lin.weight is ph or lin.bias is ph:
            if n in analysis.replicated:
                return f"linear {_where(n)}: {analysis.replicated[n]}"
            return f"linear {_where(n)} is neither column- nor row-parallel"
    users = [u for u in ph.users if u.op == "call_function" and
             u.target is not aten._assert_tensor_metadata.default]
    for u in users:
        if u.target is aten.embedding.default and u.args[0] is ph:
            return (f"embedding {_where(u)} is neither the token embedding of the LM head's "
                    "vocabulary nor added to it first (only then are its rows split)")
    if not users:
        return "not used by the graph"
    return f"first used by {_where(users[0])}, which is local on every rank"


def coverage(gm: fx.GraphModule, analysis: _an.Analysis, plan, params: dict) -> list:
    """One Coverage per parameter (plan order), from the placements the pass produced."""
    phs = {_an.param_name(n): n for n in gm.graph.find_nodes(op="placeholder")
           if _an.param_name(n)}
    total = sum(p.numel() * p.element_size() for p in params.values()) or 1
    rows = []
    for name, pp in plan.params.items():
        p = params[name]
        local = math.prod(pp.local_shape or pp.full_shape) * p.element_size()
        row = Coverage(name, tuple(pp.full_shape), pp.placement, local)
        if pp.placement is None and name in phs:
            row.reason = _reason(phs[name], analysis)
            full = math.prod(pp.full_shape) * p.element_size()
            row.large = len(pp.full_shape) >= 2 and (full >= LARGE_BYTES or
                                                    full >= LARGE_FRACTION * total)
        rows.append(row)
    return rows


def check(rows: list, t: int, strict: bool, warn: bool) -> None:
    """Warn about (or, with strict, refuse) large weight matrices left replicated."""
    large = [r for r in rows if r.large]
    if not large:
        return
    lines = [f"  {r.name} {list(r.full_shape)}"
             + (" (stored split over tp, all-gathered where read)" if r.gathered else "")
             + f": {r.reason}" for r in large]
    msg = (f"tp={t} computes {len(large)} weight matrix(es) whole on every rank:\n" +
           "\n".join(lines))
    if strict:
        raise ShardingError(msg + "\nstrict=True refuses this; drop strict=True to train "
                                  "with them computed whole (the numbers are exact either way)")
    if warn:
        warnings.warn(msg + "\n(pm.explain() lists every parameter's placement; "
                            "strict=True makes this an error)", ReplicatedWeightWarning,
                      stacklevel=2)


def table(rows: list) -> list:
    """explain's coverage lines: totals, then every replicated parameter and why."""
    sharded = sum(r.local_bytes for r in rows if r.sharded)
    replicated = sum(r.local_bytes for r in rows if not r.sharded)
    gathered = [r for r in rows if r.gathered]
    out = [f"    tensor-parallel coverage: {sum(r.sharded for r in rows)} of {len(rows)} "
           f"parameters sharded; this rank holds {sharded:,} sharded + {replicated:,} "
           f"replicated bytes ({replicated / max(sharded + replicated, 1):.0%} replicated)"
           + (f"; {len(gathered)} of the sharded are computed whole (stored split, "
              "all-gathered where read)" if gathered else "")]
    vectors = [r for r in rows if not r.sharded and len(r.full_shape) < 2]
    for r in gathered:
        out.append(f"      gathered {r.name} {list(r.full_shape)} stored {r.placement}: "
                   f"{r.reason}")
    for r in rows:
        if not r.sharded and len(r.full_shape) >= 2:
            flag = "  LARGE" if r.large else ""
            out.append(f"      replicated {r.name} {list(r.full_shape)}{flag}: {r.reason}")
    if vectors:
        out.append(f"      replicated {len(vectors)} vectors (norm weights, biases of "
                   f"unsplit outputs; {sum(r.local_bytes for r in vectors):,} bytes), as in "
                   "Megatron")
    return out


__all__ = ["Coverage", "ReplicatedWeightWarning", "coverage", "check", "table", "Optional"]

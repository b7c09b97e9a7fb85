"""Inductor settings the code generator relies on, applied once before the first compile.

- The FX graph cache (Inductor's compiled-code cache across runs, keyed on the graph and
  config) is on unless the user said ``TORCHINDUCTOR_FX_GRAPH_CACHE=0``.
- Compute/communication reordering (``PTDP_COMM_REORDER=1`` or
  ``set_comm_reorder(True)``): turns on ``reorder_for_compute_comm_overlap``. Inductor
  only moves the *functional* collectives it recognises (``_c10d_functional.*``), and
  ptdp's f / g / SP operators are opaque custom ops to it, so with the flag on their
  bodies are decomposed into functional collectives for Inductor. That is safe because
  the decomposition applies below autograd, after the custom backward was recorded.
  Each reorder pass is wrapped so ``reorder_report`` records which collectives moved.
"""
from __future__ import annotations

import os
from typing import Optional

_COMM_REORDER: Optional[bool] = None
_APPLIED: dict = {}

# one entry per Inductor graph with collectives: {"pass", "collectives", "moved": [names]}
reorder_report: list = []

REORDER_PASSES = ("reorder_compute_for_overlap", "sink_waits", "raise_comms")


def set_comm_reorder(enabled: Optional[bool]) -> None:
    """Force Inductor's comm/compute reordering on/off (None: follow PTDP_COMM_REORDER)."""
    global _COMM_REORDER
    _COMM_REORDER = enabled


def comm_reorder_enabled() -> bool:
    if _COMM_REORDER is not None:
        return _COMM_REORDER
    return os.environ.get("PTDP_COMM_REORDER", "0").lower() in ("1", "true", "on", "yes")


def apply_inductor_options() -> None:
    import torch._inductor.config as ic
    if os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE", "1") != "0":
        ic.fx_graph_cache = True
    want = comm_reorder_enabled()
    if _APPLIED.get("reorder") == want:
        return
    _APPLIED["reorder"] = want
    ic.reorder_for_compute_comm_overlap = want
    if want:
        ic.reorder_for_compute_comm_overlap_passes = [_reporting(p) for p in REORDER_PASSES]
        _decompose_ptdp_collectives(True)
    else:
        ic.reorder_for_compute_comm_overlap_passes = []
        _decompose_ptdp_collectives(False)


def _reporting(pass_name: str):
    """Wrap Inductor's builtin reorder pass: record which collectives changed position."""
    def run(snodes):
        from torch._inductor import comms
        before = [s.get_name() for s in snodes]
        out = getattr(comms, pass_name)(snodes)
        after = [s.get_name() for s in out]
        colls = [s.get_name() for s in snodes if comms.contains_collective(s)]
        if colls:
            pos_b = {n: i for i, n in enumerate(before)}
            pos_a = {n: i for i, n in enumerate(after)}
            moved = [n for n in before if comms.contains_collective(snodes[pos_b[n]])
                     and pos_a.get(n) != pos_b[n]]
            reorder_report.append({"pass": pass_name, "collectives": len(colls),
                                   "nodes": len(before), "moved": moved})
        return out
    run.__name__ = f"ptdp_reporting_{pass_name}"
    return run


def _decompose_ptdp_collectives(on: bool) -> None:
    """Let Inductor see ptdp's collectives as functional collectives (see module doc)."""
    import torch
    from torch._inductor.decomposition import decompositions

    import ptdp_compiler.collectives as C
    ops = {torch.ops.ptdp.tp_f.default: lambda x, gn, t, tag: x.clone(),
           torch.ops.ptdp.tp_g.default: lambda x, gn, t, tag: C._all_reduce(x, gn),
           torch.ops.ptdp.sp_gather.default: lambda x, d, o, gn, t: C._all_gather(x, d, o, t, gn),
           torch.ops.ptdp.sp_scatter.default:
               lambda x, d, o, gn, t: C._reduce_scatter(x, d, o, t, gn)}
    for op, fn in ops.items():
        if on:
            decompositions[op] = fn
        else:
            decompositions.pop(op, None)

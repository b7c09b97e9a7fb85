"""Inductor settings the code generator relies on.

- The FX graph cache (Inductor's compiled-code cache across runs, keyed on the graph and
  config) is on unless the user said ``TORCHINDUCTOR_FX_GRAPH_CACHE=0``; set once,
  process-wide, by ``apply_inductor_options``.
- Compute/communication reordering (``ParallelConfig.comm_reorder``; overridden by
  ``PTDP_COMM_REORDER=0/1`` and by ``set_comm_reorder``) is applied per compile, not
  process-wide: ``reorder_compile_kwargs`` returns the ``config_patches`` and
  ``decompositions`` for ``compile_fx``, so two programs in one process (or two tests in
  one shared rank process) can differ. ``compile_fx`` re-applies ``config_patches``
  around the lazily compiled backward too.

  Inductor only moves the *functional* collectives it recognises (``_c10d_functional.*``),
  and ptdp's f / g / SP operators are opaque custom ops to it, so with reordering on their
  bodies are decomposed into functional collectives for Inductor. That is safe because the
  decomposition applies below autograd, after the custom backward was recorded.

  Reordering is one picklable pass object (``ReportingReorder``) so that it is part of the
  FX graph / AOTAutograd cache key (an on-compile never reuses an off-compile's code, and
  an on-compile is still cached; a closure there would make Inductor bypass the cache).
  It runs Inductor's builtin passes in order and appends to ``reorder_report`` which
  collectives changed position and how much compute now sits between each collective and
  its wait. Only graphs Inductor schedules in this process are reported: a graph loaded
  from the cache was reordered (and reported) by the process that compiled it.
"""
from __future__ import annotations

import collections
import os
from typing import Optional

_COMM_REORDER: Optional[bool] = None

# one entry per Inductor graph with collectives (see ReportingReorder.__call__)
reorder_report: list = []

# Inductor's builtin scheduler passes (torch/_inductor/comms.py), in execution order:
# start each collective as early as its inputs allow and fill the gap to its wait with
# independent compute, then sink waits to their first use and raise collectives again.
REORDER_PASSES = ("reorder_compute_for_overlap", "sink_waits", "raise_comms")

_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def set_comm_reorder(enabled: Optional[bool]) -> None:
    """Force reordering on/off for every compile in this process (None: follow the
    ``PTDP_COMM_REORDER`` environment variable, then ``ParallelConfig.comm_reorder``)."""
    global _COMM_REORDER
    _COMM_REORDER = enabled


def comm_reorder_enabled(configured: bool = False) -> bool:
    """``configured`` (the config's ``comm_reorder``) unless an override says otherwise."""
    if _COMM_REORDER is not None:
        return _COMM_REORDER
    env = os.environ.get("PTDP_COMM_REORDER", "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    return bool(configured)


def apply_inductor_options() -> None:
    import torch._inductor.config as ic
    if os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE", "1") != "0":
        ic.fx_graph_cache = True


def reorder_compile_kwargs(enabled: bool) -> dict:
    """Keyword arguments for ``compile_fx``: empty when off; when on, the config patch
    that turns Inductor's reordering on and the decomposition table that exposes ptdp's
    collectives to it."""
    if not enabled:
        return {}
    from torch._inductor.decomposition import select_decomp_table
    return {"config_patches": {"reorder_for_compute_comm_overlap": True,
                               "reorder_for_compute_comm_overlap_passes":
                                   [ReportingReorder(REORDER_PASSES)]},
            "decompositions": {**select_decomp_table(), **_ptdp_collective_decompositions()}}


class ReportingReorder:
    """Inductor's builtin reorder passes ``passes``, run in order on a graph's scheduler
    nodes, recording what moved. Picklable by value (module-level class, names only), so
    Inductor's cache key covers it."""

    def __init__(self, passes: tuple):
        self.passes = tuple(passes)

    def __call__(self, snodes: list) -> list:
        from torch._inductor import comms
        order = list(snodes)
        for name in self.passes:
            order = getattr(comms, name)(order)
        entry = describe_reorder(snodes, order)
        if entry["collectives"]:
            entry["passes"] = list(self.passes)
            reorder_report.append(entry)
        return order

    def __eq__(self, other) -> bool:
        return isinstance(other, ReportingReorder) and other.passes == self.passes

    def __hash__(self) -> int:
        return hash(self.passes)

    def __repr__(self) -> str:
        return f"ReportingReorder({self.passes})"


def describe_reorder(before: list, after: list) -> dict:
    """Per collective in one graph: its op, position and the number of compute nodes
    between it and its wait (what can overlap it), before and after reordering."""
    from torch._inductor.utils import contains_collective, contains_wait
    from torch._inductor.virtualized import V
    pos_b = {s.get_name(): i for i, s in enumerate(before)}
    pos_a = {s.get_name(): i for i, s in enumerate(after)}
    rows = []
    for s in before:
        if not contains_collective(s):
            continue
        name = s.get_name()
        wait = _wait_of(s, before)
        row = {"op": _collective_op(s), "node": name,
               "position": [pos_b[name], pos_a[name]],
               "overlap": [_compute_between(s, wait, before), _compute_between(s, wait, after)]}
        row["moved"] = row["position"][0] != row["position"][1]
        rows.append(row)
    graph = getattr(V, "graph", None)
    return {"graph": "backward" if getattr(graph, "is_backward", False) else "forward",
            "nodes": len(before), "collectives": rows,
            "moved": [r["op"] for r in rows if r["moved"]],
            "waits": sum(1 for s in before if contains_wait(s))}


def _collective_op(snode) -> str:
    """``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``all_reduce_``, ..."""
    from torch._inductor.utils import is_collective
    for s in getattr(snode, "snodes", None) or [snode]:
        node = s.node
        if is_collective(node):
            op = getattr(node, "op_overload", None)
            return getattr(op, "_opname", None) or str(op or type(node).__name__)
    return type(snode.node).__name__


def _wait_of(coll, snodes: list):
    """The first wait reading the collective's result (None if not in this graph). A
    coalesced collective's results pass through MultiOutput nodes before their waits."""
    from torch._inductor import ir
    from torch._inductor.utils import contains_wait
    names = set(coll.get_buffer_names())
    for op in coll.get_nodes():
        if op.node is not None:
            names |= set(op.node.get_mutation_names())
    for s in snodes:
        if not {d.name for d in s.read_writes.reads} & names:
            continue
        if contains_wait(s):
            return s
        if isinstance(s.node, ir.MultiOutput):
            names |= set(s.get_buffer_names())
    return None


def _compute_between(coll, wait, order: list) -> int:
    """Scheduler nodes strictly between ``coll`` and ``wait`` that compute (not another
    collective, a wait, or a MultiOutput that only unpacks a result)."""
    from torch._inductor import ir
    from torch._inductor.utils import contains_collective, contains_wait
    if wait is None:
        return 0
    names = [s.get_name() for s in order]
    i, j = names.index(coll.get_name()), names.index(wait.get_name())
    return sum(1 for s in order[i + 1:j] if not contains_collective(s) and not contains_wait(s)
               and not isinstance(s.node, ir.MultiOutput))


def moved_collectives(report: Optional[list] = None) -> collections.Counter:
    """How many collectives of each op changed position, over ``report`` entries."""
    return collections.Counter(op for e in (reorder_report if report is None else report)
                               for op in e["moved"])


def _ptdp_collective_decompositions() -> dict:
    """ptdp's f / g / SP ops as functional collectives (see module doc)."""
    import torch

    import ptdp_compiler.collectives as C
    return {torch.ops.ptdp.tp_f.default: lambda x, gn, t, tag: x.clone(),
            torch.ops.ptdp.tp_g.default: lambda x, gn, t, tag: C._all_reduce(x, gn),
            torch.ops.ptdp.sp_gather.default:
                lambda x, d, o, gn, t: C._all_gather(x, d, o, t, gn),
            torch.ops.ptdp.sp_scatter.default:
                lambda x, d, o, gn, t: C._reduce_scatter(x, d, o, t, gn),
            torch.ops.ptdp.sp_scatter_bias.default:
                lambda x, b, d, o, gn, t: C._reduce_scatter(x, d, o, t, gn) + b}

"""Expert parallelism (``ep``): each routed-experts region runs on its experts' owners, tokens
travel there and back by all-to-all.

Found by dataflow, not by names. A mixture-of-experts layer as Hugging Face ships it (and as
the capture sees it) routes with ``topk`` over router logits, sorts the (token, choice) rows by
expert, counts them per expert into cumulative offsets and runs its experts as grouped GEMMs
over 3-D expert weights ``[E, ..]`` with those offsets; the results are weighted by the router
and scattered back per token. The pass keys on the grouped GEMMs (``analyze.is_grouped_mm``):
the ones that share one offsets tensor are one layer's experts. Its *expert region* is

- the grouped GEMMs and every node between them (the activation, gate/up chunks, tp's
  collectives on expert partial sums), plus the nodes after the last GEMM that read only
  region values and per-expert parameters gathered by row (gpt-oss's expert biases):
  everything that is row-local given the row's expert;
- its *entries*: row-aligned values from outside (the sorted token copies);
- its *exits*: region values read outside (the expert output before router weighting).

The rewrite, for ep ranks that split the E experts into contiguous blocks of L = E/ep:

- ``ptdp::ep_counts`` exchanges the per-expert row counts (an even all-to-all of E integers);
- every entry passes through ``ptdp::ep_dispatch`` (uneven all-to-all to the owners), every
  exit through ``ptdp::ep_combine`` (back to the rows' ranks and positions); each is the
  other's backward;
- the grouped GEMMs read the local offsets, per-expert gathers read local expert ids, and
  expert parameters (the GEMMs' 3-D weights and the gathered per-expert tensors, all with
  leading dimension E) hold L experts: ``plan.params[name].ep = ep``.

Guarantees afterwards: dropless (every row reaches its expert; the router, top-k, router
weighting, combine-by-token and any auxiliary load-balancing or z-loss stay as captured, on
this rank's own tokens, so the loss and every gradient equal one device's up to float
summation order); expert parameters' local shapes in ``plan.params``; the graph type-checks
with FakeTensor at local shapes. Runs after the tensor-parallel pass, so expert tensor
parallelism (inside each expert, over tp) composes: tp shards dims 1-2, ep dim 0.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from ptdp_compiler.errors import ExpertParallelError, ShardingError

from . import analyze as _an
from .tp_fake_check import fake_check

aten = torch.ops.aten
# single-input ops between an expert parameter and the grouped GEMM that reads it
_WEIGHT_VIEWS = {aten.transpose.int, aten.permute.default, aten.t.default, aten.to.dtype,
                 aten._to_copy.default, aten.alias.default, aten.contiguous.default,
                 aten.clone.default, aten.view.default, aten.reshape.default,
                 aten._unsafe_view.default, aten.to.dtype_layout}
_SHAPE_ARGS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
               aten.expand.default, aten.new_zeros.default, aten.new_empty.default}


@dataclasses.dataclass
class ExpertRegion:
    """One mixture-of-experts layer's routed experts, as found in the graph."""
    offs: fx.Node                     # cumulative rows per expert (what the GEMMs read)
    gemms: list                       # grouped GEMM nodes, in graph order
    nodes: set                        # the region (row-local given the row's expert)
    entries: list                     # row-aligned values flowing in
    exits: list                       # region values read outside
    gathers: list                     # index(per-expert param, [expert id per row]) nodes
    params: dict                      # param name -> placeholder (leading dim E)
    rows: int                         # N: rows (token copies) this rank routes
    experts: int                      # E


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _leading(n):
    v = _val(n)
    return v.shape[0] if isinstance(v, torch.Tensor) and v.dim() > 0 else None


def _offs_of(n: fx.Node):
    return n.kwargs.get("offs", n.args[2] if len(n.args) > 2 else None)


def _expert_param(n, experts: int):
    """The parameter placeholder ``n`` is a view/cast/transpose chain of, if its leading
    dimension is ``experts``; else None."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in _WEIGHT_VIEWS:
        n = n.args[0]
    if _an.param_name(n) and _leading(n) == experts:
        return n
    return None


def find_expert_regions(gm: fx.GraphModule) -> list:
    """Every routed-experts region of ``gm`` (one per MoE layer), in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_offs: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and _an.is_grouped_mm(n.target) and _offs_of(n) is not None:
            by_offs.setdefault(_offs_of(n), []).append(n)
    regions = []
    for offs, gemms in by_offs.items():
        E = _leading(offs)
        params = {}
        for g in gemms:
            p = _expert_param(g.args[1], E)
            if p is None:
                raise ShardingError(f"expert parallelism: the grouped GEMM {g.name} reads "
                                    f"{g.args[1]}, not a parameter with {E} experts")
            params[_an.param_name(p)] = p
        regions.append(_grow(gemms, offs, E, params, order))
    return sorted(regions, key=lambda r: order[r.gemms[0]])


def _gather_of(n, experts: int):
    """``index(P, [ids])`` of a per-expert parameter P (leading dim E) by one index per row:
    the placeholder of P, else None."""
    if n.op != "call_function" or n.target is not aten.index.Tensor:
        return None
    idx = n.args[1]
    if len(idx) != 1 or idx[0] is None:
        return None
    return _expert_param(n.args[0], experts)


def _grow(gemms, offs, E, params, order) -> ExpertRegion:
    gemms = sorted(gemms, key=order.__getitem__)
    N = _leading(gemms[0].args[0])
    region = set(gemms)
    # between the GEMMs: descendants of one GEMM that are ancestors of a later one
    below: set = set()
    for g in gemms:
        stack = list(g.users)
        while stack:
            u = stack.pop()
            if u not in below and order[u] < order[gemms[-1]]:
                below.add(u)
                stack.extend(u.users)
    for g in gemms[1:]:
        stack = [a for a in g.all_input_nodes]
        seen = set()
        while stack:
            a = stack.pop()
            if a in seen:
                continue
            seen.add(a)
            if a in below:
                region.add(a)
                stack.extend(a.all_input_nodes)
    gathers = []

    def inside(a):
        if a in region:
            return True
        p = _gather_of(a, E)
        if p is not None and _leading(a) == N:
            if a not in gathers:
                gathers.append(a)
            params[_an.param_name(p)] = p
            return True
        return False

    # after the last GEMM: nodes that read only region values (and per-expert gathers)
    frontier = sorted({u for n in region for u in n.users if u not in region},
                      key=order.__getitem__)
    while frontier:
        u = frontier.pop(0)
        if u in region or u.op != "call_function":
            continue
        tensors = [a for a in u.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        if order[u] > order[gemms[-1]] and tensors and all(inside(a) for a in tensors) and \
                (_leading(u) == N or u.target is operator.getitem):
            region.add(u)
            frontier.extend(sorted((x for x in u.users if x not in region),
                                   key=order.__getitem__))
    for n in list(region):   # gathers inside the region (between the GEMMs)
        for a in n.all_input_nodes:
            if a not in region:
                inside(a)
    weight_chains = set()
    for p in params.values():
        stack = list(p.users)
        while stack:
            u = stack.pop()
            if u.op == "call_function" and u.target in _WEIGHT_VIEWS and u not in weight_chains:
                weight_chains.add(u)
                stack.extend(u.users)
    # capture's dtype/device asserts on region values check nothing the rewrite changes; as
    # readers outside the region they would make their value an exit (a wasted combine)
    for n in list(region):
        for u in list(n.users):
            if u.op == "call_function" and u.target is aten._assert_tensor_metadata.default:
                u.graph.erase_node(u)
    entries = []
    for n in sorted(region, key=order.__getitem__):
        for a in n.all_input_nodes:
            if a in region or a is offs or a in gathers or a in weight_chains or \
                    a.op == "placeholder" or a in entries:
                continue
            if _leading(a) == N:
                entries.append(a)
    exits = [n for n in sorted(region, key=order.__getitem__)
             if any(u not in region for u in n.users) and isinstance(_val(n), torch.Tensor)]
    return ExpertRegion(offs, gemms, region, entries, exits, gathers, params, N, E)


# ---- the rewrite ------------------------------------------------------------------------------
def expert_parallel_pass(gm: fx.GraphModule, cfg, coords, params: dict, plan,
                         rows_scale: float = 1.0) -> fx.GraphModule:
    """Rewrite every expert region for ``cfg.ep`` ranks (see the module doc).
    ``rows_scale``: the most tokens any rank of the ep group holds in this microbatch over
    this rank's (ranks may hold different numbers): the receive buffers are sized for it."""
    from ptdp_compiler import expert_dispatch  # noqa: F401  (registers the ptdp::ep_* ops)
    ep = cfg.ep
    group = coords.group("ep") if coords is not None else None
    group_name = group.group_name if group is not None else "ep"
    from .expert_dense import DenseExpertRegion, find_dense_expert_regions, rewrite_dense
    regions = find_expert_regions(gm)
    dense = find_dense_expert_regions(gm)
    if not regions and not dense:
        raise ExpertParallelError(f"ep={ep}: the model has no routed experts (no grouped "
                                  "or batched expert GEMMs over 3-D expert weights found in "
                                  "its graph); use ep=1")
    for reg in regions + dense:
        if reg.experts % ep:
            raise ExpertParallelError(f"ep={ep} does not divide the {reg.experts} experts of "
                                      f"the layer with {reg.gemms[0].name}: choose ep "
                                      f"dividing {reg.experts}")
        if isinstance(reg, DenseExpertRegion):
            rewrite_dense(gm, reg, ep, group_name, rows_scale)
        else:
            _rewrite(gm, reg, ep, group_name, rows_scale)
        for name in reg.params:
            pp = plan.params[name]
            shape = list(pp.local_shape or pp.full_shape)
            shape[0] //= ep
            pp.local_shape, pp.ep = tuple(shape), ep
    gm.graph.eliminate_dead_code()
    gm.recompile()
    fake_check(gm, params, plan, "expert-parallel", "val")
    from ptdp_compiler.placement import CollectivePlan
    for r in regions:
        h = _val(r.entries[0]).shape[-1] if r.entries else 0
        size = _val(r.entries[0]).element_size() if r.entries else 0
        expected = int(2 * r.rows * h * size * (ep - 1) / ep)
        plan.collectives.append(CollectivePlan(
            "all_to_all", "ep", f"{r.gemms[0].name}: dispatch + combine (fwd, mirrored bwd)",
            expected, f"{r.rows} rows x {h}; bytes sent under uniform routing; "
            f"+ {r.experts} counts exchanged"))
    for r in dense:
        h = _val(r.entry).shape[-1]
        expected = int(2 * r.experts * r.rows * h * _val(r.entry).element_size() *
                       (ep - 1) / ep)
        plan.collectives.append(CollectivePlan(
            "all_to_all", "ep", f"{r.gemms[0].name}: every token to every expert's owner "
            "and back (fwd, mirrored bwd)", expected,
            f"{r.experts} experts x {r.rows} rows x {h}: dense dispatch (scores 0 for experts "
            "not chosen), E/top-k times a sorted dispatch"))
    regions = regions + dense
    nparams = sum(len(r.params) for r in regions)
    plan.pass_log.append(("expert_parallel", (
        f"ep={ep}: {len(regions)} routed-experts region(s), {nparams} expert parameters "
        f"hold 1/{ep} of the experts each; tokens dispatched and combined by all-to-all "
        "(dropless; router, top-k, weighting and auxiliary losses unchanged)")))
    plan.expert_regions = [{"gemms": [g.name for g in r.gemms], "experts": r.experts,
                            "rows": r.rows, "params": sorted(r.params),
                            "dispatch": "dense" if isinstance(r, DenseExpertRegion)
                            else "sorted"}
                           for r in regions]
    return gm


def _rewrite(gm, reg: ExpertRegion, ep: int, group_name: str, rows_scale: float = 1.0):
    g = gm.graph
    # dropless worst case: every row of every ep rank routed here (the largest rank's count)
    N, cap = reg.rows, ep * math.ceil(reg.rows * rows_scale - 1e-9)
    order = {n: i for i, n in enumerate(g.nodes)}
    with g.inserting_after(reg.offs):
        counts = g.call_function(torch.ops.ptdp.ep_counts.default, (reg.offs, group_name, ep, cap))
    with g.inserting_after(counts):
        local_offs = g.call_function(operator.getitem, (counts, 0))
    with g.inserting_after(local_offs):
        recv = g.call_function(operator.getitem, (counts, 1))
    with g.inserting_after(recv):
        local_ids = g.call_function(operator.getitem, (counts, 2))
    for e in reg.entries:
        with g.inserting_after(e if order[e] > order[reg.offs] else local_ids):
            d = g.call_function(torch.ops.ptdp.ep_dispatch.default,
                                (e, reg.offs, recv, group_name, ep, cap))
        for u in list(e.users):
            if u in reg.nodes:
                u.replace_input_with(e, d)
    for gm_node in reg.gemms:
        if "offs" in gm_node.kwargs:
            gm_node.update_kwarg("offs", local_offs)
        else:
            gm_node.update_arg(2, local_offs)
    for ga in reg.gathers:
        ga.update_arg(1, [local_ids])
    for n in reg.nodes:        # row counts written as literals (views) become the capacity
        if n.target in _SHAPE_ARGS and len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) \
                and n.args[1] and n.args[1][0] == N:
            n.update_arg(1, [cap] + list(n.args[1][1:]))
    for p in reg.params.values():   # a view of an expert weight naming E
        stack = list(p.users)
        while stack:
            u = stack.pop()
            if u.op == "call_function" and u.target in _WEIGHT_VIEWS:
                if u.target in _SHAPE_ARGS and u.args[1] and u.args[1][0] == reg.experts:
                    u.update_arg(1, [reg.experts // ep] + list(u.args[1][1:]))
                stack.extend(u.users)
    for x in reg.exits:
        outside = [u for u in x.users if u not in reg.nodes]
        with g.inserting_after(x):
            c = g.call_function(torch.ops.ptdp.ep_combine.default,
                                (x, reg.offs, recv, group_name, ep, N))
        for u in outside:
            u.replace_input_with(x, c)
    # an entry or gather computed before the offsets would now precede its inputs: re-sort
    _topo_fix(g)


def _topo_fix(g: fx.Graph):
    """Move nodes so every node comes after its inputs (the inserted ops were placed next
    to their inputs, which may follow the region's first node)."""
    placed, out = set(), []
    nodes = list(g.nodes)
    for root in nodes:
        stack = [(root, False)]
        while stack:
            n, ready = stack.pop()
            if ready:
                out.append(n)
                continue
            if n in placed:
                continue
            placed.add(n)
            stack.append((n, True))
            stack.extend((a, False) for a in reversed(n.all_input_nodes) if a not in placed)
    if out == nodes:
        return
    prev = None
    for n in out:
        if prev is not None:
            prev.append(n)
        prev = n


# ---- recompute: the dispatch is re-run in backward (passes/recompute.py tags it) -----------
# expert parallelism's token dispatch: an all-to-all of rows, deterministic given its
# counts; re-run in backward it is what "recompute the MoE layer's gathered tokens, keep
# its dispatch indices" means (the received buffer holds ep x this rank's rows)
from ptdp_compiler import expert_dispatch as _ep_ops  # noqa: E402,F401  (registers ptdp::ep_*)

EP_REPLAYABLE = {torch.ops.ptdp.ep_dispatch.default}
_ROW_GATHERS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_select.default,
                torch.ops.aten.gather.default}


def ep_redispatched(nodes) -> set:
    """The expert dispatches among ``nodes``, the row gather (tokens by routing index)
    feeding each and the layout-only ops from each to the expert GEMMs: recomputed in
    backward (one more all-to-all) from the tokens and the exchanged counts, instead of
    storing the received buffer."""
    from .cp_rules import CHAIN as layout_only
    nodes, out = set(nodes), set()
    stack = [n for n in nodes if n.op == "call_function" and n.target in EP_REPLAYABLE]
    for d in list(stack):
        src = d.args[0]
        while isinstance(src, fx.Node) and src in nodes and (
                src.target in layout_only or src.target in _ROW_GATHERS):
            out.add(src)
            if src.target in _ROW_GATHERS:
                break
            src = src.args[0]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(u for u in n.users if u in nodes and u.target in layout_only)
    return out

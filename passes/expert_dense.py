"""Expert parallelism for experts that see every token (Llama 4's ``bmm`` experts).

Some MoE layers do not sort tokens by expert. Llama 4 scales each token by its router
score for every expert (0 where the expert was not chosen), stacks the E copies as
``[E, N, h]`` and runs the experts as batched GEMMs over 3-D weights ``[E, h, f]``,
``[E, f, h]``; the E outputs are summed per token afterwards. Found by dataflow: a
``bmm`` / ``matmul`` whose second operand is a parameter of leading dimension E and whose
first operand has E rows (``find_dense_expert_regions``); the GEMMs chained through ops
on ``[E, N, ·]`` values are one layer's region.

The rewrite for ep ranks owning contiguous blocks of L = E/ep experts: the region's input
``[E, N, h]`` is padded to M rows per expert (M: the most tokens any rank of the ep group
holds this microbatch, so ranks with fewer tokens still exchange equal blocks) and sent by
one all-to-all (``_c10d_functional_autograd.all_to_all_single``, dim 0 split in ep blocks
of L experts): rank q receives every rank's tokens for its experts, ``[L, ep·M, h]``. The
experts run on their L local weights; their output goes back by the mirrored all-to-all
and the padding is cut. Autograd's backward of each all-to-all is the reverse one, so
gradients are exact; padded rows are zero and are cut, so they add nothing to any weight
gradient. Nothing outside the region changes (router, scores, the sum over experts, the
shared expert).

Cost, honestly: the graph sends every token to every expert (as the model computes), so
dispatch + combine move 2·E·N·h·(ep−1)/ep elements per layer and direction — E/top-k
times a sorted token dispatch. Exact for any scores; a sparse dispatch would need the
router's choice, which this form does not expose to the experts.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from ptdp_compiler.errors import ExpertParallelError

from . import analyze as _an

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
_c10d_ag = torch.ops._c10d_functional_autograd
_BATCHED = {aten.bmm.default, aten.matmul.default}


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _shape(n):
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


@dataclasses.dataclass
class DenseExpertRegion:
    gemms: list          # the batched expert GEMMs, in graph order
    nodes: set           # the GEMMs and every op between them
    entry: fx.Node       # [E, N, h]: the first GEMM's input
    exit: fx.Node        # [E, N, h']: the last GEMM's output
    params: dict         # name -> placeholder (leading dim E)
    experts: int         # E
    rows: int            # N: tokens per expert on this rank


def _param3d(n, experts: int):
    from .expert_parallel import _expert_param
    p = _expert_param(n, experts)
    return p if p is not None and len(_shape(p) or ()) == 3 else None


def find_dense_expert_regions(gm: fx.GraphModule) -> list:
    """Every dense-dispatch experts region of ``gm``, in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    gemms = []
    for n in gm.graph.nodes:
        s = _shape(n.args[0]) if n.op == "call_function" and n.target in _BATCHED else None
        if s is not None and len(s) == 3 and _param3d(n.args[1], s[0]) is not None:
            gemms.append(n)
    regions = []
    for g in gemms:
        E, N = _shape(g.args[0])[:2]
        prev = regions[-1] if regions else None
        between = _between(prev.gemms[-1], g, order) if prev is not None and \
            prev.experts == E and prev.rows == N else None
        p = _param3d(g.args[1], E)
        if between is not None:
            prev.nodes |= between | {g}
            prev.gemms.append(g)
            prev.exit = g
            prev.params[_an.param_name(p)] = p
            continue
        regions.append(DenseExpertRegion([g], {g}, g.args[0], g, {_an.param_name(p): p}, E, N))
    return regions


def _between(a: fx.Node, b: fx.Node, order: dict):
    """The ops on the path from GEMM ``a`` to GEMM ``b`` (``b``'s first operand descends
    from ``a`` through [E, N, ·] values only), else None."""
    E, N = _shape(a)[:2]
    out, stack = set(), [b.args[0]]
    while stack:
        n = stack.pop()
        if n is a or n in out:
            continue
        s = _shape(n)
        if not isinstance(n, fx.Node) or n.op != "call_function" or order[n] < order[a] or \
                (s is not None and s[:2] != (E, N) and n.target is not aten.chunk.default):
            return None
        out.add(n)
        stack.extend(x for x in n.all_input_nodes if _shape(x) is None or len(_shape(x)) >= 2)
    return out


def rewrite_dense(gm: fx.GraphModule, reg: DenseExpertRegion, ep: int, group_name: str,
                  rows_scale: float = 1.0) -> None:
    """Route ``reg`` through the ep ranks owning its experts (see the module doc)."""
    from .expert_parallel import _SHAPE_ARGS
    g = gm.graph
    E, N = reg.experts, reg.rows
    L, M = E // ep, math.ceil(N * rows_scale - 1e-9)
    for n in reg.nodes:    # reading values from outside the region other than weights: refuse
        for a in n.all_input_nodes:
            if a not in reg.nodes and a is not reg.entry and a.op != "placeholder" and \
                    _param3d(a, E) is None and (_shape(a) or (1,))[0] == E:
                raise ExpertParallelError(
                    f"ep={ep}: the experts GEMM region of {reg.gemms[0].name} reads "
                    f"{a.name} ({list(_shape(a))}) per expert from outside; not supported")

    def call(target, *args):
        return g.call_function(target, args)
    with g.inserting_before(reg.gemms[0]):
        x = reg.entry
        if M > N:
            x = call(aten.constant_pad_nd.default, x, [0, 0, 0, M - N])
        sent = call(_c10d_ag.all_to_all_single.default, x, [L] * ep, [L] * ep, group_name)
        got = call(_c10d.wait_tensor.default, sent)
        h = _shape(reg.entry)[2]
        y = call(aten.view.default, got, [ep, L, M, h])
        y = call(aten.permute.default, y, [1, 0, 2, 3])
        y = call(aten.reshape.default, y, [L, ep * M, h])
    reg.gemms[0].replace_input_with(reg.entry, y)
    for n in reg.nodes:        # sizes written as literals: L experts of ep·M rows
        if n.target in _SHAPE_ARGS and isinstance(n.args[1], (list, tuple)) and \
                list(n.args[1][:2]) == [E, N]:
            n.update_arg(1, [L, ep * M] + list(n.args[1][2:]))
    outside = [u for u in reg.exit.users if u not in reg.nodes]
    h2 = _shape(reg.exit)[2]
    with g.inserting_after(reg.exit):
        z = call(aten.view.default, reg.exit, [L, ep, M, h2])
    with g.inserting_after(z):
        z2 = call(aten.permute.default, z, [1, 0, 2, 3])
    with g.inserting_after(z2):
        z3 = call(aten.reshape.default, z2, [E, M, h2])
    with g.inserting_after(z3):
        back = call(_c10d_ag.all_to_all_single.default, z3, [L] * ep, [L] * ep, group_name)
    with g.inserting_after(back):
        out = call(_c10d.wait_tensor.default, back)
    if M > N:   # cut the padding; contiguous, as the captured readers may view it
        with g.inserting_after(out):
            cut = call(aten.slice.Tensor, out, 1, 0, N)
        with g.inserting_after(cut):
            out = g.call_function(aten.clone.default, (cut,),
                                  {"memory_format": torch.contiguous_format})
    for u in outside:
        u.replace_input_with(reg.exit, out)


__all__ = ["DenseExpertRegion", "find_dense_expert_regions", "rewrite_dense"]

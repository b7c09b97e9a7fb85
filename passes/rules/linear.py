"""Linears (found by the analysis, whatever op form: linear, addmm, mm, matmul).

- column-parallel: W Shard(out), x replicated (wrapped in f, or all-gathered under SP)
  -> output Shard(last).
- row-parallel: W Shard(in), x Shard(last) -> partial sums -> g (all-reduce), or a
  reduce-scatter along the sequence under SP; a bias is added after the reduction (or
  joins the reduce-scatter).
- replicated weight on a sharded input (not on its features): local, W wrapped in f.
- routed experts (grouped_mm over 3-D expert weights): Megatron's expert tensor
  parallelism — every expert's gate/up split by columns, its down projection by rows;
  the partial sums of tokens sorted by expert are all-reduced (g), as they are in no
  sequence order a reduce-scatter could keep.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..sharding import moved
from . import rule

aten = torch.ops.aten


def _args(node, lin, x, W, b):
    if node.target is aten.linear.default:
        return (x, W) if b is None else (x, W, b)
    if node.target is aten.addmm.default:
        return (b, x, W)
    return (x, W)


def _grouped(rw, node, lin):
    """grouped_mm(x [tokens, in], W [experts, in, out], offsets): W's placement is read at
    the op (after the transpose that made it [in, out])."""
    x, W = rw.new(lin.x), rw.new(node.args[1])
    xp, wp = rw.placement.get(x), rw.placement.get(W)
    rest = [rw.new(a) if isinstance(a, fx.Node) else a for a in node.args[2:]]
    if xp is not None and (wp is None or xp.dim != 1 or wp.dim != 1):
        rw.fail(node, f"grouped matmul of tokens {xp} with expert weights {wp}: the tokens "
                      "sorted by expert must be whole (replicated), or split on their "
                      "features for a row-parallel expert weight")
    if wp is not None and wp.dim == 2:                        # column-parallel experts
        return rw.emit(node.target, (rw.f(x), W, *rest), node.kwargs,
                       pl=moved(wp, 1), like=node)
    if wp is not None:                                        # row-parallel experts
        mm = rw.emit(node.target, (x, W, *rest), node.kwargs, pl=None, like=node)
        return rw.reduce_partial(mm, node, scatter=False)
    return rw.copy(node)


@rule("linear")
def linear(rw, node, lin):
    if lin.grouped:
        return _grouped(rw, node, lin)
    x, W = rw.new(lin.x), rw.new(lin.weight)
    b = rw.new(lin.bias) if lin.bias is not None else None
    wp, xp = rw.placement.get(W), rw.placement.get(x)
    xnd = lin.x.meta["val"].dim()
    out_nd = node.meta["val"].dim()
    if wp is not None and wp.dim == lin.w_out_dim:            # column-parallel
        if xp is not None:
            if xp.dim == xnd - 1:
                rw.fail(node, "a column-parallel linear got a feature-sharded input")
            x = rw.gathered(x, node)
        else:
            x = rw.f(x)
        return rw.emit(node.target, _args(node, lin, x, W, b), pl=moved(wp, out_nd - 1),
                       like=node)
    if wp is not None:                                        # row-parallel
        if xp is None or xp.dim != xnd - 1 or xp.outer != 1:
            rw.fail(node, "a row-parallel linear needs its input split on the last "
                          f"dimension; got {xp}")
        mm = rw.emit(aten.linear.default if lin.w_out_dim == 0 else
                     (aten.mm.default if node.target is not aten.matmul.default
                      else aten.matmul.default), (x, W), pl=None, like=node)
        if rw.sp and b is not None and rw.placement.get(b) is None and \
                tuple(lin.bias.meta["val"].shape) == tuple(node.meta["val"].shape[-1:]):
            # the bias joins the reduce-scatter: its gradient comes from the gathered
            # output gradient, so it needs no f (collectives.sp_scatter_bias)
            return rw.reduce_partial(mm, node, bias=b)
        out = rw.reduce_partial(mm, node)
        if b is not None:
            outp = rw.placement[out]
            if outp is not None:
                b = rw.localize(b, tuple(lin.bias.meta["val"].shape), outp, out_nd, node)
            out = rw.emit(aten.add.Tensor, (out, b), pl=outp, like=node)
        return out
    if xp is None:                                            # replicated, replicated input
        return rw.copy(node)
    if xp.dim == xnd - 1:
        rw.fail(node, "a replicated linear got an input split on its features")
    W = rw.f(W)
    b = rw.f(b) if b is not None else None
    return rw.emit(node.target, _args(node, lin, x, W, b), pl=moved(xp, xp.dim), like=node)

"""Linears (found by the analysis, whatever op form: linear, addmm, mm/matmul with W or
W.T, grouped_mm over 3-D expert weights). Which way a linear is split is read off its
weight parameter's placement; the op's own weight argument (W, or a transpose of it)
carries the same placement through the layout rules.

- column-parallel: W split on its outputs, x replicated (wrapped in f, or all-gathered
  under SP) -> output Shard(last).
- row-parallel: W split on its inputs, x Shard(last) -> partial sums -> g (all-reduce),
  or a reduce-scatter along the sequence under SP; a bias is added after the reduction
  (or joins the reduce-scatter).
- replicated weight on a sharded input (not on its features): local, W wrapped in f.
- a low-rank down-projection normalised next (MLA's q_a / kv_a): column-parallel with
  its output all-gathered (Megatron's gather_output); the gather's backward keeps this
  rank's slice of the (complete) output gradient.
- routed experts (grouped_mm): Megatron's expert tensor parallelism — every expert's
  gate/up split by columns, its down projection by rows, with the tokens (sorted by
  expert) whole on every rank; their partial sums are all-reduced (g), as they are in
  no sequence order a reduce-scatter could keep.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..sharding import PieceShard, Shard, TailShard, moved
from . import rule

aten = torch.ops.aten


def _positions(node):
    """(index of x, index of the weight argument, index of the bias or None) in node.args."""
    if node.target is aten.addmm.default:
        return 1, 2, 0
    return 0, 1, (2 if node.target is aten.linear.default and len(node.args) > 2 else None)


def _emit(rw, node, x, W=None, bias="keep", pl=None, target=None):
    """The linear op with x (and optionally W / the bias) replaced."""
    xi, wi, bi = _positions(node)
    args = [rw.new(a) if isinstance(a, fx.Node) else a for a in node.args]
    args[xi] = x
    if W is not None:
        args[wi] = W
    kwargs = {k: rw.new(v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
    if bias is None:
        if node.target is aten.addmm.default:
            return rw.emit(aten.mm.default, (args[1], args[2]), pl=pl, like=node)
        kwargs.pop("bias", None)
        if bi is not None:
            args = args[:bi]
    elif bias != "keep":
        if bi is not None:
            args[bi] = bias
        elif "bias" in kwargs:
            kwargs["bias"] = bias
    return rw.emit(target or node.target, args, kwargs, pl=pl, like=node)


@rule("linear")
def linear(rw, node, lin):
    xi, wi, _ = _positions(node)
    x, W = rw.new(lin.x), rw.new(node.args[wi])
    b = rw.new(lin.bias) if lin.bias is not None else None
    wp, xp = rw.placement.get(rw.new(lin.weight)), rw.placement.get(x)
    x_nd, out_nd = lin.x.meta["val"].dim(), node.meta["val"].dim()
    # under SP, tokens split along the sequence (Inkling's dense dispatch: every expert
    # sees every token) are gathered for a column-parallel expert weight, as for a linear
    seq_column = rw.sp and lin.x in rw.sequence_split and wp is not None and \
        wp.dim == lin.w_out_dim and xp is not None and xp.dim != x_nd - 1
    if lin.grouped and xp is not None and not seq_column and (
            wp is None or wp.dim != lin.w_in_dim or xp.dim != x_nd - 1):
        rw.fail(node, f"grouped matmul of tokens {xp} with expert weights {wp}: the tokens "
                      "sorted by expert must be whole (replicated), or split on their "
                      "features for a row-parallel expert weight")
    if isinstance(xp, TailShard):
        rw.fail(node, f"a linear of a tensor whose features are {xp}")
    if (isinstance(wp, TailShard) or (isinstance(wp, PieceShard) and any(wp.whole))) and \
            wp.dim == lin.w_out_dim:
        return _tail_column(rw, node, lin, x, xp, b, wp, out_nd)
    if wp is not None and wp.dim == lin.w_out_dim:            # column-parallel
        if xp is not None:
            if xp.dim == x_nd - 1:
                rw.fail(node, "a column-parallel linear got a feature-sharded input")
            x = rw.gathered(x, node)
        else:
            x = rw.f(x)
        out = _emit(rw, node, x, pl=moved(wp, out_nd - 1))
        if node in rw.analysis.gathered:   # whole on every rank again; the backward keeps
            out = rw.emit(torch.ops.ptdp.sp_gather_whole.default,      # this rank's slice
                          (out, out_nd - 1, 1, rw.group_name, rw.t, rw.rank), pl=None,
                          like=node)
            rw.collectives.append(("all_gather", out, f"output of {node.name}", node))
        return out
    if wp is not None:                                        # row-parallel
        if xp is None or xp.dim != x_nd - 1 or xp.outer != 1 or isinstance(xp, PieceShard):
            rw.fail(node, "a row-parallel linear needs its input split on the last "
                          f"dimension; got {xp}")
        mm = _emit(rw, node, x, bias=None)
        gate = gated_row(rw, node)
        if gate is not None:   # reduce-scattered over the features its split gate multiplies
            out = rw.emit(torch.ops.ptdp.sp_scatter.default,
                          (mm, out_nd - 1, 1, rw.group_name, rw.t), pl=Shard(out_nd - 1),
                          like=node)
            rw.collectives.append(("reduce_scatter", out, f"after {node.name} (features, "
                                   f"for the gate {gate.name})", node))
            if b is not None:
                b = rw.localize(b, tuple(lin.bias.meta["val"].shape), Shard(out_nd - 1),
                                out_nd, node)
                out = rw.emit(aten.add.Tensor, (out, b), pl=Shard(out_nd - 1), like=node)
            return out
        if lin.grouped or node in rw.analysis.inner_rows:
            out = rw.reduce_partial(mm, node, scatter=False)
            if b is not None:
                out = rw.emit(aten.add.Tensor, (out, b), pl=None, like=node)
            return out
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
    if xp.dim == x_nd - 1:
        rw.fail(node, "a replicated linear got an input split on its features")
    return _emit(rw, node, x, W=rw.f(W), bias=rw.f(b) if b is not None else "keep",
                 pl=moved(xp, xp.dim))



def gated_row(rw, node):
    """The gate linear whose split output multiplies this row-parallel ``node``'s output
    (RWKV's receptance), or None."""
    for g, (_, r) in rw.analysis.gates.items():
        if r is node and rw.placement_of(rw.analysis.linears[g].weight) is not None:
            return g
    return None


def gated_product(rw, node, new):
    """After the gate's product with the row's output: gathered whole over the features
    (the gather's backward keeps this rank's slice of the complete gradient), or under SP
    sent to the sequence split by one all-to-all."""
    for g, (mul, r) in rw.analysis.gates.items():
        if mul is node and gated_row(rw, r) is g:
            nd = node.meta["val"].dim()
            if rw.sp:
                seq = rw.block_seq_placement(tuple(node.meta["val"].shape), node)
                if seq.outer != 1 or seq.dim == nd - 1:
                    rw.fail(node, f"a gated output split on its features meets the sequence "
                                  f"split {seq}")
                out = rw.emit(torch.ops.ptdp.sp_features_to_seq.default,
                              (new, seq.dim, nd - 1, rw.group_name, rw.t), pl=seq, like=node)
                rw.scattered.add(out)   # split along the sequence, as a reduce-scatter's
                rw.collectives.append(("all_to_all", out, f"after {node.name} (features to "
                                       "sequence)", node))
                return out
            out = rw.emit(torch.ops.ptdp.sp_gather_whole.default,
                          (new, nd - 1, 1, rw.group_name, rw.t, rw.rank), pl=None, like=node)
            rw.collectives.append(("all_gather", out, f"after {node.name} (features)", node))
            return out
    return new


def _tail_column(rw, node, lin, x, xp, b, wp, out_nd):
    """A column-parallel linear whose weight rows are partly split, partly whole on every
    rank: TailShard (multi-query fused q/k/v: the query rows split, the shared key/value
    rows whole) or a PieceShard with whole pieces (Mamba-2's B and C). The split rows run
    as a column-parallel linear (input in f, or all-gathered under SP), the whole rows as
    a replicated linear of the whole input, whose gradient every rank computes in full
    (its consumers sum the gradient over tp), so the input takes it once: plain x, or
    under SP an all-gather whose backward keeps this rank's slice (sp_gather_whole). The
    outputs are joined along the features in the weight's row order."""
    if wp.dim != 0:
        rw.fail(node, f"a weight {wp} whose rows are not its first dimension")
    rows = lin.weight.meta["val"].shape[0]
    if isinstance(wp, TailShard):
        hl = (rows - wp.tail) // rw.t
        runs = [(0, hl, True), (hl, hl + wp.tail, False)]
    else:
        runs = []
        for i, (lo, _, n) in enumerate(wp.runs(rows, rw.t, rw.rank)):
            split = not wp.is_whole(i)
            if runs and runs[-1][2] == split:
                runs[-1] = (runs[-1][0], lo + n, split)
            else:
                runs.append((lo, lo + n, split))
    if xp is not None:
        if xp.dim == lin.x.meta["val"].dim() - 1:
            rw.fail(node, "a column-parallel linear got a feature-sharded input")
        x_head = rw.gathered(x, node)
        x_tail = rw.emit(torch.ops.ptdp.sp_gather_whole.default,
                         (x, xp.dim, xp.outer, rw.group_name, rw.t, rw.rank), pl=None,
                         like=node)
        rw.collectives.append(("all_gather", x_tail, f"whole input of {node.name}'s "
                               "replicated rows", node))
    else:
        x_head, x_tail = rw.f(x), x
    param, arg = rw.new(lin.weight), node.args[_positions(node)[1]]
    parts = []
    for lo, hi, split in runs:
        pl = Shard(0) if split else None
        W = rw.emit(aten.slice.Tensor, (param, 0, lo, hi), pl=pl, like=node)
        if arg is not lin.weight:    # the op reads a transpose of the parameter (x @ W.T)
            W = rw.emit(arg.target, (W, *arg.args[1:]), arg.kwargs,
                        pl=Shard(1) if pl is not None else None, like=arg)
        bias = rw.emit(aten.slice.Tensor, (b, 0, lo, hi), pl=None, like=node) \
            if b is not None else None
        parts.append(_emit(rw, node, x_head if split else x_tail, W=W,
                           bias=bias if b is not None else "keep", pl=None))
    return rw.emit(aten.cat.default, (parts, -1), pl=moved(wp, out_nd - 1), like=node)

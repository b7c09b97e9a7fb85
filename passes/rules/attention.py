"""The attention core: q, k and v split on the heads dimension make attention local per
rank. A mask (or an ALiBi bias) with a heads dimension is sliced to this rank's heads;
attention dropout draws this rank's own numbers."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ptdp_compiler.errors import ConfigError
from ptdp_compiler.placement import Shard

from ..sharding import moved
from . import Refine, rule
from .pieces import producing_weight
from .pointwise import rank_dropout

aten = torch.ops.aten


def heads_of(rw, a, node, heads=Shard(1)):
    """This rank's heads of q, k or v ([B, heads, T, D]): its own if sharded on the heads;
    a replicated one is sliced to them, or, with fewer key/value heads than ranks, to
    the one head the rank's query heads share (MQA / GQA, kv heads replicated)."""
    v, p = rw.new(a), rw.placement_of(a)
    if p is not None and ((rw.sp and (p.dim != 1 or p.outer != 1)) or
                          (type(p) is Shard and p.dim == 3)):
        # a projection kept whole ran on the sequence shard, or projections whose pieces
        # hold fewer heads than ranks left each head split (ZAYA's value heads,
        # [v_current | v_delayed] of one head each at tp=2): gather it, and take this
        # rank's heads below (the all-gather's backward reduce-scatters the partial
        # gradients of each rank's heads)
        v, p = rw.gathered(v, node, block_input=False), None
    if p is not None:
        if type(p) is not Shard or p.dim != 1:   # whole heads (in blocks: DiffLlama's halves)
            rw.fail(node, f"attention needs q, k, v split on the heads dimension; got {p}")
        return v
    shape = tuple(a.meta["val"].shape)
    if heads.outer > 1:   # the query heads in blocks: the same heads of a whole k / v
        if shape[1] % (heads.outer * rw.t):
            rw.fail(node, f"{shape[1]} key/value heads cannot follow query heads in "
                          f"{heads.outer} blocks at tp={rw.t}", ConfigError)
        return rw.localize(v, shape, heads, len(shape), node)
    heads, t = shape[1], rw.t
    if heads % t == 0:
        return rw.localize(v, shape, Shard(1), len(shape), node)
    if t % heads:
        rw.fail(node, f"tp={t} neither divides nor is a multiple of the {heads} key/value "
                      "heads", ConfigError)
    g = rw.rank // (t // heads)
    return rw.emit(aten.slice.Tensor, (rw.f(v), 1, g, g + 1), pl=None, like=node)


@rule(aten.scaled_dot_product_attention.default)
def sdpa(rw, node):
    q, k, v = node.args[:3]
    if q.meta["val"].shape[1] % rw.t:
        rw.fail(node, f"tp={rw.t} does not divide the {q.meta['val'].shape[1]} attention "
                      "heads", ConfigError)
    _same_head_blocks(rw, node, (q, k, v))
    qp = rw.placement_of(q)
    heads = qp if type(qp) is Shard and qp.dim == 1 else Shard(1)
    args = [heads_of(rw, a, node, heads) for a in (q, k, v)]
    rest, kwargs = list(node.args[3:]), dict(node.kwargs)
    mask = rest[0] if rest else kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        mv = rw.new(mask)
        if rw.placement.get(mv) is None:
            mv = rw.localize(mv, tuple(mask.meta["val"].shape), heads, 4, node)
        elif rw.placement.get(mv) != heads:
            rw.fail(node, "attention mask sharded on another dimension")
        if rest:
            rest[0] = mv
        else:
            kwargs["attn_mask"] = mv
    names = ("attn_mask", "dropout_p", "is_causal", "scale")
    opts = {k: (rest[i] if i < len(rest) else kwargs.get(k)) for i, k in enumerate(names)}
    opts["mask_is_bool"] = isinstance(mask, fx.Node) and mask.meta["val"].dtype == torch.bool
    if opts["dropout_p"]:
        return attention_with_rank_dropout(rw, node, *args, opts,
                                           kwargs.get("enable_gqa", False))
    return rw.emit(node.target, args + rest, kwargs, pl=heads, like=node)


def _same_head_blocks(rw, node, qkv):
    """q, k and v must lay their heads out alike: a projection whose heads were cut in
    blocks (DiffLlama's value halves) makes the others follow (``Refine``)."""
    pls = [rw.placement_of(a) for a in qkv]
    outers = {p.outer for p in pls if type(p) is Shard and p.dim == 1}
    if len(outers) > 1:
        for a, p in zip(qkv, pls):
            if type(p) is Shard and p.outer != max(outers):
                raise Refine(producing_weight(rw, a, node), max(outers))


def attention_with_rank_dropout(rw, node, q, k, v, opts, gqa):
    """Attention with dropout on head-sharded q, k, v, written out so the dropout of the
    attention probabilities draws this tp rank's own numbers (the fused op would draw
    the same numbers on every rank, for different heads)."""
    e, pl = rw.emit, Shard(1)
    qv, kv = node.args[0].meta["val"], node.args[1].meta["val"]
    L, S, E = qv.shape[-2], kv.shape[-2], qv.shape[-1]
    if gqa and qv.shape[1] != kv.shape[1]:
        rep = qv.shape[1] // kv.shape[1]
        k = e(aten.repeat_interleave.self_int, (k, rep, 1), pl=pl, like=node)
        v = e(aten.repeat_interleave.self_int, (v, rep, 1), pl=pl, like=node)
    scale = opts["scale"] if opts["scale"] is not None else 1.0 / math.sqrt(E)
    kt = e(aten.transpose.int, (k, -2, -1), pl=pl, like=node)
    sc = e(aten.mul.Scalar, (e(aten.matmul.default, (q, kt), pl=pl, like=node), scale),
           pl=pl, like=node)
    if opts["is_causal"]:
        ones = e(aten.ones.default, ([L, S],), {"dtype": torch.bool, "device": qv.device},
                 pl=None, rg=False)
        hide = e(aten.logical_not.default, (e(aten.tril.default, (ones,), pl=None, rg=False),),
                 pl=None, rg=False)
        sc = e(aten.masked_fill.Scalar, (sc, hide, float("-inf")), pl=pl, like=node)
    mask = opts["attn_mask"]
    if isinstance(mask, fx.Node):
        if opts["mask_is_bool"]:
            hide = e(aten.logical_not.default, (mask,), pl=rw.placement.get(mask), rg=False)
            sc = e(aten.masked_fill.Scalar, (sc, hide, float("-inf")), pl=pl, like=node)
        else:
            sc = e(aten.add.Tensor, (sc, mask), pl=pl, like=node)
    a = e(aten._softmax.default, (sc, -1, False), pl=pl, like=node)
    a = rank_dropout(rw, a, pl, float(opts["dropout_p"]), node)
    return e(aten.matmul.default, (a, v), pl=pl, like=node)


def _batch_placement(rw, node, a, b):
    """The shared placement of a batched matmul's operands on a batch (heads) dimension,
    in output coordinates; a replicated operand is sliced to it."""
    pa, pb = rw.placement_of(a), rw.placement_of(b)
    va, vb = a.meta["val"], b.meta["val"]
    m = node.meta["val"].dim()
    whole = {}
    if rw.sp and pa is not None and pb is not None:
        # a replicated projection that ran on the sequence shard (xLSTM's keys) meets
        # head-split values: gathered whole (the backward reduce-scatters each rank's
        # partial gradient), then sliced to this rank's heads like any replicated operand
        for x, p, v, other in ((a, pa, va, b), (b, pb, vb, a)):
            if p.dim >= v.dim() - 2 and x in rw.sequence_split and \
                    other not in rw.sequence_split:
                whole[x] = rw.gathered(rw.new(x), node, block_input=False)
        pa, pb = (None if a in whole else pa), (None if b in whole else pb)
    ca = pa.dim + m - va.dim() if pa is not None else None
    cb = pb.dim + m - vb.dim() if pb is not None else None
    for p, v in ((pa, va), (pb, vb)):
        if p is not None and p.dim >= v.dim() - 2:
            rw.fail(node, f"matmul of {pa} and {pb}: only a shared batch (heads) dimension "
                          "may be sharded")
    if pa is not None and pb is not None and moved(pa, ca) != moved(pb, cb):
        rw.fail(node, f"matmul of {pa} and {pb}: the operands' batch dimensions are sharded "
                      "differently")
    out = moved(pa, ca) if pa is not None else moved(pb, cb)
    args = []
    for x, p, v in ((a, pa, va), (b, pb, vb)):
        nx = whole.get(x, rw.new(x))
        if p is None:
            nx = _localize_batch(rw, nx, v, out, m, node)
        args.append(nx)
    return out, args


def _localize_batch(rw, nx, v, out, m, node):
    """A replicated operand of a batched matmul: its batch dims sliced to this rank's."""
    j = out.dim - (m - v.dim())
    if j < 0 or v.shape[j] == 1:
        return rw.f(nx)
    return rw.localize(nx, tuple(v.shape), out, m, node)


@rule(aten.matmul.default, aten.bmm.default)
def batched_matmul(rw, node):
    a, b = node.args[:2]
    pa, pb = rw.placement_of(a), rw.placement_of(b)
    m = node.meta["val"].dim()
    if a.meta["val"].dim() >= 2 and b.meta["val"].dim() >= 2 and (pa is None) != (pb is None):
        # rows of a split, b whole (Mamba's state [B, C, N] @ C_t [B, N, 1]), or columns
        # of b split, a whole: each rank's rows / columns of the product, b / a in f
        p, v, other, rows = (pa, a, b, True) if pa is not None else (pb, b, a, False)
        if p.dim == v.meta["val"].dim() - (2 if rows else 1) and \
                other.meta["val"].dim() <= m:
            out = moved(p, m - (2 if rows else 1))
            args = [rw.new(v), rw.f(rw.new(other))] if rows else \
                [rw.f(rw.new(other)), rw.new(v)]
            return rw.emit(node.target, args, pl=out, like=node)
    out, args = _batch_placement(rw, node, a, b)
    return rw.emit(node.target, args, pl=out, like=node)


@rule(aten.baddbmm.default)
def baddbmm(rw, node):
    """bias·beta + alpha·(b1 @ b2): an ALiBi bias has the heads (in the batch dimension),
    so it is sliced to this rank's heads like the operands."""
    bias, b1, b2 = node.args[:3]
    out, (n1, n2) = _batch_placement(rw, node, b1, b2)
    nb = rw.new(bias)
    pb = rw.placement.get(nb)
    if pb is None:
        nb = _localize_batch(rw, nb, bias.meta["val"], out, 3, node)
    elif pb != out:
        rw.fail(node, f"baddbmm bias sharded {pb}, operands {out}")
    return rw.emit(node.target, (nb, n1, n2, *node.args[3:]), node.kwargs, pl=out, like=node)

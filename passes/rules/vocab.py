"""Vocab-parallel embedding and cross-entropy (Megatron): the token embedding's rows and
the LM head's outputs are split over tp (padded with zero rows where t does not divide
the vocabulary). The embedding looks up only this rank's rows and sums over tp (once for the
token embedding and the position / type embeddings added to it); the
cross-entropy reduces max, sum-exp and the target logit across tp, so the logits of the
whole vocabulary never exist on one rank."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..analyze import LOSSES
from ..sharding import local_shape
from . import rule

aten = torch.ops.aten
ptdp_ops = torch.ops.ptdp


def _v(n):
    return n.meta["val"]


def _local_lookup(rw, node):
    """This rank's rows of a row-split table looked up, zero where an id is another
    rank's: partial sums of the full lookup."""
    W, ids = rw.env[node.args[0]], rw.env[node.args[1]]
    wp = rw.placement[W]
    if wp is None or wp.dim != 0 or wp.outer != 1 or rw.placement.get(ids) is not None:
        rw.fail(node, f"embedding with weight {wp} and ids {rw.placement.get(ids)}")
    vl = local_shape(_v(node.args[0]).shape, wp, rw.t)[0]   # padded rows included
    lo = rw.rank * vl
    rel = rw.emit(aten.sub.Tensor, (ids, lo), pl=None, rg=False)
    out_lo = rw.emit(aten.lt.Scalar, (rel, 0), pl=None, rg=False)
    out_hi = rw.emit(aten.ge.Scalar, (rel, vl), pl=None, rg=False)
    outside = rw.emit(aten.logical_or.default, (out_lo, out_hi), pl=None, rg=False)
    safe = rw.emit(aten.masked_fill.Scalar, (rel, outside, 0), pl=None, rg=False)
    rest = list(node.args[2:])
    if rest and isinstance(rest[0], int) and rest[0] >= 0:   # padding_idx: local row or none
        rest[0] = rest[0] - lo if lo <= rest[0] < lo + vl else -1
    emb = rw.emit(aten.embedding.default, (W, safe, *rest), pl=None, like=node)
    mask = rw.emit(aten.unsqueeze.default, (outside, -1), pl=None, rg=False)
    return rw.emit(aten.masked_fill.Scalar, (emb, mask, 0.0), pl=None, like=node)


@rule(aten.embedding.default)
def embedding(rw, node):
    # another table (positions, the user's other ids) is all-reduced whole even under
    # SP: its lookup may broadcast over the batch, and the ops it meets slice it
    return rw.reduce_partial(_local_lookup(rw, node), node,
                             scatter=node not in rw.analysis.side_embeddings)


@rule("embedding_sum")
def embedding_sum(rw, node):
    """A step of the embedding sum (``passes/embedding_sum.py``): lookups stay partial
    sums, other addends are added on tp rank 0 only (their gradient, complete on rank 0
    and zero elsewhere, is summed by f), and the chain's last node reduces once."""
    es = rw.analysis.embedding_sum
    if node.target is aten.embedding.default:
        part = _local_lookup(rw, node)
    else:
        args = []
        for a in node.args:
            if isinstance(a, fx.Node) and a in es.nodes:
                args.append(rw.env[a])
            elif node.target in (aten.add.Tensor, aten.add_.Tensor):   # counted once
                if isinstance(a, fx.Node):
                    a = rw.f(rw.env[a])
                    args.append(a if rw.rank == 0 else
                                rw.emit(aten.mul.Tensor, (a, 0.0), pl=None, like=node))
                else:
                    args.append(a if rw.rank == 0 else 0)
            else:
                args.append(rw.env[a] if isinstance(a, fx.Node) else a)
        part = rw.emit(node.target, args, node.kwargs, pl=None, like=node)
    return rw.reduce_partial(part, node) if node is es.root else part


@rule(*LOSSES)
def cross_entropy(rw, node):
    logits, target = node.args[0], node.args[1]
    lg, tg = rw.env[logits], rw.env[target]
    lp = rw.placement[lg]
    if _v(logits).dim() != 2 or lp is None or lp.dim != 1 or lp.outer != 1 or \
            rw.placement.get(tg) is not None:
        rw.fail(node, f"vocab-parallel cross-entropy needs [tokens, vocab] logits split on "
                    f"the vocabulary; got {lp} of shape {list(_v(logits).shape)}")
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
    ignore = node.args[4] if len(node.args) > 4 else node.kwargs.get("ignore_index", -100)
    smoothing = node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing",
                                                                         0.0)
    if weight is not None or smoothing:
        rw.fail(node, "vocab-parallel cross-entropy supports no class weights or smoothing")
    V = _v(logits).shape[1]
    vl = local_shape(_v(logits).shape, lp, rw.t)[1]   # padded columns included
    lo = rw.rank * vl
    e = rw.emit
    if lo + vl > V:
        # vocabulary padding: this rank's columns past V are no tokens; -inf logits
        # never win the max, add nothing to the sum of exponentials, and pass no
        # gradient back to the zero rows that produced them
        cols = e(aten.arange.start, (lo, lo + vl), {"device": _v(logits).device},
                 pl=None, rg=False)
        pad = e(aten.ge.Scalar, (cols, V), pl=None, rg=False)
        lg = e(aten.masked_fill.Scalar, (lg, pad, float("-inf")), pl=None, like=node)
    det = e(aten.detach.default, (lg,), pl=None, rg=False)
    mx = e(aten.amax.default, (det, [1], True), pl=None, rg=False)
    mx = e(ptdp_ops.all_reduce_max.default, (mx, rw.group_name, rw.t), pl=None, rg=False)
    rw.collectives.append(("all_reduce", mx, "vocab-parallel cross-entropy: max", node))
    z = e(aten.sub.Tensor, (lg, mx), pl=None, like=node)
    se = e(aten.sum.dim_IntList, (e(aten.exp.default, (z,), pl=None), [1]), pl=None)
    se = e(ptdp_ops.tp_g.default, (se, rw.group_name, rw.t, "loss"), pl=None)
    rw.collectives.append(("all_reduce", se, "vocab-parallel cross-entropy: sum-exp",
                             node))
    rel = e(aten.sub.Tensor, (tg, lo), pl=None, rg=False)
    o1 = e(aten.lt.Scalar, (rel, 0), pl=None, rg=False)
    o2 = e(aten.ge.Scalar, (rel, vl), pl=None, rg=False)
    outside = e(aten.logical_or.default, (o1, o2), pl=None, rg=False)
    safe = e(aten.masked_fill.Scalar, (rel, outside, 0), pl=None, rg=False)
    idx = e(aten.unsqueeze.default, (safe, 1), pl=None, rg=False)
    picked = e(aten.squeeze.dim, (e(aten.gather.default, (z, 1, idx), pl=None), 1), pl=None)
    picked = e(aten.masked_fill.Scalar, (picked, outside, 0.0), pl=None)
    picked = e(ptdp_ops.tp_g.default, (picked, rw.group_name, rw.t, "loss"), pl=None)
    rw.collectives.append(("all_reduce", picked,
                             "vocab-parallel cross-entropy: target logit", node))
    per = e(aten.sub.Tensor, (e(aten.log.default, (se,), pl=None), picked), pl=None)
    valid = e(aten.ne.Scalar, (tg, ignore), pl=None, rg=False)
    invalid = e(aten.logical_not.default, (valid,), pl=None, rg=False)
    per = e(aten.masked_fill.Scalar, (per, invalid, 0.0), pl=None)
    if reduction == 0:
        return per
    total = e(aten.sum.default, (per,), pl=None)
    if reduction == 2:
        return total
    cnt = e(aten.sum.dim_IntList, (valid, [0]), {"dtype": _v(logits).dtype}, pl=None,
            rg=False)
    return e(aten.div.Tensor, (total, cnt), pl=None, like=node)

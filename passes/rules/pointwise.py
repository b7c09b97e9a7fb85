"""Element-wise ops: every sharded operand must agree (after broadcasting); a replicated
operand that has the sharded dimension is sliced to this rank's part. Dropout of a
sharded tensor draws this rank's own mask."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..sharding import moved
from . import rule

aten = torch.ops.aten
ptdp_ops = torch.ops.ptdp

PASSTHROUGH = {aten.clone.default, aten.contiguous.default, aten.alias.default,
               aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
               aten.to.device, aten.lift_fresh_copy.default, aten.detach_.default,
               aten.type_as.default}


@rule(*PASSTHROUGH)
def passthrough(rw, node):
    xp = rw.placement_of(node.args[0])
    if xp is None:   # a sharded second operand (type_as): element-wise
        return pointwise(rw, node)
    return rw.copy(node, xp)


# element-wise, though ATen does not tag them pointwise
UNTAGGED_POINTWISE = {aten.log_sigmoid.default, aten.complex.default, aten.polar.default,
                      aten.masked_fill_.Scalar, aten.masked_fill_.Tensor}


@rule("pointwise", aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
      aten.where.Scalar, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
      *UNTAGGED_POINTWISE)
def pointwise(rw, node):
    out = node.meta["val"]
    m = out.dim()
    placed = {a: moved(p, p.dim + m - a.meta["val"].dim()) for a in node.all_input_nodes
              if (p := rw.placement_of(a)) is not None}
    gather = set()
    if rw.sp and len(set(placed.values())) > 1:
        # SP: a sequence shard (a replicated projection of the split residual stream, as
        # Gemma 4's per-layer inputs) meets a feature shard: all-gather the sequence
        # (its backward reduce-scatters the partial feature gradients back)
        gather = {a for a in placed if a in rw.sequence_split}
        if len(gather) == len(placed):
            gather = set()
    shard = None
    for a, cand in placed.items():
        if a in gather:
            continue
        if shard is not None and cand != shard:
            rw.fail(node, f"operands sharded differently ({shard} vs {cand})")
        shard = cand

    def local(a):
        if not isinstance(a, fx.Node):
            return a
        v = rw.new(a)
        if a in gather:
            v = rw.gathered(v, node, block_input=False)
        va = a.meta.get("val")
        if rw.placement.get(v) is not None or not isinstance(va, torch.Tensor):
            return v
        return rw.localize(v, tuple(va.shape), shard, m, node)
    args = [local(a) for a in node.args]
    kwargs = {k: local(v) for k, v in node.kwargs.items()}
    return rw.emit(node.target, args, kwargs, pl=shard, like=node)


@rule(aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
      aten.full_like.default)
def like(rw, node):
    """A deterministic fresh tensor shaped like a sharded one (RWKV's zero state): made at
    the local shape, sharded alike. (rand_like has no rule: its numbers would depend on
    the layout.)"""
    return rw.copy(node, rw.placement_of(node.args[0]))


@rule(aten.dropout.default)
def dropout(rw, node):
    """Dropout of a tp-sharded tensor: a keep-mask from this tp rank's own stream
    (runtime/rng.py), scaled as aten.dropout scales."""
    xp = rw.placement_of(node.args[0])
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    if not train or p == 0 or p >= 1:     # deterministic: no random numbers drawn
        return rw.copy(node, xp)
    return rank_dropout(rw, rw.new(node.args[0]), xp, float(p), node)


def rank_dropout(rw, x, xp, p: float, node):
    rw.dropouts["sharded"] += 1
    det = rw.emit(aten.detach.default, (x,), pl=xp, rg=False)
    keep = rw.emit(ptdp_ops.tp_rank_dropout_mask.default, (det, float(p), rw.rank),
                   pl=xp, rg=False, like=node)
    y = rw.emit(aten.mul.Tensor, (x, keep), pl=xp, like=node)
    return rw.emit(aten.mul.Scalar, (y, 1.0 / (1.0 - p)), pl=xp, like=node)

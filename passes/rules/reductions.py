"""Reductions, softmax and norms. Over dimensions that are not sharded they are local
(a per-head q/k norm over head_dim is no barrier). A sum or mean over the sharded
dimension is the local one summed over tp (g), a replicated statistic every rank uses on
its own shard, as a norm over a sharded width (OLMo-2's q/k norm) does."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..sharding import PaddedShard, moved
from . import rule

aten = torch.ops.aten

SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
           aten._log_softmax.default, aten._safe_softmax.default}


def _dims(node, nd):
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or dims == []:
        return list(range(nd))
    return [dims % nd] if isinstance(dims, int) else [d % nd for d in dims]


def _keepdim(node, i=2):
    return node.args[i] if len(node.args) > i else node.kwargs.get("keepdim", False)


def _kept(xp, dims, keep):
    return xp if keep else moved(xp, xp.dim - sum(1 for x in dims if x < xp.dim))


@rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
      aten.logsumexp.default, aten.var.correction, aten.std.correction, aten.var.dim,
      aten.std.dim, aten.any.dim, aten.all.dim, aten.prod.dim_int)
def reduction(rw, node):
    x = node.args[0]
    xp = rw.placement_of(x)
    nd = x.meta["val"].dim()
    dims = _dims(node, nd)
    # var.dim / std.dim take ``unbiased`` before ``keepdim``
    keep = _keepdim(node, 3 if node.target in (aten.var.dim, aten.std.dim) else 2)
    if xp.dim not in dims:
        return rw.copy(node, _kept(xp, dims, keep))
    if node.target not in (aten.mean.dim, aten.sum.dim_IntList) or \
            isinstance(xp, PaddedShard):
        rw.fail(node, f"{node.target} over the sharded dimension {xp}")
    local = rw.copy(node, None)
    total = rw.all_reduce(local, node, f"{node.name}: sum over the sharded dimension")
    if node.target is aten.mean.dim:
        total = rw.emit(aten.div.Tensor, (total, rw.t), pl=None, like=node)
    return total


@rule(aten.linalg_vector_norm.default)
def vector_norm(rw, node):
    """‖x‖ over dimensions that are not sharded: local (a per-head L2 norm)."""
    x = node.args[0]
    xp = rw.placement_of(x)
    nd = x.meta["val"].dim()
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    dims = list(range(nd)) if dims is None else [dims] if isinstance(dims, int) else dims
    dims = [d % nd for d in dims]
    keep = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    if xp.dim in dims:
        rw.fail(node, f"a vector norm over the sharded dimension {xp}")
    return rw.copy(node, _kept(xp, dims, keep))


@rule(aten.max.dim, aten.min.dim, aten.sort.default, aten.topk.default, aten.argmax.default,
      aten.argmin.default, aten.cumsum.default)
def along_dim(rw, node):
    """Ops along one dimension (values and indices): local when it is not the sharded one."""
    x = node.args[0]
    xp = rw.placement_of(x)
    nd = x.meta["val"].dim()
    if node.target is aten.topk.default:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if dim is None or dim % nd == xp.dim:
        rw.fail(node, f"{node.target} along the sharded dimension {xp}")
    dim %= nd
    if node.target in (aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default):
        out = _kept(xp, [dim], _keepdim(node))
    else:
        out = xp
    n = rw.copy(node, None)
    vals = node.meta["val"]
    rw.placement[n] = [out] * len(vals) if isinstance(vals, (list, tuple)) else out
    return n


@rule(*SOFTMAX)
def softmax(rw, node):
    x = node.args[0]
    xp = rw.placement_of(x)
    if node.args[1] % x.meta["val"].dim() == xp.dim:
        rw.fail(node, "softmax over the sharded dimension")
    return rw.copy(node, xp)


def _norm(rw, node, n_norm_dims, weight_args):
    """layer_norm / rms_norm over the last ``n_norm_dims`` dims, which must be whole."""
    x = node.args[0]
    xp = rw.placement_of(x)
    nd = x.meta["val"].dim()
    if xp.dim >= nd - n_norm_dims:
        rw.fail(node, f"{node.target} over the sharded dimension {xp}")
    args = list(node.args)
    for i in weight_args:
        if i < len(args) and isinstance(args[i], fx.Node):
            args[i] = rw.f(rw.new(args[i]))
    args[0] = rw.new(x)
    kwargs = {k: rw.f(rw.new(v)) if isinstance(v, fx.Node) else v
              for k, v in node.kwargs.items()}
    return rw.emit(node.target, args, kwargs, pl=xp, like=node)


@rule(aten.layer_norm.default)
def layer_norm(rw, node):
    return _norm(rw, node, len(node.args[1]), (2, 3))


@rule(aten.rms_norm.default)
def rms_norm(rw, node):
    return _norm(rw, node, len(node.args[1]), (2,))

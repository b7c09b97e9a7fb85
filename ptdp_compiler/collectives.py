"""Megatron's tensor-parallel operators as autograd-aware custom ops on functional collectives.

- ``f``  (``ptdp::tp_f``):  identity forward, all-reduce backward — placed where a
  replicated tensor enters a tensor-parallel region (the column-parallel input).
- ``g``  (``ptdp::tp_g``):  all-reduce forward, identity backward — after a
  row-parallel matmul (its partial sums become the full result).
- ``sp_gather``  (``ptdp::sp_gather``): all-gather forward along ``dim``,
  reduce-scatter backward — sequence parallelism, before a column-parallel linear.
- ``sp_scatter`` (``ptdp::sp_scatter``): reduce-scatter forward, all-gather backward —
  sequence parallelism, after a row-parallel linear.
- ``sp_scatter_bias``: the same with a row-parallel bias added to the shard; the bias
  gradient is the sum of the all-gathered output gradient (no all-reduce for it).
- ``tp_f_bucket`` (``ptdp::tp_f_bucket``): f for a list of parameters at once — identity
  forward, ONE all-reduce of their flattened gradients backward (sequence parallelism's
  norm weights and biases, which see only their sequence shard's gradient).

Sharding along a dimension may be "strided": ``outer`` > 1 means the dimension is
laid out as ``(outer, t, inner)`` with the rank index in the middle (e.g. a sequence
dimension flattened with the batch, ``[B*T]``), so each op views the tensor as
``[..., outer, n, ...]`` and gathers / scatters the ``n`` part.

Each op names its process group by ``group_name`` (a string, so it lives in an FX
graph) and takes the group size ``t`` for shape inference. Their bodies call the
functional collectives (``torch.ops._c10d_functional``), which Dynamo, AOTAutograd
and Inductor understand; as custom ops they stay single, countable nodes in the
forward and backward graphs AOTAutograd produces.

All-gather and reduce-scatter use the functional collectives' ``*_coalesced`` forms with
one tensor: the same single collective on NCCL and gloo, and the forms a Python
``ProcessGroup`` wrapper can intercept (``benchmarks/tp_comm.py`` measures the bytes sent
by wrapping the tp process group; these ops count nothing themselves).
"""
from __future__ import annotations

import math

import torch

_c10d = torch.ops._c10d_functional


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def _split_outer(x: torch.Tensor, dim: int, outer: int) -> tuple[torch.Tensor, int]:
    """View ``x`` so that dimension ``dim`` of size ``outer·n`` becomes ``(outer, n)``;
    returns the view and the index of the ``n`` dimension."""
    dim = dim % x.dim()
    if outer == 1:
        return x, dim
    shape = list(x.shape)
    return x.reshape(shape[:dim] + [outer, shape[dim] // outer] + shape[dim + 1:]), dim + 1


def _merge_outer(x: torch.Tensor, dim: int, outer: int) -> torch.Tensor:
    if outer == 1:
        return x
    shape = list(x.shape)
    return x.reshape(shape[:dim] + [shape[dim] * shape[dim + 1]] + shape[dim + 2:])


def _all_gather(x: torch.Tensor, dim: int, outer: int, t: int, group_name: str) -> torch.Tensor:
    d0 = dim % x.dim()
    y, d = _split_outer(x, d0, outer)
    y = y.movedim(d, 0).contiguous()
    out = _c10d.wait_tensor(_c10d.all_gather_into_tensor_coalesced([y], t, group_name)[0])
    out = out.movedim(0, d).contiguous()
    return _merge_outer(out, d0, outer)


def _reduce_scatter(x: torch.Tensor, dim: int, outer: int, t: int, group_name: str) -> torch.Tensor:
    d0 = dim % x.dim()
    y, d = _split_outer(x, d0, outer)
    y = y.movedim(d, 0).contiguous()
    out = _c10d.wait_tensor(
        _c10d.reduce_scatter_tensor_coalesced([y], "sum", t, group_name)[0])
    out = out.movedim(0, d).contiguous()
    return _merge_outer(out, d0, outer)


def _scaled_shape(x: torch.Tensor, dim: int, factor: float) -> list:
    shape = list(x.shape)
    d = dim % x.dim()
    shape[d] = int(shape[d] * factor)
    return shape


# ---- f: identity / all-reduce ---------------------------------------------------------------
@torch.library.custom_op("ptdp::tp_f", mutates_args=())
def tp_f(x: torch.Tensor, group_name: str, t: int, tag: str) -> torch.Tensor:
    return x.clone()


@tp_f.register_fake
def _(x, group_name, t, tag):
    return torch.empty_like(x)


# ---- g: all-reduce / identity ---------------------------------------------------------------
@torch.library.custom_op("ptdp::tp_g", mutates_args=())
def tp_g(x: torch.Tensor, group_name: str, t: int, tag: str) -> torch.Tensor:
    return _all_reduce(x, group_name)


@tp_g.register_fake
def _(x, group_name, t, tag):
    return torch.empty_like(x)


def _f_backward(ctx, grad):
    return tp_g(grad, ctx.group_name, ctx.t, ctx.tag), None, None, None


def _g_backward(ctx, grad):
    return tp_f(grad, ctx.group_name, ctx.t, ctx.tag), None, None, None


def _setup_ft(ctx, inputs, output):
    ctx.group_name, ctx.t, ctx.tag = inputs[1], inputs[2], inputs[3]


tp_f.register_autograd(_f_backward, setup_context=_setup_ft)
tp_g.register_autograd(_g_backward, setup_context=_setup_ft)


# ---- f over a bucket of parameters: one all-reduce of all their gradients ------------------
@torch.library.custom_op("ptdp::tp_f_bucket", mutates_args=())
def tp_f_bucket(xs: list[torch.Tensor], group_name: str, t: int) -> list[torch.Tensor]:
    return [x.clone() for x in xs]


@tp_f_bucket.register_fake
def _(xs, group_name, t):
    return [torch.empty_like(x) for x in xs]


def _bucket_setup(ctx, inputs, output):
    ctx.group_name, ctx.t = inputs[1], inputs[2]
    ctx.shapes = [x.shape for x in inputs[0]]
    ctx.like = inputs[0][0]


def _bucket_backward(ctx, grads):
    flat = torch.cat([(g if g is not None else ctx.like.new_zeros(s)).reshape(-1)
                      for g, s in zip(grads, ctx.shapes)])
    flat = tp_g(flat, ctx.group_name, ctx.t, "param")
    sizes = [math.prod(s) for s in ctx.shapes]
    return [piece.view(s) for piece, s in zip(flat.split(sizes), ctx.shapes)], None, None


tp_f_bucket.register_autograd(_bucket_backward, setup_context=_bucket_setup)


# ---- SP pair: all-gather / reduce-scatter ---------------------------------------------------
@torch.library.custom_op("ptdp::sp_gather", mutates_args=())
def sp_gather(x: torch.Tensor, dim: int, outer: int, group_name: str, t: int) -> torch.Tensor:
    return _all_gather(x, dim, outer, t, group_name)


@sp_gather.register_fake
def _(x, dim, outer, group_name, t):
    return x.new_empty(_scaled_shape(x, dim, t))


@torch.library.custom_op("ptdp::sp_scatter", mutates_args=())
def sp_scatter(x: torch.Tensor, dim: int, outer: int, group_name: str, t: int) -> torch.Tensor:
    return _reduce_scatter(x, dim, outer, t, group_name)


@sp_scatter.register_fake
def _(x, dim, outer, group_name, t):
    return x.new_empty(_scaled_shape(x, dim, 1.0 / t))


def _setup_sp(ctx, inputs, output):
    ctx.dim, ctx.outer, ctx.group_name, ctx.t = inputs[1], inputs[2], inputs[3], inputs[4]


def _gather_backward(ctx, grad):
    return sp_scatter(grad, ctx.dim, ctx.outer, ctx.group_name, ctx.t), None, None, None, None


def _scatter_backward(ctx, grad):
    return sp_gather(grad, ctx.dim, ctx.outer, ctx.group_name, ctx.t), None, None, None, None


sp_gather.register_autograd(_gather_backward, setup_context=_setup_sp)
sp_scatter.register_autograd(_scatter_backward, setup_context=_setup_sp)


# SP values that a replicated computation needs whole (a mixture-of-experts block sorts and
# gathers tokens across the sequence): all-gather forward. Every rank then computes the
# same complete gradient of the whole value, so the backward keeps this rank's slice of
# it and sends nothing (sp_gather's reduce-scatter would sum t equal copies).
@torch.library.custom_op("ptdp::sp_gather_whole", mutates_args=())
def sp_gather_whole(x: torch.Tensor, dim: int, outer: int, group_name: str, t: int,
                    rank: int) -> torch.Tensor:
    return _all_gather(x, dim, outer, t, group_name)


@sp_gather_whole.register_fake
def _(x, dim, outer, group_name, t, rank):
    return x.new_empty(_scaled_shape(x, dim, t))


def _whole_setup(ctx, inputs, output):
    ctx.dim, ctx.outer, ctx.t, ctx.rank = inputs[1], inputs[2], inputs[4], inputs[5]


def _whole_backward(ctx, grad):
    dim = ctx.dim % grad.dim()
    shape = list(grad.shape)
    n = shape[dim] // (ctx.outer * ctx.t)
    mine = grad.reshape(shape[:dim] + [ctx.outer, ctx.t, n] + shape[dim + 1:]).select(
        dim + 1, ctx.rank)
    return mine.reshape(shape[:dim] + [ctx.outer * n] + shape[dim + 1:]), None, None, None, \
        None, None


sp_gather_whole.register_autograd(_whole_backward, setup_context=_whole_setup)


# A row-parallel linear's bias under SP. Added after the reduce-scatter, the bias acts on
# the sequence shard and its gradient (the shard's sum) would need an all-reduce over tp,
# as Megatron does. But the backward of the reduce-scatter all-gathers the output gradient
# anyway: its sum over every row is the full bias gradient, the same on each rank, so the
# fused op returns it directly and the bias needs no f (no bytes for it in the bucket).
@torch.library.custom_op("ptdp::sp_scatter_bias", mutates_args=())
def sp_scatter_bias(x: torch.Tensor, bias: torch.Tensor, dim: int, outer: int,
                    group_name: str, t: int) -> torch.Tensor:
    return _reduce_scatter(x, dim, outer, t, group_name) + bias


@sp_scatter_bias.register_fake
def _(x, bias, dim, outer, group_name, t):
    return x.new_empty(_scaled_shape(x, dim, 1.0 / t), dtype=torch.promote_types(x.dtype,
                                                                                 bias.dtype))


def _setup_sp_bias(ctx, inputs, output):
    ctx.dim, ctx.outer, ctx.group_name, ctx.t = inputs[2], inputs[3], inputs[4], inputs[5]
    ctx.bias_shape, ctx.bias_dtype = inputs[1].shape, inputs[1].dtype


def _scatter_bias_backward(ctx, grad):
    full = sp_gather(grad, ctx.dim, ctx.outer, ctx.group_name, ctx.t)
    return (full, full.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype),
            None, None, None, None)


sp_scatter_bias.register_autograd(_scatter_bias_backward, setup_context=_setup_sp_bias)


# A value split on its features with the whole sequence (RWKV's gated FFN output under SP)
# back to the sequence split the residual stream keeps: one all-to-all, each rank sending
# its features of every other rank's sequence chunk; the backward is the inverse
# all-to-all. 1/t of the bytes of all-gathering the features and slicing the sequence.
def _all_to_all(x: torch.Tensor, split: int, join: int, t: int, group_name: str):
    parts = torch.stack(x.chunk(t, dim=split)).contiguous()
    got = _c10d.wait_tensor(_c10d.all_to_all_single(parts, [parts.shape[0] // t] * t,
                                                     [parts.shape[0] // t] * t, group_name))
    return torch.cat(got.unbind(0), dim=join)


@torch.library.custom_op("ptdp::sp_features_to_seq", mutates_args=())
def sp_features_to_seq(x: torch.Tensor, seq_dim: int, feat_dim: int, group_name: str,
                       t: int) -> torch.Tensor:
    return _all_to_all(x, seq_dim, feat_dim, t, group_name)


@sp_features_to_seq.register_fake
def _(x, seq_dim, feat_dim, group_name, t):
    shape = list(x.shape)
    shape[seq_dim] //= t
    shape[feat_dim] *= t
    return x.new_empty(shape)


def _a2a_setup(ctx, inputs, output):
    ctx.seq_dim, ctx.feat_dim, ctx.group_name, ctx.t = inputs[1:5]


def _a2a_backward(ctx, grad):
    return _all_to_all(grad, ctx.feat_dim, ctx.seq_dim, ctx.t, ctx.group_name), None, None, \
        None, None


sp_features_to_seq.register_autograd(_a2a_backward, setup_context=_a2a_setup)


# ---- vocab-parallel cross-entropy -------------------------------------------------------------
@torch.library.custom_op("ptdp::all_reduce_max", mutates_args=())
def all_reduce_max(x: torch.Tensor, group_name: str, t: int) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "max", group_name))


@all_reduce_max.register_fake
def _(x, group_name, t):
    return torch.empty_like(x)


# The ops every pass and test counts as tensor-parallel collectives.
TP_COLLECTIVES = {
    torch.ops.ptdp.tp_f.default: "f (identity fwd / all-reduce bwd)",
    torch.ops.ptdp.tp_g.default: "g (all-reduce fwd / identity bwd)",
    torch.ops.ptdp.tp_f_bucket.default: "f over a parameter bucket (one all-reduce bwd)",
    torch.ops.ptdp.sp_gather.default: "all-gather (fwd) / reduce-scatter (bwd)",
    torch.ops.ptdp.sp_gather_whole.default: "all-gather (fwd) / own slice, no send (bwd)",
    torch.ops.ptdp.sp_scatter.default: "reduce-scatter (fwd) / all-gather (bwd)",
    torch.ops.ptdp.sp_scatter_bias.default: "reduce-scatter + bias (fwd) / all-gather, the "
                                            "bias gradient from the gathered rows (bwd)",
    torch.ops.ptdp.all_reduce_max.default: "all-reduce max (no grad)",
    torch.ops.ptdp.sp_features_to_seq.default: "all-to-all, features to sequence split (fwd) "
                                               "/ the inverse all-to-all (bwd)",
}

# What each op sends in the FORWARD pass: kind of collective, or None
FORWARD_KIND = {
    torch.ops.ptdp.tp_f.default: None,
    torch.ops.ptdp.tp_g.default: "all_reduce",
    torch.ops.ptdp.tp_f_bucket.default: None,
    torch.ops.ptdp.sp_gather.default: "all_gather",
    torch.ops.ptdp.sp_gather_whole.default: "all_gather",
    torch.ops.ptdp.sp_scatter.default: "reduce_scatter",
    torch.ops.ptdp.sp_scatter_bias.default: "reduce_scatter",
    torch.ops.ptdp.all_reduce_max.default: "all_reduce",
    torch.ops.ptdp.sp_features_to_seq.default: "all_to_all",
}

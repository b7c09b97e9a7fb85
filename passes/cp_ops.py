"""Context parallelism's collective and its layout: which sequence positions a cp rank
holds, and the all-gather of a sequence-sharded value back into natural order.

Load balance (causal attention): the sequence of ``T`` tokens is cut into ``2·cp`` chunks
of ``c = T/(2·cp)`` tokens; cp rank ``r`` holds chunks ``r`` and ``2·cp-1-r``, in that order
(Megatron-Core / torchtitan). Under a causal mask rank r's queries then see
``(r + ½) c + (2cp - r - ½) c`` keys in total, the same on every rank.

``ptdp::cp_gather(x, dim, outer, group, cp)``: ``x``'s dimension ``dim`` is laid out as
``(outer, 2·h)`` — ``outer`` blocks (the batch, when the sequence is flattened with it),
each holding this rank's two chunks of ``h`` elements (a chunk's tokens times whatever
is flattened after the sequence). The all-gather returns the whole dimension in natural
sequence order; its backward takes the gradient in natural order, reorders it rank-major
and reduce-scatters it, so every rank gets the sum over all ranks' queries of the
gradient of its own keys / values: exact, with no second collective.
Both directions are one functional collective (``*_coalesced`` with one tensor, as in
``ptdp_compiler/collectives.py``), so Dynamo, AOTAutograd and Inductor trace them.
"""
from __future__ import annotations

import torch

_c10d = torch.ops._c10d_functional


def local_positions(T: int, cp: int, r: int) -> list:
    """Natural positions of the tokens cp rank ``r`` holds, in its local order."""
    c = T // (2 * cp)
    return list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))


def _blocks(x: torch.Tensor, dim: int, outer: int):
    """``x`` with ``dim`` moved first and viewed as [outer, 2, h, rest]."""
    y = x.movedim(dim, 0)
    n = y.shape[0]
    return y.reshape(outer, 2, n // (2 * outer), *y.shape[1:])


def _to_natural(g: torch.Tensor, dim: int, outer: int, cp: int) -> torch.Tensor:
    """Rank-major gathered [cp·L, rest] (dim first) -> natural order, dim put back."""
    L = g.shape[0] // cp
    rest = g.shape[1:]
    v = g.reshape(cp, outer, 2, L // (2 * outer), *rest)
    first = v.select(2, 0)                        # chunks 0 .. cp-1, one per rank
    second = v.select(2, 1).flip(0)               # chunks cp .. 2cp-1: rank cp-1 first
    nat = torch.cat([first, second], 0)           # [2cp, outer, h, rest]
    nat = nat.movedim(0, 1).reshape(outer * 2 * cp * (L // (2 * outer)), *rest)
    return nat.movedim(0, dim).contiguous()


def _to_rank_major(g: torch.Tensor, dim: int, outer: int, cp: int) -> torch.Tensor:
    """Inverse of ``_to_natural``: [.., natural dim, ..] -> [cp·L, rest] rank-major."""
    y = g.movedim(dim, 0)
    n, rest = y.shape[0], y.shape[1:]
    h = n // (outer * 2 * cp)
    v = y.reshape(outer, 2 * cp, h, *rest).movedim(1, 0)      # [2cp, outer, h, rest]
    first, second = v[:cp], v[cp:].flip(0)
    return torch.stack([first, second], 2).reshape(n, *rest).contiguous()


@torch.library.custom_op("ptdp::cp_gather", mutates_args=())
def cp_gather(x: torch.Tensor, dim: int, outer: int, group_name: str, cp: int) -> torch.Tensor:
    dim = dim % x.dim()
    y = x.movedim(dim, 0).contiguous()
    g = _c10d.wait_tensor(_c10d.all_gather_into_tensor_coalesced([y], cp, group_name)[0])
    return _to_natural(g, dim, outer, cp)


@cp_gather.register_fake
def _(x, dim, outer, group_name, cp):
    shape = list(x.shape)
    shape[dim % x.dim()] *= cp
    return x.new_empty(shape)


@torch.library.custom_op("ptdp::cp_reduce_scatter", mutates_args=())
def cp_reduce_scatter(g: torch.Tensor, dim: int, outer: int, group_name: str,
                      cp: int) -> torch.Tensor:
    dim = dim % g.dim()
    y = _to_rank_major(g, dim, outer, cp)
    out = _c10d.wait_tensor(_c10d.reduce_scatter_tensor_coalesced([y], "sum", cp, group_name)[0])
    return out.movedim(0, dim).contiguous()


@cp_reduce_scatter.register_fake
def _(g, dim, outer, group_name, cp):
    shape = list(g.shape)
    shape[dim % g.dim()] //= cp
    return g.new_empty(shape)


def _setup(ctx, inputs, output):
    ctx.args = inputs[1:]


def _gather_backward(ctx, grad):
    return (cp_reduce_scatter(grad, *ctx.args),) + (None,) * 4


def _scatter_backward(ctx, grad):
    return (cp_gather(grad, *ctx.args),) + (None,) * 4


cp_gather.register_autograd(_gather_backward, setup_context=_setup)
cp_reduce_scatter.register_autograd(_scatter_backward, setup_context=_setup)

CP_COLLECTIVES = {torch.ops.ptdp.cp_gather.default: "all-gather K/V over cp (fwd) / "
                                                    "reduce-scatter dK/dV (bwd)"}

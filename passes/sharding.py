"""The placement lattice and the shape rules the tensor-parallel propagation relies on.

A tensor's placement over the tp axis is ``None`` (Replicate: every rank holds all of
it) or ``Shard(dim, outer)``: dimension ``dim`` of full size ``N`` is laid out as
``(outer, t, N/(outer·t))`` and rank r holds index r of the middle factor. ``outer=1``
is the ordinary contiguous split; ``outer=3`` is a fused q/k/v projection whose
rows are permuted so each rank keeps its own q, k and v slices; a sequence dim
flattened with the batch (``[B*T]``) is ``Shard(0, outer=B)``. Partial sums never
leave the op that creates them: a row-parallel matmul is followed at once by g
(all-reduce) or, with sequence parallelism, a reduce-scatter.

``PaddedShard`` is Megatron's vocabulary padding: a dimension of size ``size`` that t
does not divide is laid out as ``padded`` = the next multiple of t, each rank holding
``padded/t`` rows; the rows past ``size`` (on the last ranks) are zeros that no token
looks up and whose logits the vocab-parallel cross-entropy masks to -inf, so they get
no gradient and never change. ``shard_tensor`` pads, ``unshard_tensors`` cuts the
padding off again, so full shapes are always the model's own.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ptdp_compiler.placement import Shard

__all__ = ["Shard", "PaddedShard", "TailShard", "PieceShard", "moved", "padded_size", "view_rule", "local_shape",
           "shard_tensor", "unshard_tensors"]


@dataclasses.dataclass(frozen=True)
class PaddedShard(Shard):
    """Shard(dim) of a dimension of ``size`` padded with zero rows to ``padded`` (a
    multiple of t): Megatron's vocabulary padding."""
    size: int = 0
    padded: int = 0

    def __str__(self):
        return f"Shard({self.dim}, vocabulary padded {self.size}->{self.padded})"

    def runs(self, size: int, t: int, r: int) -> list:
        n = self.padded // t   # the padding rows past ``size`` map to nothing
        return [(0, r * n, min(n, self.size - r * n))] if r * n < self.size else []


@dataclasses.dataclass(frozen=True)
class TailShard(Shard):
    """Shard(dim) of the first ``N - tail`` entries of a dimension of size ``N``; the last
    ``tail`` entries are replicated on every rank, after its own slice (local size
    ``(N - tail)/t + tail``). Multi-query attention's fused q/k/v projection: the query
    heads are split, the one shared key/value head is kept whole. Its weight rows get
    tp-partial gradients, summed over tp inside the graph (rules/linear.py)."""
    tail: int = 0

    def __str__(self):
        return f"Shard({self.dim}, last {self.tail} replicated)"


@dataclasses.dataclass(frozen=True)
class PieceShard(Shard):
    """Shard(dim) of a dimension made of consecutive ``pieces`` of unequal sizes (a fused
    [q | k | v] whose value part is wider than its key parts, Mamba-2's [z | x | B | C |
    dt]): each piece is split t ways on its own and a rank holds its slice of every piece,
    in order. A piece flagged in ``whole`` is kept entire on every rank instead (Mamba-2's
    B and C when its groups are fewer than the ranks, as multi-query attention keeps its
    key/value head): the rows of a fused weight that make it get complete gradients from
    every rank's use of them, so they need no tp sum. Equal split pieces are
    ``Shard(dim, outer=len(pieces))``."""
    pieces: tuple = ()
    whole: tuple = ()     # per piece: True = replicated; () = every piece split

    def __str__(self):
        if not any(self.whole):
            return f"Shard({self.dim}, pieces={list(self.pieces)})"
        return f"Shard({self.dim}, pieces={list(self.pieces)}, whole={list(self.whole)})"

    def is_whole(self, i: int) -> bool:
        return bool(self.whole) and self.whole[i]

    def local_size(self, t: int) -> int:
        return sum(p if self.is_whole(i) else p // t for i, p in enumerate(self.pieces))

    def runs(self, size: int, t: int, r: int, skip_whole: bool = False) -> list:
        out, lo, full = [], 0, 0
        for i, p in enumerate(self.pieces):
            n = p if self.is_whole(i) else p // t
            if not (skip_whole and r > 0 and self.is_whole(i)):
                out.append((lo, full + (0 if self.is_whole(i) else r * n), n))
            lo, full = lo + n, full + p
        return out


def padded_size(size: int, t: int) -> int:
    return -(-size // t) * t


def moved(pl: Shard, dim: int, outer: Optional[int] = None) -> Shard:
    """The same placement (padding included) on another dimension."""
    return dataclasses.replace(pl, dim=dim, outer=pl.outer if outer is None else outer)


def local_shape(shape, pl: Optional[Shard], t: int) -> list:
    shape = list(shape)
    if isinstance(pl, PaddedShard):
        shape[pl.dim] = pl.padded // t
    elif isinstance(pl, TailShard):
        shape[pl.dim] = (shape[pl.dim] - pl.tail) // t + pl.tail
    elif isinstance(pl, PieceShard):
        shape[pl.dim] = pl.local_size(t)
    elif pl is not None:
        shape[pl.dim] //= t
    return shape


def view_rule(in_shape, pl: Shard, out_shape, t: int) -> Optional[Shard]:
    """Placement of ``x.view(out_shape)`` when ``x`` (full shape ``in_shape``) is ``pl``;
    None when the view mixes the split factor with others (not local)."""
    in_shape, out_shape = list(in_shape), list(out_shape)
    if -1 in out_shape:
        known = math.prod(s for s in out_shape if s != -1)
        out_shape[out_shape.index(-1)] = math.prod(in_shape) // max(known, 1)
    if isinstance(pl, TailShard):
        return _tail_view_rule(in_shape, pl, out_shape, t)
    if isinstance(pl, PieceShard):   # only views that leave the pieced dimension alone
        lead, inner = math.prod(in_shape[:pl.dim]), math.prod(in_shape[pl.dim + 1:])
        for i, o in enumerate(out_shape):
            if o == in_shape[pl.dim] and math.prod(out_shape[:i]) == lead and \
                    math.prod(out_shape[i + 1:]) == inner:
                return dataclasses.replace(pl, dim=i)
        return None
    # flat index of the whole tensor: (outer_total, t, inner_total) around the rank factor
    outer_total = math.prod(in_shape[:pl.dim]) * pl.outer
    inner_total = math.prod(in_shape[pl.dim + 1:]) * (in_shape[pl.dim] // (pl.outer * t))
    before = 1
    for i, o in enumerate(out_shape):
        after = math.prod(out_shape[i + 1:])
        if outer_total % before == 0 and o % t == 0:
            o_outer = outer_total // before
            if o % (o_outer * t) == 0 and inner_total % after == 0 and \
                    o_outer * t * (inner_total // after) == o:
                return Shard(i, o_outer)
        before *= o
    return None


def _tail_view_rule(in_shape, pl, out_shape, t):
    """A TailShard dimension split into (rows, inner) or merged back: the leading
    dimensions stay, and the replicated tail stays whole rows of the new dimension."""
    d, lead = pl.dim, math.prod(in_shape[:pl.dim])
    inner_in = math.prod(in_shape[d + 1:])
    for i in range(len(out_shape)):
        if math.prod(out_shape[:i]) != lead:
            continue
        rest = math.prod(out_shape[i + 1:])
        if out_shape[i] * rest != in_shape[d] * inner_in or (pl.tail * inner_in) % rest:
            continue
        tail = pl.tail * inner_in // rest
        if (out_shape[i] - tail) % t == 0 and ((in_shape[d] - pl.tail) * inner_in) % rest == 0:
            return TailShard(i, 1, tail)
    return None


def pad_to_shard(full: torch.Tensor, pl: Shard) -> torch.Tensor:
    """``full`` grown to the padded size a ``PaddedShard`` splits (itself otherwise)."""
    if not isinstance(pl, PaddedShard):
        return full
    pad = [0, 0] * (full.dim() - pl.dim - 1) + [0, pl.padded - full.shape[pl.dim]]
    return torch.nn.functional.pad(full, pad)


def shard_view(full: torch.Tensor, pl: Shard, t: int, r: int) -> torch.Tensor:
    """Rank ``r``'s piece of a contiguous, already padded ``full`` as a view shaped
    ``[.., outer, n/(outer·t), ..]`` (``outer`` blocks, each split t ways)."""
    shape = list(full.shape)
    d, o = pl.dim, pl.outer
    return full.view(shape[:d] + [o, t, shape[d] // (o * t)] + shape[d + 1:]).select(d + 1, r)


def shard_tensor(full: torch.Tensor, pl: Optional[Shard], t: int, r: int) -> torch.Tensor:
    """This rank's piece of a full tensor (a copy)."""
    if pl is None:
        return full.detach().clone()
    if isinstance(pl, TailShard):
        n = full.shape[pl.dim] - pl.tail
        head = shard_tensor(full.narrow(pl.dim, 0, n), Shard(pl.dim), t, r)
        return torch.cat([head, full.detach().narrow(pl.dim, n, pl.tail)], pl.dim)
    if isinstance(pl, PieceShard):
        return torch.cat([full.detach().narrow(pl.dim, f, n) for _, f, n in
                          pl.runs(full.shape[pl.dim], t, r)], pl.dim).clone()
    full = pad_to_shard(full.detach(), pl).contiguous()
    shape = list(full.shape)
    shape[pl.dim] //= t
    return shard_view(full, pl, t, r).reshape(shape).clone()


def unshard_tensors(pieces: list, pl: Optional[Shard]) -> torch.Tensor:
    """Inverse of ``shard_tensor`` given every rank's piece in tp-rank order."""
    if pl is None:
        return pieces[0]
    if isinstance(pl, TailShard):
        n = pieces[0].shape[pl.dim] - pl.tail
        return torch.cat([p.narrow(pl.dim, 0, n) for p in pieces] +
                         [pieces[0].narrow(pl.dim, n, pl.tail)], pl.dim)
    t = len(pieces)
    if isinstance(pl, PieceShard):
        return torch.cat([p.narrow(pl.dim, lo, n) for piece, (lo, _, n) in
                          enumerate(pl.runs(0, t, 0))
                          for p in (pieces[:1] if pl.is_whole(piece) else pieces)], pl.dim)
    shape = list(pieces[0].shape)
    d, o = pl.dim, pl.outer
    vs = [p.reshape(shape[:d] + [o, shape[d] // o] + shape[d + 1:]) for p in pieces]
    full = torch.stack(vs, d + 1)  # (.., o, t, n/o, ..)
    shape[d] *= t
    full = full.reshape(shape)
    if isinstance(pl, PaddedShard):
        full = full.narrow(d, 0, pl.size).contiguous()
    return full

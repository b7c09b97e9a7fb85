"""Fused projections cut into unequal pieces: a gated-delta-net's [q | k | v] (value wider
than key), Mamba-2's [x | B | C]. Each piece is split over tp on its own (``PieceShard``),
so every piece stays a contiguous run of heads on each rank, as the separate projections
beside it are (z, the gate). Cuts along a pieced dimension must fall on piece boundaries;
a cut of a plain split dimension into unequal pieces re-seeds the producing weight's rows
as those pieces (``Refine``), and the replicated parameters on the way (a depthwise conv's
filters) follow, sliced per piece.

No graph is edited here: these are helpers of the shape rules."""
from __future__ import annotations

import itertools
import math
import operator
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.placement import Shard

from .. import analyze as _an
from ..sharding import PaddedShard, PieceShard, TailShard
from . import is_pointwise
from .pointwise import PASSTHROUGH

aten = torch.ops.aten

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
         aten.flatten.using_ints, aten.unflatten.int,
         aten.view_as.default, aten.reshape_as.default}   # the shape of another tensor
DIM_MOVES = {aten.transpose.int, aten.t.default, aten.permute.default, aten.unsqueeze.default}
# ops whose output channels are their first input's, in place: what lies between a fused
# projection and the cut of its output (a causal depthwise conv, its activation, the
# slice that drops the conv's padding)
_CHANNELWISE = {aten.conv1d.default, aten.conv2d.default, aten.slice.Tensor,
                aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.relu.default}


def producing_weight(rw, x: fx.Node, node: fx.Node) -> str:
    """The parameter whose output rows ``x``'s sharded dimension is (through copies, views,
    transposes and channel-wise ops: Mamba reads its fused projection channels-first and
    convolves it): the weight to re-seed as block- or piece-sharded."""
    m = x
    while True:
        lin = rw.analysis.linears.get(m)
        if lin is not None:
            return _an.param_name(lin.weight)
        if m.target is aten.scaled_dot_product_attention.default:
            m = m.args[0]   # attention's heads are its queries' (the others follow them)
            continue
        if m.target is aten.cat.default:   # joined along another dimension: the first's
            m = m.args[0][0]
            continue
        # element-wise ops follow their first operand, which carries the rows: a scale
        # (Falcon-H1's muP multipliers) or rotary embedding's q·cos + rotate(q)·sin
        if m.op != "call_function" or not m.args or not isinstance(m.args[0], fx.Node) or \
                not (m.target in PASSTHROUGH | VIEWS | DIM_MOVES | _CHANNELWISE or
                     is_pointwise(m.target)):
            rw.fail(node, "a split of the sharded dimension into pieces the producing "
                          "weight cannot be permuted for")
        m = m.args[0]


def partition(rw, x: fx.Node, xp, dim: int, outs: list) -> Optional[tuple]:
    """(pieces, whole) to re-seed a plain split dimension of ``x`` as, for its cut into the
    values ``outs``: each cut piece refined by the cuts it meets further on (Mamba-2 cuts
    [z | xBC | dt], then xBC into [x | B | C]), and flagged whole when it is grouped in
    fewer groups than ranks (``_whole``). None when a piece cannot be split t ways or the
    cut is into equal split pieces (those are blocks, ``Shard(dim, outer)``)."""
    if xp.outer != 1 or isinstance(xp, (PaddedShard, TailShard, PieceShard)):
        return None
    pieces, whole = [], []
    for out in outs:
        for piece, d in _refined(out, dim):
            pieces.append(piece.meta["val"].shape[d])
            whole.append(_whole(piece, d, rw.t))
    if any(p % rw.t for p, w in zip(pieces, whole) if not w) or \
            (len(set(pieces)) < 2 and not any(whole)):
        return None
    return tuple(pieces), tuple(whole) if any(whole) else ()


def cut(rw, node, xp: PieceShard, start: int, end: int) -> tuple:
    """(placement, local start, local end) of ``[start, end)`` along a pieced dimension:
    whole consecutive pieces; one split piece is a plain ``Shard``, one whole piece is
    replicated."""
    bounds = [0, *itertools.accumulate(xp.pieces)]
    if start not in bounds or end not in bounds:
        rw.fail(node, f"the cut [{start}:{end}] goes through a piece of {xp}")
    i, j = bounds.index(start), bounds.index(end)
    local = [0, *itertools.accumulate(n for _, _, n in xp.runs(bounds[-1], rw.t, rw.rank))]
    if j - i == 1:
        pl = None if xp.is_whole(i) else Shard(xp.dim)
    else:
        pl = PieceShard(xp.dim, 1, xp.pieces[i:j], xp.whole[i:j] if any(xp.whole[i:j]) else ())
    return pl, local[i], local[j]


def joined(rw, node, placements: list, sizes: list, dim: int) -> PieceShard:
    """The placement of a cat along the split dimension of unequal pieces, each a plain
    ``Shard``, itself pieced, or whole (replicated)."""
    pieces, whole = [], []
    for p, s in zip(placements, sizes):
        if isinstance(p, (PaddedShard, TailShard)) or (p is not None and p.outer != 1):
            rw.fail(node, f"cat along the sharded dimension of a piece placed {p}")
        if isinstance(p, PieceShard):
            pieces.extend(p.pieces)
            whole.extend(p.whole or [False] * len(p.pieces))
        else:
            pieces.append(s)
            whole.append(p is None)
    return PieceShard(dim, 1, tuple(pieces), tuple(whole) if any(whole) else ())


def _follow(n: fx.Node, d: int):
    """The values ``n``'s dimension ``d`` flows into through channel-wise ops, with where it
    lands: (value, dim) pairs."""
    from ..walk import _split_dim
    todo, seen = [(n, d)], set()
    while todo:
        m, e = todo.pop()
        yield m, e
        for u in m.users:
            if u in seen or not isinstance(u.meta.get("val"), torch.Tensor) or \
                    not u.args or u.args[0] is not m or \
                    not (u.target in PASSTHROUGH | DIM_MOVES | _CHANNELWISE or
                         (is_pointwise(u.target) and len(u.all_input_nodes) == 1)):
                continue
            f = _split_dim(u, m, e, 1)
            if f is not None and u.meta["val"].shape[f] == m.meta["val"].shape[e]:
                seen.add(u)
                todo.append((u, f))


def _refined(out: fx.Node, dim: int) -> list:
    """[(piece value, its dim)]: ``out`` itself, or the outputs of a split of it along
    the same features further on."""
    for m, e in _follow(out, dim):
        for u in m.users:
            if u.target in (aten.split.Tensor, aten.split_with_sizes.default) and \
                    u.args[0] is m and (u.args[2] if len(u.args) > 2 else 0) % \
                    m.meta["val"].dim() == e:
                gets = sorted((g for g in u.users if g.target is operator.getitem),
                              key=lambda g: g.args[1])
                if len(gets) == len(u.meta["val"]):
                    return [(g, e) for g in gets]
    return [(out, dim)]


def _whole(piece: fx.Node, dim: int, t: int) -> bool:
    """The piece is viewed as [groups, per group] with a number of groups t does not
    divide (Mamba-2's B and C in ``n_groups`` < t groups): every rank needs all of it."""
    for m, e in _follow(piece, dim):
        for u in m.users:
            if u.target in VIEWS and u.args[0] is m:
                ins, outs = list(m.meta["val"].shape), list(u.meta["val"].shape)
                lead = math.prod(ins[:e])
                for i in range(len(outs)):
                    if math.prod(outs[:i]) == lead:
                        if outs[i] != ins[e] and ins[e] % outs[i] == 0 and outs[i] % t:
                            return True
                        break
    return False

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

import torch
import torch.fx as fx

from ptdp_compiler.placement import Shard

from .. import analyze as _an
from ..sharding import PaddedShard, PieceShard, TailShard
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


def _one_tensor_pointwise(m: fx.Node) -> bool:
    return isinstance(m.target, torch._ops.OpOverload) and \
        torch.Tag.pointwise in m.target.tags and len(m.all_input_nodes) == 1


def producing_weight(rw, x: fx.Node, node: fx.Node) -> str:
    """The parameter whose output rows ``x``'s sharded dimension is (through copies, views,
    transposes and channel-wise ops: Mamba reads its fused projection channels-first and
    convolves it): the weight to re-seed as block- or piece-sharded."""
    m = x
    while True:
        lin = rw.analysis.linears.get(m)
        if lin is not None:
            return _an.param_name(lin.weight)
        if m.op != "call_function" or not m.args or not isinstance(m.args[0], fx.Node) or \
                not (m.target in PASSTHROUGH | VIEWS | DIM_MOVES | _CHANNELWISE or
                     _one_tensor_pointwise(m)):
            rw.fail(node, "a split of the sharded dimension into pieces the producing "
                          "weight cannot be permuted for")
        m = m.args[0]


def unequal(xp, sizes: list, t: int) -> tuple:
    """The pieces to re-seed a plain split dimension as, for a cut into ``sizes``: the
    sizes themselves when they differ and tp divides each; () otherwise (equal pieces are
    blocks, ``Shard(dim, outer)``)."""
    if xp.outer != 1 or isinstance(xp, (PaddedShard, TailShard, PieceShard)) or \
            len(set(sizes)) < 2 or any(s % t for s in sizes):
        return ()
    return tuple(sizes)


def cut(rw, node, xp: PieceShard, start: int, end: int) -> tuple:
    """(placement, local start, local end) of ``[start, end)`` along a pieced dimension:
    whole consecutive pieces, one piece a plain ``Shard``."""
    bounds = [0, *itertools.accumulate(xp.pieces)]
    if start not in bounds or end not in bounds:
        rw.fail(node, f"the cut [{start}:{end}] goes through a piece of {xp}")
    i, j = bounds.index(start), bounds.index(end)
    pl = Shard(xp.dim) if j - i == 1 else PieceShard(xp.dim, 1, xp.pieces[i:j])
    return pl, start // rw.t, end // rw.t


def joined(rw, node, placements: list, sizes: list, dim: int) -> PieceShard:
    """The placement of a cat along the split dimension of unequal pieces, each a plain
    ``Shard`` or itself pieced."""
    pieces = []
    for p, s in zip(placements, sizes):
        if p is None or isinstance(p, (PaddedShard, TailShard)) or p.outer != 1:
            rw.fail(node, f"cat along the sharded dimension of a piece placed {p}")
        pieces.extend(p.pieces if isinstance(p, PieceShard) else [s])
    return PieceShard(dim, 1, tuple(pieces))

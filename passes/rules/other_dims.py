"""Ops that act on some dimensions only, local when the split one is not among them:
``pad`` (the chunked delta rule pads the sequence to whole chunks), ``flip`` / ``roll``,
``tril`` / ``triu`` (causal masks of the last two dimensions), ``unfold`` (sliding
windows), ``repeat`` (tiles, see its rule) and ``repeat_interleave`` (key heads repeated for the value heads
that share them, as GQA repeats kv heads), which is local along a contiguously split
dimension too: rank r's entries repeated k times are entries r·n·k/t .. (r+1)·n·k/t of
the whole result."""
from __future__ import annotations

import torch

from ptdp_compiler.placement import Shard

from ..sharding import PaddedShard, PieceShard, TailShard, moved
from . import rule

aten = torch.ops.aten


@rule(aten.pad.default, aten.constant_pad_nd.default)
def pad(rw, node):
    x, widths = node.args[0], node.args[1]
    xp = rw.placement_of(x)
    nd = x.meta["val"].dim()
    padded = {nd - 1 - i // 2 for i, w in enumerate(widths) if w}
    if xp.dim in padded:
        rw.fail(node, f"padding of the sharded dimension {xp.dim} ({list(widths)})")
    return rw.copy(node, xp)


@rule(aten.tril.default, aten.triu.default)
def triangle(rw, node):
    x = node.args[0]
    xp = rw.placement_of(x)
    if xp.dim >= x.meta["val"].dim() - 2:
        rw.fail(node, f"{node.target} over the sharded dimension {xp}")
    return rw.copy(node, xp)


@rule(aten.repeat_interleave.self_int)
def repeat_interleave(rw, node):
    x = node.args[0]
    xp = rw.placement_of(x)
    repeats = node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    nd = x.meta["val"].dim()
    if dim is None:
        rw.fail(node, "repeat_interleave of a flattened sharded tensor")
    if dim % nd != xp.dim:
        return rw.copy(node, xp)
    if xp.outer != 1 or isinstance(xp, (PaddedShard, TailShard, PieceShard)):
        rw.fail(node, f"repeat_interleave along a dimension placed {xp}")
    size = node.meta["val"].shape[xp.dim] // rw.t   # output_size, if given, is local too
    rest = tuple(node.args[3:4]) and (size,)
    kwargs = dict(node.kwargs)
    if "output_size" in kwargs:
        kwargs["output_size"] = size
    return rw.emit(node.target, (rw.new(x), repeats, dim, *rest), kwargs, pl=xp, like=node)


@rule(aten.repeat.default)
def repeat(rw, node):
    """Tiles: along the split dimension, k tiles of a (blocks, t, n) layout are k·blocks
    blocks of the result, each rank's tile repeated (DiffLlama's value halves, tiled back
    to every head)."""
    x, reps = node.args[0], list(node.args[1])
    xp = rw.placement_of(x)
    d = xp.dim + len(reps) - x.meta["val"].dim()
    if reps[d] == 1:
        return rw.copy(node, moved(xp, d))
    if type(xp) is not Shard or x in rw.sequence_split:
        # (a sequence shard tiled, as Llama 4's dense experts tile the tokens, is left to
        # the whole-sequence fallback: the expert GEMMs need every token)
        rw.fail(node, f"repeat along a dimension placed {xp}")
    return rw.copy(node, moved(xp, d, xp.outer * reps[d]))


@rule(aten.unfold.default)
def unfold(rw, node):
    """Sliding windows along a dimension that is not split (a new last dimension holds
    each window): local."""
    x, dim = node.args[:2]
    xp = rw.placement_of(x)
    if dim % x.meta["val"].dim() == xp.dim:
        rw.fail(node, f"unfold along the sharded dimension {xp}")
    return rw.copy(node, xp)


@rule(aten.flip.default, aten.roll.default)
def flip(rw, node):
    """Reversing (or rolling) other dimensions than the split one is local."""
    x = node.args[0]
    xp = rw.placement_of(x)
    nd = x.meta["val"].dim()
    dims = node.args[2] if node.target is aten.roll.default else node.args[1]
    dims = [dims] if isinstance(dims, int) else list(dims)
    if node.target is aten.roll.default and not dims:   # flattened roll: every dimension
        dims = list(range(nd))
    if xp.dim in {d % nd for d in dims}:
        rw.fail(node, f"{node.target} along the sharded dimension {xp}")
    return rw.copy(node, xp)

"""Depthwise and grouped convolutions (Mamba's short causal conv1d, RecurrentGemma's,
ZAYA's per-head convolution over [q heads | k heads]): each group of channels is
convolved with its own filters, so a channel-split input whose every run of channels is
whole groups needs only this rank's filters (the weight's and bias's rows, stored split
once ``tp_sliced_params`` learns they are only read that way) and its own groups. A
convolution whose groups straddle the split, or that mixes all channels, is refused."""
from __future__ import annotations

import torch

from ..sharding import PaddedShard, TailShard, local_shape, moved
from . import rule

aten = torch.ops.aten
_SPATIAL = {aten.conv1d.default: 1, aten.conv2d.default: 2}


@rule(*_SPATIAL)
def grouped_conv(rw, node):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    a = dict(zip(names, defaults))
    a.update(zip(names, node.args))
    a.update(node.kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    xs, ws = tuple(x.meta["val"].shape), tuple(w.meta["val"].shape)
    ch = len(xs) - _SPATIAL[node.target] - 1          # channels: [N,] C, L...
    xp = rw.placement_of(x)
    channels, groups = xs[ch], a["groups"]
    size = channels // groups                          # channels per group
    if xp is None or xp.dim != ch or isinstance(xp, (PaddedShard, TailShard)) or \
            ws[0] != channels or groups == 1 or \
            any(f % size or n % size for _, f, n in xp.runs(channels, rw.t, rw.rank)):
        rw.fail(node, f"a convolution with input {xp} and groups={groups} over "
                      f"{channels} channels: only a depthwise or grouped convolution whose "
                      "groups each rank holds whole is local")
    wpl = moved(xp, 0)

    def rows(p, shape):
        if p is None:
            return None
        have = rw.placement_of(p)
        if have is not None:
            if have != wpl:
                rw.fail(node, f"convolution parameter split {have}, input channels {xp}")
            return rw.new(p)
        return rw.localize(rw.new(p), shape, wpl, len(shape), node)
    wl = rows(w, ws)
    bl = rows(b, tuple(b.meta["val"].shape)) if b is not None else None
    local = local_shape(xs, xp, rw.t)[ch]    # pieces kept whole count in full
    rw.shape_rewrite(node, (channels,), (local,))
    groups = local // size
    return rw.emit(node.target, (rw.new(x), wl, bl, a["stride"], a["padding"], a["dilation"],
                                 groups), pl=xp, like=node)

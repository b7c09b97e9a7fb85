"""Depthwise convolution (Mamba's short causal conv1d, RecurrentGemma's): each channel is
convolved with its own filter, so a channel-split input needs only this rank's filters
(the weight's and bias's rows, stored split once ``tp_sliced_params`` learns they are
only read that way) and ``groups / t`` groups. Any other convolution mixes channels and
is refused."""
from __future__ import annotations

import torch

from ..sharding import PaddedShard, TailShard, local_shape, moved
from . import rule

aten = torch.ops.aten
_SPATIAL = {aten.conv1d.default: 1, aten.conv2d.default: 2}


@rule(*_SPATIAL)
def depthwise_conv(rw, node):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    a = dict(zip(names, defaults))
    a.update(zip(names, node.args))
    a.update(node.kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    xs, ws = tuple(x.meta["val"].shape), tuple(w.meta["val"].shape)
    ch = len(xs) - _SPATIAL[node.target] - 1          # channels: [N,] C, L...
    xp = rw.placement_of(x)
    channels = xs[ch]
    if xp is None or xp.dim != ch or isinstance(xp, (PaddedShard, TailShard)) or \
            a["groups"] != channels or ws[0] != channels:
        rw.fail(node, f"a convolution with input {xp} and groups={a['groups']} over "
                      f"{channels} channels: only a depthwise convolution of a "
                      "channel-split input is local")
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
    groups = local_shape(xs, xp, rw.t)[ch]   # pieces kept whole count in full
    rw.shape_rewrite(node, (channels,), (groups,))
    return rw.emit(node.target, (rw.new(x), wl, bl, a["stride"], a["padding"], a["dilation"],
                                 groups), pl=xp, like=node)

"""``gather`` and ``index_select`` along a dimension that is not split (ProphetNet's
relative-position buckets picked per head, XLNet's relative shift): each rank picks from
its own rows (with its rows of a gather's index)."""
from __future__ import annotations

import torch

from ..sharding import PaddedShard
from . import rule

aten = torch.ops.aten


@rule(aten.gather.default)
def gather(rw, node):
    src, dim, index = node.args[:3]
    p, ip = rw.placement_of(src), rw.placement_of(index)
    nd = src.meta["val"].dim()
    dim = dim % nd
    if p is None or isinstance(p, PaddedShard) or p.dim == dim:
        rw.fail(node, f"gather along dimension {dim} of a value placed {p}")
    ishape = tuple(index.meta["val"].shape)
    if ishape[p.dim] != src.meta["val"].shape[p.dim]:
        rw.fail(node, "gather with an index that does not cover the split dimension")
    idx = rw.new(index)
    if ip is None:
        idx = rw.localize(idx, ishape, p, len(ishape), node)
    elif ip != p:
        rw.fail(node, f"gather of a value placed {p} with an index placed {ip}")
    return rw.emit(aten.gather.default, (rw.new(src), dim, idx, *node.args[3:]),
                   dict(node.kwargs), pl=p, like=node)


@rule(aten.index_select.default)
def index_select(rw, node):
    """Entries picked along a dimension that is not split (XLNet's relative shift)."""
    src, dim = node.args[:2]
    p = rw.placement_of(src)
    if rw.placement_of(node.args[2]) is not None or p is None or \
            p.dim == dim % src.meta["val"].dim():
        rw.fail(node, f"index_select along dimension {dim} of a value placed {p}")
    return rw.copy(node, p)

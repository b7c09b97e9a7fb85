"""What this rank holds of each canonical parameter, as boxes of the full tensor.

``ParallelModule._local_layout()`` yields one ``LocalParam`` per parameter this rank
holds. The optimizer, the gradient-norm clip and the checkpoint read only that: a
parameter is known by its canonical name (``model.named_parameters()``), its full
shape and how this rank's tensor maps into it, never by the executor's internals.

Index math: a tensor-parallel ``Shard(dim, outer)`` lays ``dim`` out as
``(outer, t, n)`` with the rank in the middle, so a rank's shard is ``outer`` boxes
of the full tensor (one per fused block, e.g. q, k, v); a contiguous range of a
flattened local tensor (a distributed-optimizer shard) is at most ``2·ndim − 1``
boxes of the local tensor. ``full_boxes`` composes the two, giving the
(offsets, sizes) rectangles a checkpoint stores, so any other layout can read back
exactly the elements it needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class LocalParam:
    name: str                    # canonical name, as model.named_parameters() reports it
    param: torch.nn.Parameter    # this rank's tensor: a tp shard or the whole tensor
    placement: Optional[object]  # Shard over tp, or None (replicated over tp)
    is_owner: bool               # exactly one rank of a data-parallel replica counts it
    full_shape: tuple
    tp: int = 1
    tp_rank: int = 0
    ep: int = 1                  # > 1: a routed expert's tensor, dim 0 split over ep ranks
    ep_rank: int = 0
    # dp_shard > 1: ``param`` is this rank's flat, zero-padded 1/fsdp of the local tensor
    # of shape ``local_shape`` (elements [fsdp_rank·numel, ...) of it flattened)
    fsdp: int = 1
    fsdp_rank: int = 0
    local_shape: Optional[tuple] = None

    @property
    def numel(self) -> int:
        return self.param.numel()


def duplicate_tail(lp: LocalParam, lo: int, hi: int) -> Optional[tuple]:
    """The part of flat range [lo, hi) of ``lp``'s local tensor that is a TailShard's
    replicated rows on a tp rank > 0 (rank 0 counts them), as [a, b) relative to lo;
    None if there is none."""
    pl = lp.placement
    tail = getattr(pl, "tail", 0)
    if not tail or lp.tp_rank == 0:
        return None
    rows = lp.param.shape[pl.dim]
    inner = math.prod(lp.param.shape[pl.dim + 1:])
    if pl.dim != 0:
        raise NotImplementedError("a replicated tail off the first dimension")
    a, b = max(lo, (rows - tail) * inner), min(hi, rows * inner)
    return (a - lo, b - lo) if a < b else None


def flat_range_boxes(shape, lo: int, hi: int) -> list:
    """Boxes ``(offsets, sizes)`` of a C-contiguous tensor of ``shape`` covering its flat
    indices ``[lo, hi)``, in order; each box is itself a contiguous flat segment."""
    shape = tuple(shape)
    if lo >= hi:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    boxes = []
    r0, c0 = divmod(lo, inner)
    if c0:  # a partial first row
        end = min(hi, (r0 + 1) * inner)
        boxes += [((r0,) + o, (1,) + s)
                  for o, s in flat_range_boxes(shape[1:], c0, end - r0 * inner)]
        lo, r0 = end, r0 + 1
        if lo >= hi:
            return boxes
    r1, c1 = divmod(hi, inner)
    if r1 > r0:  # whole rows
        boxes.append(((r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + shape[1:]))
    if c1:  # a partial last row
        boxes += [((r1,) + o, (1,) + s) for o, s in flat_range_boxes(shape[1:], 0, c1)]
    return boxes


def flat_index(offsets, shape) -> int:
    idx = 0
    for o, s in zip(offsets, shape):
        idx = idx * s + o
    return idx


def local_to_full(offsets, sizes, placement, full_shape, t: int, r: int,
                  skip_tail: bool = False) -> list:
    """A box of a rank's tp shard → boxes of the full tensor, as (local_offsets,
    full_offsets, sizes): a box spanning several fused blocks is cut at their edges. A
    TailShard's last rows, and a PieceShard's whole pieces, are the same rows of the full
    tensor on every rank (``skip_tail``: leave them to tp rank 0, so a checkpoint writes
    them once)."""
    offsets, sizes = tuple(offsets), tuple(sizes)
    if placement is None:
        return [(offsets, offsets, sizes)]
    tail = getattr(placement, "tail", 0)
    if tail:
        d = placement.dim
        hl = (full_shape[d] - tail) // t
        out, a, end = [], offsets[d], offsets[d] + sizes[d]
        for lo, hi, base, in_tail in ((a, min(end, hl), r * hl, False),
                                      (max(a, hl), end, full_shape[d] - tail - hl, True)):
            if lo < hi and not (skip_tail and r > 0 and in_tail):
                out.append((offsets[:d] + (lo,) + offsets[d + 1:],
                            offsets[:d] + (base + lo,) + offsets[d + 1:],
                            sizes[:d] + (hi - lo,) + sizes[d + 1:]))
        return out
    d = placement.dim
    out, a, end = [], offsets[d], offsets[d] + sizes[d]
    pieced = {"skip_whole": skip_tail} if getattr(placement, "pieces", ()) else {}
    for start, full_start, length in placement.runs(full_shape[d], t, r, **pieced):
        lo, hi = max(a, start), min(end, start + length)
        if lo < hi:
            out.append((offsets[:d] + (lo,) + offsets[d + 1:],
                        offsets[:d] + (full_start + lo - start,) + offsets[d + 1:],
                        sizes[:d] + (hi - lo,) + sizes[d + 1:]))
    return out


def piece_boxes(lp: LocalParam, flat: torch.Tensor, lo: int, hi: int,
                skip_tail: bool = False) -> list:
    """``flat`` holds elements ``[lo, hi)`` of ``lp``'s flattened local tensor (the whole
    tensor when lo=0, hi=numel). Returns (full_offsets, sizes, view of ``flat``) boxes
    (``skip_tail``: without a TailShard's replicated rows on tp ranks > 0)."""
    local_shape = tuple(lp.param.shape)
    if lp.local_shape is not None:   # dp_shard: a flat range of the local tensor, minus pad
        local_shape = tuple(lp.local_shape)
        shift = lp.fsdp_rank * lp.param.numel()
        lo, hi = lo + shift, min(hi + shift, math.prod(local_shape))
        flat = flat[:max(hi - lo, 0)]
    # ep: this rank's experts are block ep_rank of dim 0; tp splits within that block
    full_shape, e0 = tuple(lp.full_shape), 0
    if lp.ep > 1:
        full_shape = (full_shape[0] // lp.ep,) + full_shape[1:]
        e0 = lp.ep_rank * full_shape[0]
    out = []
    for offs, sizes in flat_range_boxes(local_shape, lo, hi):
        start = flat_index(offs, local_shape) - lo
        seg = flat[start:start + math.prod(sizes)].view(sizes)
        for loc, full, sz in local_to_full(offs, sizes, lp.placement, full_shape,
                                           lp.tp, lp.tp_rank, skip_tail):
            view = seg
            if lp.placement is not None:
                d = lp.placement.dim
                view = seg.narrow(d, loc[d] - offs[d], sz[d])
            if e0:
                full = (full[0] + e0,) + tuple(full[1:])
            out.append((tuple(full), tuple(sz), view))
    return out

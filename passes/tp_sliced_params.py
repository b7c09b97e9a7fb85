"""Parameters that every reader slices to this rank's part are stored as that part.

A replicated operand of an op whose result is split (a rule's ``Rewriter.localize``) is
sliced to the rank's part at run time: Mamba's ``A_log``, ``D`` and depthwise convolution
weights against channel-split activations, a per-head attention-sink logit, a per-channel
scale of a column-parallel output. Such a parameter is whole on every rank, and its
gradient is a tp-partial sum that needs an all-reduce.

When the sliced value is the parameter itself or is computed from it alone by
element-wise ops of one input (casts, ``exp``, ``neg``), views (``A[None, :, None, :]``,
a grouped weight read as ``[groups, out, in]``), transposes, broadcasts along other
dimensions (attention sinks) and whole slices, and every reader of that chain slices it
the same way, the parameter is seeded split instead (``learn``): the next walk runs the
chain on the shard, the rank stores 1/t of the parameter, and its gradient is complete
on each rank (no all-reduce). A parameter with any other reader, or whose slice a view
cannot carry back to it as one placement, keeps its replicated placement.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from . import analyze as _an
from .rules import is_pointwise
from .rules.pointwise import PASSTHROUGH
from .sharding import moved, view_rule

aten = torch.ops.aten
ROLE = "read only as this rank's slice (element-wise, through views): stored split"


# views that only add or drop dimensions of size 1 (``w.unsqueeze(1)``, ``A[None, :]``)
_SINGLETON_VIEWS = {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                    aten.squeeze.default, aten.view.default, aten.reshape.default,
                    aten._unsafe_view.default}
# views that may regroup dimensions (a [g*out, in] weight read as [g, out, in])
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.flatten.using_ints, aten.unflatten.int}
_TRANSPOSES = {aten.transpose.int, aten.t.default, aten.permute.default}


def _nonunit(n: fx.Node) -> tuple:
    return tuple(s for s in n.meta["val"].shape if s != 1)


def _tensor(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)


def _readers(n: fx.Node) -> list:
    return [u for u in n.users if u.target is not aten._assert_tensor_metadata.default]


def _chain_step(c: fx.Node) -> Optional[fx.Node]:
    """The one tensor input of ``c`` when ``c`` keeps it element for element (an
    element-wise op of one input, a cast, a view adding or dropping size-1 dims)."""
    if c.op != "call_function" or not _tensor(c):
        return None
    inputs = [a for a in c.all_input_nodes if _tensor(a)]
    if len(inputs) != 1:
        return None
    a = inputs[0]
    if c.target in _SINGLETON_VIEWS and _nonunit(c) == _nonunit(a):
        return a
    if c.target in _VIEWS or c.target in _TRANSPOSES or c.target is aten.expand.default:
        return a
    if (c.target in PASSTHROUGH or c.target is aten.slice.Tensor or  # x[:, :] is x
            is_pointwise(c.target)) and tuple(c.meta["val"].shape) == tuple(a.meta["val"].shape):
        return a
    return None


def _to_param(c: fx.Node, pl, t: int):
    """(parameter placeholder, placement on it) that placement ``pl`` of ``c`` comes from,
    or None when ``c`` is not a chain of single-input steps on a parameter or a view
    cannot carry ``pl`` back as one placement."""
    while not (c.op == "placeholder" and c.meta.get("ptdp_input_kind") == "param"):
        a = _chain_step(c)
        if a is None:
            return None
        shape, ins = tuple(c.meta["val"].shape), tuple(a.meta["val"].shape)
        if c.target in _SINGLETON_VIEWS and _nonunit(c) == _nonunit(a):
            # the same non-1 sizes: follow the split dimension's ordinal
            if shape[pl.dim] == 1:
                return None
            k = sum(1 for s in shape[:pl.dim] if s != 1)
            pl = moved(pl, [i for i, s in enumerate(ins) if s != 1][k])
        elif c.target in _VIEWS:
            back = view_rule(shape, pl, ins, t)
            if back is None or view_rule(ins, back, shape, t) != pl:
                return None
            pl = back
        elif c.target is aten.expand.default:   # broadcast along other dimensions
            j = pl.dim - (len(shape) - len(ins))
            if j < 0 or ins[j] != shape[pl.dim]:
                return None
            pl = moved(pl, j)
        elif c.target is aten.permute.default:
            pl = moved(pl, [i % len(ins) for i in c.args[1]][pl.dim])
        elif c.target is aten.transpose.int:
            i, j = c.args[1] % len(ins), c.args[2] % len(ins)
            pl = moved(pl, j if pl.dim == i else i if pl.dim == j else pl.dim)
        elif c.target is aten.t.default:
            pl = moved(pl, 1 - pl.dim) if len(ins) == 2 else pl
        c = a
    return c, pl


def _chain(p: fx.Node) -> set:
    """``p`` and every value computed from it alone by chain steps."""
    out, todo = {p}, [p]
    while todo:
        for u in _readers(todo.pop()):
            if u not in out and _chain_step(u) is not None:
                out.add(u)
                todo.append(u)
    return out


def learn(gm: fx.GraphModule, rw, seeds: dict) -> dict:
    """{parameter: Shard} for the replicated parameters whose every reader sliced them
    alike in the walk ``rw`` (its ``localized`` records: new value, dimension, placement
    on it, captured op)."""
    old_of = {new: old for old, new in rw.env.items() if isinstance(new, fx.Node)}
    sliced = {}                       # (captured chain value, captured reader) -> (param, pl)
    for v, j, pl, node in rw.localized:
        c = old_of.get(v)
        src = _to_param(c, pl, rw.t) if c is not None else None
        if src is not None:
            sliced[(c, node)] = src
    out = {}
    for p in {p for p, _ in sliced.values()}:
        name = _an.param_name(p)
        if name in seeds or not name:
            continue
        chain, pls, ok = _chain(p), set(), True
        for c in chain:
            for u in _readers(c):
                if u in chain:
                    continue
                if u.op == "output" or (c, u) not in sliced:
                    ok = False
                else:
                    pls.add(sliced[(c, u)][1])
        if ok and len(pls) == 1:
            out[name] = pls.pop()
    return out

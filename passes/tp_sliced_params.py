"""Parameters that every reader slices to this rank's part are stored as that part.

A replicated operand of an op whose result is split (a rule's ``Rewriter.localize``) is
sliced to the rank's part at run time: Mamba's ``A_log``, ``D`` and depthwise convolution
weights against channel-split activations, a per-head attention-sink logit, a per-channel
scale of a column-parallel output. Such a parameter is whole on every rank, and its
gradient is a tp-partial sum that needs an all-reduce.

When the sliced value is the parameter itself or is computed from it by ops that
commute with the slice — element-wise ops (casts, ``exp``, ``neg``; of several inputs,
where an input broadcast along the split dimension carries no split), views
(``A[None, :, None, :]``, a grouped weight read as ``[groups, out, in]``), transposes,
broadcasts along other dimensions (attention sinks), whole slices, a ``select`` along
another dimension (a scan's time step) and a matmul's rows (``W @ x``: Mamba-1's dt_proj)
— and every use of the parameter ends in such a slice, all alike, the parameter is seeded
split instead (``learn``): the next walk computes those values on the shard (Mamba-1's
discretisation ``exp(A * dt)`` on the rank's channels, not whole and sliced per step),
the rank stores 1/t of the parameter, and its gradient is complete on each rank (no
all-reduce). A parameter with any other reader, or whose slice a view cannot carry back
to it as one placement, keeps its replicated placement.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import readers

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


def _single_back(c: fx.Node, a: fx.Node, pl, t: int):
    """Placement on ``a`` (``c``'s one input, a chain step) that ``pl`` on ``c`` comes
    from, or None when a view cannot carry it back as one placement."""
    shape, ins = tuple(c.meta["val"].shape), tuple(a.meta["val"].shape)
    if c.target in _SINGLETON_VIEWS and _nonunit(c) == _nonunit(a):
        # the same non-1 sizes: follow the split dimension's ordinal
        if shape[pl.dim] == 1:
            return None
        k = sum(1 for s in shape[:pl.dim] if s != 1)
        return moved(pl, [i for i, s in enumerate(ins) if s != 1][k])
    if c.target in _VIEWS:
        back = view_rule(shape, pl, ins, t)
        if back is None or view_rule(ins, back, shape, t) != pl:
            return None
        return back
    if c.target is aten.expand.default:   # broadcast along other dimensions
        j = pl.dim - (len(shape) - len(ins))
        return moved(pl, j) if j >= 0 and ins[j] == shape[pl.dim] else None
    if c.target is aten.permute.default:
        return moved(pl, [i % len(ins) for i in c.args[1]][pl.dim])
    if c.target is aten.transpose.int:
        i, j = c.args[1] % len(ins), c.args[2] % len(ins)
        return moved(pl, j if pl.dim == i else i if pl.dim == j else pl.dim)
    if c.target is aten.t.default:
        return moved(pl, 1 - pl.dim) if len(ins) == 2 else pl
    return pl


def split_inputs(c: fx.Node, pl, t: int) -> Optional[list]:
    """``[(input, placement on it)]``: the inputs of ``c`` that carry split ``pl`` of its
    result, when computing ``c`` on this rank's part needs only their parts — a chain step,
    an element-wise op of several inputs (an input broadcast along the split dimension
    carries none), a ``select`` along another dimension (one time step of a scan), the
    rows of a matmul's left operand or the columns of its right (``W @ x``: Mamba's
    dt_proj). None: ``c`` does not commute with the split."""
    if c.op != "call_function" or not _tensor(c):
        return None
    a = _chain_step(c)
    if a is not None:
        back = _single_back(c, a, pl, t)
        return None if back is None else [(a, back)]
    out = tuple(c.meta["val"].shape)
    ins = [x for x in c.args if _tensor(x)]
    if c.target is aten.select.int and len(ins) == 1:
        d = c.args[1] % (len(out) + 1)
        return [(ins[0], moved(pl, pl.dim if pl.dim < d else pl.dim + 1))]
    if c.target in (aten.matmul.default, aten.bmm.default) and len(ins) == 2:
        x, y = ins
        if pl.dim == len(out) - 2 and x.meta["val"].dim() >= 2:
            return [(x, moved(pl, x.meta["val"].dim() - 2))]
        if pl.dim == len(out) - 1 and y.meta["val"].dim() >= 2:
            return [(y, moved(pl, y.meta["val"].dim() - 1))]
        return None
    if is_pointwise(c.target) and ins:
        carried = []
        for x in ins:
            shape = tuple(x.meta["val"].shape)
            j = pl.dim - (len(out) - len(shape))
            if j >= 0 and shape[j] == out[pl.dim]:
                carried.append((x, moved(pl, j)))
            elif not (j < 0 or shape[j] == 1):
                return None
        return carried
    return None


_CONFLICT = object()


def learn(gm: fx.GraphModule, rw, seeds: dict) -> dict:
    """{parameter: Shard} for the replicated parameters whose every use ends in a slice
    of the walk ``rw`` (its ``localized`` records: new value, dimension, placement on it,
    captured op), all alike: from each slice back through ops that commute with it
    (``split_inputs``) to the parameters they read, then forward from each parameter,
    every reader must be such an op or such a slice."""
    old_of = {new: old for old, new in rw.env.items() if isinstance(new, fx.Node)}
    cut = {}                           # (captured value, captured reader) -> placement
    for v, j, pl, node in rw.localized:
        c = old_of.get(v)
        if c is not None:
            cut[(c, node)] = pl
    need = {}                          # captured value -> the placement its part has
    todo = [(c, pl) for (c, _), pl in cut.items()]
    while todo:
        c, pl = todo.pop()
        if c in need:
            if need[c] is not _CONFLICT and need[c] != pl:
                need[c] = _CONFLICT
            continue
        need[c] = pl
        if c.op == "call_function" and rw.placement.get(rw.env.get(c)) is None:
            todo.extend(split_inputs(c, pl, rw.t) or ())
    out = {}
    for p, pl in need.items():
        name = _an.param_name(p)
        if not name or name in seeds or pl is _CONFLICT or \
                p.meta.get("ptdp_input_kind") != "param":
            continue
        if _cone_is_sliced(p, need, cut, rw.t):
            out[name] = pl
    return out


def _cone_is_sliced(p: fx.Node, need: dict, cut: dict, t: int) -> bool:
    """Every value computed from ``p`` is either sliced where read (``cut``) or feeds an op
    that commutes with the split, at the placement ``need`` gives it."""
    cone, todo = {p}, [p]
    while todo:
        n = todo.pop()
        for u in readers(n):
            if (n, u) in cut:
                if cut[(n, u)] != need[n]:
                    return False
                continue
            pu = need.get(u)
            if pu is None or pu is _CONFLICT or u.op == "output" or \
                    (n, need[n]) not in (split_inputs(u, pu, t) or ()):
                return False
            if u not in cone:
                cone.add(u)
                todo.append(u)
    return True

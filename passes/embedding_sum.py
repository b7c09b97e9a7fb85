"""The embedding sum: the token embedding plus the position / token-type embeddings added
to it before anything else reads it (BERT, GPT-2-style learned positions, BART's offset
positions, GPT-BigCode).

Megatron keeps position embeddings whole on every rank. Here their rows are split over
tp like the vocabulary's: each rank looks up only its rows and the partial sums of all
the tables are added before the one reduction the token embedding needs anyway (an
all-reduce, or under sequence parallelism the reduce-scatter). So no table stays whole
and no collective is added.

A chain qualifies when each step is the single user of the previous one and is
- ``add`` of another embedding whose table is a parameter read by nothing else (its rows
  are split: a "side table"), or of any other value (added on tp rank 0 only, so the
  reduction counts it once),
- a multiplication or division by a number or a one-element value that needs no
  gradient (``embed_scale``), or a floating-point cast,
and keeps the token embedding's shape.
"""
from __future__ import annotations

import dataclasses
from numbers import Number
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import readers

aten = torch.ops.aten

_ADD = {aten.add.Tensor, aten.add_.Tensor}
_SCALE = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_CAST = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


@dataclasses.dataclass
class EmbeddingSum:
    root: fx.Node                    # the last node of the chain: reduced there
    nodes: set                       # every node of the chain (token embedding included)
    side_tables: list                # embedding nodes whose tables are split by rows


def _param(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "placeholder" and \
        n.meta.get("ptdp_input_kind") == "param"


def _side_table(n, head_weight) -> list:
    """[lookup, casts...]: an embedding lookup of a parameter table that nothing else
    reads, possibly cast; [] when ``n`` is not one."""
    branch = []
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in _CAST and \
            len(readers(n)) == 1:
        branch.append(n)
        n = n.args[0]
    if not (isinstance(n, fx.Node) and n.op == "call_function" and
            n.target is aten.embedding.default and len(readers(n)) == 1):
        return []
    w = n.args[0]
    ok = _param(w) and w is not head_weight and len(w.users) == 1 and \
        w.meta["val"].dim() == 2
    return [n] + branch if ok else []


def _scalar(a) -> bool:
    if isinstance(a, Number):
        return True
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.numel() == 1 and not _param(a) and \
        not v.requires_grad


def find(token: fx.Node, head_weight) -> Optional[EmbeddingSum]:
    """The embedding sum starting at the token embedding ``token``, or None when the
    token embedding's first user is not a linear step of one."""
    shape = tuple(token.meta["val"].shape)
    nodes, side, cur = {token}, [], token
    while len(readers(cur)) == 1:
        u = readers(cur)[0]
        v = u.meta.get("val")
        if u.op != "call_function" or not isinstance(v, torch.Tensor) or \
                tuple(v.shape) != shape or not v.is_floating_point():
            break
        if u.target in _ADD and len(u.args) == 2 and not u.kwargs and \
                (u.args[0] is cur) != (u.args[1] is cur):
            other = u.args[1] if u.args[0] is cur else u.args[0]
            branch = _side_table(other, head_weight)
            if branch:
                side.append(branch[0])
                nodes.update(branch)
        elif u.target in _SCALE and u.args[0] is cur and _scalar(u.args[1]) or \
                u.target is aten.mul.Tensor and u.args[1] is cur and _scalar(u.args[0]):
            pass
        elif u.target in _CAST and u.args[0] is cur:
            pass
        else:
            break
        nodes.add(u)
        cur = u
    # a cast that ends the chain belongs to its reader (the first layer's norm upcasts):
    # reducing before it keeps the reduction in the embedding's region, so every layer's
    # region is alike and compiled once
    while cur is not token and cur.target in _CAST:
        nodes.discard(cur)
        cur = cur.args[0]
    if cur is token:
        return None
    return EmbeddingSum(cur, nodes, side)

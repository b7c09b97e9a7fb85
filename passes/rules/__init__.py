"""Sharding rules: one small function per ATen op (or family of ops), like DTensor's
sharding strategies.

A rule is called for a captured node with at least one tensor-parallel-sharded input:
``rule(rw, node) -> new node``. It reads the input placements (``rw.placement_of``),
refuses what it does not accept with ``rw.fail`` (naming why), emits this rank's op(s)
with ``rw.emit`` and records the placement of the result. Replicated operands that meet
sharded ones are sliced to this rank's part (``rw.localize``) or wrapped in Megatron's f
(``rw.f``). An op with no rule is refused by the pass; nothing is replicated silently.

    pointwise.py   element-wise ops, dropout, casts and copies
    shape.py       views, layout ops, slice / split / cat / stack / unbind, getitem
    reductions.py  reductions, softmax, max / logsumexp, layer_norm / rms_norm
    attention.py   scaled_dot_product_attention, batched matmuls, baddbmm
    conv.py        depthwise convolution of channel-split inputs
    einsum.py      einsum split on an index the output keeps (heads)
    gather.py      gather along a dimension that is not split
    other_dims.py  pad, tril / triu, repeat_interleave: local off the dims they act on
    pieces.py      cuts of fused projections into unequal pieces (helpers)
    linear.py      column / row-parallel and replicated linears
    vocab.py       vocab-parallel embedding and cross-entropy
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

RULES: dict = {}


class Refine(Exception):
    """Raised by a rule that learned a parameter must be re-seeded (a fused projection's
    rows are whole blocks); the pass restarts the walk with the new seed."""

    def __init__(self, param: str, outer: int, tail: int = 0, pieces: tuple = (),
                 whole: tuple = ()):
        super().__init__(f"re-seed {param} as " +
                         (f"pieces {list(pieces)}" if pieces else f"{outer} blocks") +
                         (f", its last {tail} rows replicated" if tail else ""))
        self.param, self.outer, self.tail = param, outer, tail
        self.pieces, self.whole = tuple(pieces), tuple(whole)


class KeepReplicated(Exception):
    """Raised by a rule that found a projection whose heads tp cannot split (fewer
    key/value heads than ranks): the pass restarts with that weight replicated; attention
    then takes each rank's key/value head group from the replicated value."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"keep {param} replicated: {reason}")
        self.param, self.reason = param, reason


class PlaceBuffer(Exception):
    """Raised by a rule that found a split value copied into a fresh buffer (a recurrent
    state made by ``torch.zeros`` and filled per step with head-split states): the pass
    restarts with that buffer made at its local shape, split like what fills it."""

    def __init__(self, node: str, placement):
        super().__init__(f"make buffer {node} {placement}")
        self.node, self.placement = node, placement


def buffer_key(name: str) -> str:
    """The seeds' key of a fresh buffer's placement (parameters are keyed by name)."""
    return f"buffer:{name}"


def rule(*targets):
    """Register the decorated function as the rule of each of ``targets``."""
    def register(fn: Callable) -> Callable:
        for t in targets:
            RULES[t] = fn
        return fn
    return register


def is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def find_rule(target) -> Optional[Callable]:
    fn = RULES.get(target)
    if fn is None and is_pointwise(target):
        fn = RULES["pointwise"]
    return fn


from . import attention, conv, einsum, gather, linear, other_dims, pointwise, reductions, shape, vocab  # noqa: E402,F401,E501

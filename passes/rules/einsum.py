"""``einsum`` with operands split on one shared index (attention heads written as an
einsum: ProphetNet's "bntc,bncs->bnts"). The split index must survive into the output:
each rank then computes its own slice of the result, and a replicated operand that has
the index is sliced to this rank's part. A split index that is summed over would leave
partial sums: refused (no einsum in the zoo needs it)."""
from __future__ import annotations

import torch

from ..sharding import PaddedShard, moved
from . import rule

aten = torch.ops.aten


def _parse(eq: str):
    lhs, _, out = eq.replace(" ", "").partition("->")
    return lhs.split(","), out


@rule(aten.einsum.default)
def einsum(rw, node):
    eq, operands = node.args[0], list(node.args[1])
    ins, out = _parse(eq)
    if "." in eq or not out or len(ins) != len(operands):
        rw.fail(node, f"einsum '{eq}' with sharded operands needs explicit indices and output")
    label, first = None, None
    for spec, a in zip(ins, operands):
        p = rw.placement_of(a)
        if p is None:
            continue
        if isinstance(p, PaddedShard) or len(spec) != a.meta["val"].dim():
            rw.fail(node, f"einsum operand {a.name} placed {p}")
        lab = spec[p.dim]
        if label is not None and (lab, moved(p, 0)) != (label, moved(first, 0)):
            rw.fail(node, f"einsum '{eq}': operands split on different indices "
                          f"({label} and {lab})")
        label, first = lab, p
    if label not in out:
        rw.fail(node, f"einsum '{eq}' sums over the split index '{label}' (partial sums)")
    args = []
    for spec, a in zip(ins, operands):
        v = rw.new(a)
        if rw.placement.get(v) is None and label in spec:
            shape = tuple(a.meta["val"].shape)
            j = spec.index(label)
            v = rw.localize(v, shape, moved(first, j), len(shape), node)
        elif rw.placement.get(v) is None:
            v = rw.f(v)
        args.append(v)
    return rw.emit(aten.einsum.default, (eq, args), dict(node.kwargs),
                   pl=moved(first, out.index(label)), like=node)


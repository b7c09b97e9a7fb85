"""``einsum`` with operands split on one shared index (attention heads written as an
einsum: ProphetNet's "bntc,bncs->bnts"). The split index must survive into the output:
each rank then computes its own slice of the result, and a replicated operand that has
the index is sliced to this rank's part. A split index summed over (XLNet's output
projection "ibnd,hnd->ibh", both operands split on the heads) leaves partial sums, summed
over tp at once (g), as a row-parallel linear's are."""
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
    lin = rw.analysis.linears.get(node)
    gathered = {}
    if lin is not None and rw.sp and rw.placement_of(operands[0]) is not None and \
            rw.placement_of(operands[1]) is not None and \
            ins[0][rw.placement_of(operands[0]).dim] not in ins[1]:
        # SP: the projection's input is sequence-split, its weight head-split: gather the
        # sequence (the block's row-parallel end reduce-scatters back to it)
        gathered[operands[0]] = rw.gathered(rw.new(operands[0]), node)
    label, first = None, None
    for spec, a in zip(ins, operands):
        if a in gathered:
            continue
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
    partial = label not in out
    if partial and not all(label not in spec or rw.placement_of(a) is not None
                           for spec, a in zip(ins, operands)):
        rw.fail(node, f"einsum '{eq}' sums over the split index '{label}' of some operands "
                      "only")
    args = []
    for spec, a in zip(ins, operands):
        v = gathered.get(a, rw.new(a))
        if rw.placement.get(v) is None and label in spec:
            shape = tuple(a.meta["val"].shape)
            j = spec.index(label)
            v = rw.localize(v, shape, moved(first, j), len(shape), node)
        elif rw.placement.get(v) is None:
            v = rw.f(v)
        args.append(v)
    if partial:   # every rank's share of the sum (a row-parallel einsum): g
        local = rw.emit(aten.einsum.default, (eq, args), dict(node.kwargs), pl=None, like=node)
        return rw.reduce_partial(local, node, scatter=lin is not None)
    return rw.emit(aten.einsum.default, (eq, args), dict(node.kwargs),
                   pl=moved(first, out.index(label)), like=node)


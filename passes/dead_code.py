"""Drop what the loss never reads.

A model may compute values its causal-LM loss never uses (BigBird's pooler: a linear and
a tanh whose result the graph drops). Left in, they cost time, and their weights look
used, so tensor parallelism would keep them whole on every rank. Guarantees afterwards:
every call whose result nobody reads is gone, except ops that mutate, draw random
numbers (so the random stream matches the model run eagerly) or are not ATen ops;
export's metadata asserts go with the value they check. Returns a copy.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import readers

aten = torch.ops.aten


def _removable(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:
        return True
    t = n.target
    if not isinstance(t, torch._ops.OpOverload) or t._schema.is_mutable:
        return False
    return torch.Tag.nondeterministic_seeded not in t.tags


def eliminate_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    changed = True
    while changed:
        changed = False
        for n in reversed(list(g.nodes)):
            if _removable(n) and not readers(n) and \
                    n.target is not aten._assert_tensor_metadata.default:
                for u in list(n.users):      # its asserts
                    g.erase_node(u)
                g.erase_node(n)
                changed = True
    g.lint()
    return fx.GraphModule(gm, g)

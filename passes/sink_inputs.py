"""Sink input-only ops next to their first user.

Ops computed from graph inputs only (the tensor-parallel ``f`` on parameters, emitted
where the pass first met them, and its getitems) may sit far above the node that reads
them; then they are live across every layer boundary in between, and no cut there has a
single live activation. Regional compilation (``codegen/regional.py``) cuts the graph at
layer boundaries, so it first moves each such op right before its first user. A transform
of the graph, hence a pass; it returns a copy and leaves its input unchanged.
"""
from __future__ import annotations

import torch.fx as fx


def sink_input_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` in which every op computed from graph inputs only (e.g. the tensor-
    parallel ``f`` on parameters, emitted where the pass first met them, and its getitems)
    sits right before its first user, so it is not live across earlier layer boundaries."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    order = {x: float(i) for i, x in enumerate(g.nodes)}
    from_inputs: list = []
    seen = set()
    for n in g.nodes:
        if n.op == "call_function" and n.all_input_nodes and all(
                a.op == "placeholder" or a in seen for a in n.all_input_nodes):
            seen.add(n)
            from_inputs.append(n)
    for n in reversed(from_inputs):       # users first, so chains move together
        if not n.users:
            continue
        first = min(n.users, key=order.__getitem__)
        if first.op != "output" and order[first] > order[n] + 1:
            first.prepend(n)
            order = {x: i for i, x in enumerate(g.nodes)}
    g.lint()
    return fx.GraphModule(gm, g)

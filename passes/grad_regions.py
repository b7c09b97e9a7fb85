"""Inline ``torch.no_grad()`` / ``torch.enable_grad()`` regions.

``torch.export`` keeps a region run under ``set_grad_enabled`` as one higher-order op,
``wrap_with_set_grad_enabled(enabled, submodule, *operands)``, whose body the sharding
rules cannot see (a DeepSeek-V3.2 / HY-V4 indexer, HRM's cycles run without gradient).
Guarantees afterwards: no such op is left; each region's body is in the graph in its
place, and for a region without gradient every value it returns is ``detach``-ed, so no
gradient flows into it (what ``no_grad`` meant); a region with gradient inside a training
step (``enable_grad``) is inlined as is. Node metadata (values, source lines) comes with
the body. Returns a copy.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten


def _is_grad_region(n: fx.Node) -> bool:
    return n.op == "call_function" and \
        type(n.target).__name__ == "WrapWithSetGradEnabled"


def inline_grad_regions(gm: fx.GraphModule) -> fx.GraphModule:
    if not any(_is_grad_region(n) for n in gm.graph.nodes):
        return gm
    g = fx.Graph()
    env: dict = {}
    for n in gm.graph.nodes:
        if not _is_grad_region(n):
            env[n] = g.node_copy(n, lambda a: env[a])
            continue
        enabled, body = n.args[0], getattr(gm, n.args[1].target)
        inner = dict(zip(body.graph.find_nodes(op="placeholder"),
                         [env[a] if isinstance(a, fx.Node) else a for a in n.args[2:]]))
        outs = None
        for m in body.graph.nodes:
            if m.op == "placeholder":
                continue
            if m.op == "output":
                outs = m.args[0]
                break
            inner[m] = g.node_copy(m, lambda a: inner[a])
        outs = fx.node.map_arg(outs, lambda a: inner[a])
        if not enabled:
            def detached(v):
                if not isinstance(v, fx.Node) or not isinstance(v.meta.get("val"), torch.Tensor):
                    return v
                d = g.call_function(aten.detach.default, (v,))
                d.meta = {**v.meta, "val": v.meta["val"].detach()}
                return d
            outs = fx.node.map_aggregate(outs, detached)
        env[n] = outs
    # the region's tuple is read through getitem: read the element itself
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is operator.getitem and \
                isinstance(n.args[0], (tuple, list)):
            n.replace_all_uses_with(n.args[0][n.args[1]])
            g.erase_node(n)
    for n in list(g.nodes):   # the bodies' get_attr nodes, now unread
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    g.lint()
    return fx.GraphModule(gm, g)

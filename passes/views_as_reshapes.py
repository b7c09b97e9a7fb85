"""Let every ``aten.view`` of an AOTAutograd graph run on whatever strides its input has.

AOTAutograd traces forward and backward with fake tensors, and a few ATen kernels return
strides that differ from their meta functions (e.g. ``softplus_backward`` of a transposed
input keeps the input's layout at run time; pytorch/pytorch#120035). Inductor re-derives
layouts and never notices; ``aot_eager`` runs the traced graph op by op, so a
``view`` recorded as legal on the fake strides raises on the real ones. Six transformers
families (Qwen3-Next, Qwen3.5, OLMo-Hybrid, Doge, ...) crash this way even on one device
under ``torch.compile(backend="aot_eager")``.

The graphs AOTAutograd hands to its compilers are functional: no op writes through a
view, so a ``reshape`` (a view where the strides allow, otherwise a copy) computes the same
values as the ``view`` it replaces.
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten


def views_as_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself, with every ``aten.view.default`` / ``aten._unsafe_view.default`` call
    replaced by ``aten.reshape.default`` on the same arguments. Afterwards the graph runs
    for any input strides and returns the same values. Only for functional graphs (what
    AOTAutograd passes to ``fw_compiler`` / ``bw_compiler``)."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.view.default, aten._unsafe_view.default):
            n.target = aten.reshape.default
            changed = True
    if changed:
        gm.recompile()
    return gm

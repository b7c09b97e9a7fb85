"""How much each microbatch's loss weighs in the global-batch loss, from dataflow.

A token-mean loss (``cross_entropy``/``nll_loss`` with ``reduction='mean'``) over
microbatches and data-parallel ranks is only the full-batch loss when each part is
weighted by its number of counted targets (those ≠ ``ignore_index``). This pass
finds the loss node and builds a small graph that computes that count from the
*user inputs alone*, so the runtime can evaluate it for every microbatch before
the first backward (1F1B runs a backward before the last forward).

Guarantees afterwards: ``LossWeight.kind`` is ``"target_count"`` (with a graph
``user inputs -> count``), ``"numel"`` (the loss is a plain mean; count is the
number of averaged elements, a constant for equal microbatches), or ``"equal"``
(unknown reduction: microbatches weigh the same, exact for equal-sized
per-sample means). The input graph is not modified.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

# ops that pass a scalar loss through unchanged in meaning (casts, views)
_TRANSPARENT = {aten.view.default, aten.reshape.default, aten.clone.default, aten.alias.default,
                aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.squeeze.default,
                aten.contiguous.default}
_TOKEN_LOSSES = {aten.cross_entropy_loss.default: (3, 4), aten.nll_loss.default: (3, 4),
                 aten.nll_loss_nd.default: (3, 4)}  # op -> (reduction arg index, ignore idx)


@dataclasses.dataclass
class LossWeight:
    kind: str                                  # target_count | numel | equal
    loss_node: str
    count_graph: Optional[fx.GraphModule] = None
    numel: int = 1
    ignore_index: Optional[int] = None

    def count(self, user_inputs: list):
        """This microbatch's weight count: a float64 tensor on the targets' device for
        ``target_count`` (never read back to the host, which would stall a GPU every
        step), else a Python number."""
        if self.kind == "target_count":
            return self.count_graph(*user_inputs).to(torch.float64)
        return float(self.numel)

    def describe(self) -> str:
        if self.kind == "target_count":
            return (f"token-mean loss ({self.loss_node}): microbatches and dp ranks weighted by "
                    f"their count of targets != {self.ignore_index}")
        if self.kind == "numel":
            return f"mean loss ({self.loss_node}) over {self.numel} elements: weighted by element count"
        return f"loss ({self.loss_node}) of unknown reduction: microbatches weighted equally"


def _arg(node, i, default):
    if len(node.args) > i:
        return node.args[i]
    return default


def find_loss_weight(gm: fx.GraphModule) -> LossWeight:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    loss = out.args[0][0]
    node = loss
    while node.op == "call_function" and node.target in _TRANSPARENT:
        node = node.args[0]
    if node.op == "call_function" and node.target in _TOKEN_LOSSES:
        red_i, ign_i = _TOKEN_LOSSES[node.target]
        reduction = node.kwargs.get("reduction", _arg(node, red_i, 1))
        ignore = node.kwargs.get("ignore_index", _arg(node, ign_i, -100))
        has_weight = node.kwargs.get("weight", _arg(node, 2, None)) is not None
        if reduction == 1 and not has_weight:
            cg = _count_graph(gm, node.args[1], ignore)
            if cg is not None:
                return LossWeight("target_count", node.name, cg, ignore_index=ignore)
    if node.op == "call_function" and node.target in (aten.mean.default, aten.mean.dim):
        val = node.args[0].meta.get("val")
        res = node.meta.get("val")
        if val is not None and res is not None and res.numel() == 1:
            return LossWeight("numel", node.name, numel=math.prod(val.shape))
    return LossWeight("equal", node.name)


def _count_graph(gm: fx.GraphModule, target: fx.Node, ignore_index: int) -> Optional[fx.GraphModule]:
    """Copy the cone of ``target`` (it must depend on user inputs only) into
    ``(*user inputs) -> (target != ignore_index).sum()``."""
    from ptdp_compiler.graph_utils import ancestors
    cone = ancestors([target])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    g = fx.Graph()
    env = {}
    for p in placeholders:
        if p.meta.get("ptdp_input_kind") == "user":
            env[p] = g.placeholder(p.name)
    for n in gm.graph.nodes:
        if n not in cone or n.op == "placeholder":
            if n.op == "placeholder" and n in cone and n not in env:
                return None  # the target depends on a parameter or buffer: not a label tensor
            continue
        if n.op != "call_function":
            return None
        env[n] = g.node_copy(n, lambda a: env[a])
    ne = g.call_function(aten.ne.Scalar, (env[target], ignore_index))
    g.output(g.call_function(aten.sum.default, (ne,)))
    return fx.GraphModule(gm, g)

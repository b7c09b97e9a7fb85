"""Regional compilation: compile each distinct layer once and reuse its compiled code.

A transformer's forward graph is a chain of structurally identical layers. Compiling
the whole graph makes AOTAutograd + Inductor work grow with depth; compiling one
*region* per distinct layer shape makes it grow with the number of distinct shapes.

How the graph is cut. ``graph_utils.legal_cuts`` lists the positions after which
exactly one activation (the residual stream) is live; among those we keep the ones where
the enclosing layer changes (``graph_utils.layer_key``, or "outside any layer" for
embedding / final norm / head). Values computed only
from the inputs (masks, position ids, rotary tables) are recomputed inside every region
that needs them (that is how ``pipeline_split`` builds chunks), so every middle layer's
region has the same structure.

How regions are matched. ``region_key`` hashes a region's graph by structure only:
op targets, argument wiring by position, Python constants, fake-value shapes / strides /
dtypes, input ``requires_grad``, and recompute tags (``node.meta["recompute"]``) — not
node names and not parameter identities, so layer 3 and layer 17 share a key. One
compiled callable per key is built; all regions with that key call it with their own
inputs (parameters are graph inputs, so the code is weight-agnostic).

Execution. The regions run in order inside one Python function; each compiled region
is an autograd Function, so autograd links their backward passes and the result is
differentiable exactly like the whole-graph compile. Regions keep ``node.meta``
(``fx.Graph.node_copy``), so recompute tags reach the partitioner.

``PTDP_REGIONAL=0`` (or ``set_regional(False)``) turns regional compilation off.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Callable, Optional

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import layer_key, legal_cuts

_OVERRIDE: Optional[bool] = None

# Per-process counters a test or benchmark can read: regions seen, distinct ones compiled.
regional_stats = collections.Counter()


def set_regional(enabled: Optional[bool]) -> None:
    """Force regional compilation on/off for this process (None: follow PTDP_REGIONAL)."""
    global _OVERRIDE
    _OVERRIDE = enabled


def regional_enabled() -> bool:
    if _OVERRIDE is not None:
        return _OVERRIDE
    return os.environ.get("PTDP_REGIONAL", "1").lower() not in ("0", "false", "off", "no")


# ---- cutting -------------------------------------------------------------------------------
_OUTSIDE = "<outside any layer>"


def _region_labels(nodes: list) -> list:
    """Per compute node: the layer it belongs to (``graph_utils.layer_key``), _OUTSIDE for
    nodes in no layer, and — for nodes the passes inserted without module metadata (an
    ``f`` on a parameter) — the label of the next node that has some."""
    labels: list = [None] * len(nodes)
    for i, n in enumerate(nodes):
        if n.meta.get("nn_module_stack"):
            labels[i] = layer_key(n) or _OUTSIDE
    nxt = _OUTSIDE
    for i in range(len(nodes) - 1, -1, -1):
        if labels[i] is None:
            labels[i] = nxt
        else:
            nxt = labels[i]
    return labels


def layer_cuts(gm: fx.GraphModule) -> list:
    """Names of the compute nodes after which the graph is cut into per-layer regions."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    labels = _region_labels(nodes)
    return [nodes[i].name for i, _live in legal_cuts(gm) if labels[i] != labels[i + 1]]


# ---- structural key ------------------------------------------------------------------------
def _val_sig(v):
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), tuple(v.stride()), str(v.dtype), v.device.type)
    if isinstance(v, (list, tuple)):
        return tuple(_val_sig(x) for x in v)
    return repr(type(v).__name__)


def _const_sig(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, fx.GraphModule):
        return ("graph", obj.code)
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes()).hexdigest() \
            if data.numel() else ""
        return ("tensor", tuple(obj.shape), str(obj.dtype), digest)
    return ("obj", type(obj).__name__, repr(obj))


def region_key(gm: fx.GraphModule, input_requires_grad: list) -> str:
    """A structural hash of ``gm``: equal for two layers that compile to the same code."""
    index: dict = {}
    parts = []

    def arg(a):
        if isinstance(a, fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__,) + tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return ("dict",) + tuple((k, arg(v)) for k, v in sorted(a.items()))
        if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(a)
        return repr(a)

    rg = iter(input_requires_grad)
    for n in gm.graph.nodes:
        index[n] = len(index)
        if n.op == "placeholder":
            item = ("in", _val_sig(n.meta.get("val")), next(rg, None))
        elif n.op == "get_attr":
            item = ("const", _const_sig(gm, n.target))
        elif n.op == "output":
            item = ("out", arg(n.args))
        else:
            item = (n.op, str(n.target), arg(n.args), arg(n.kwargs), _val_sig(n.meta.get("val")),
                    str(n.meta.get("recompute")))
        parts.append(repr(item))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ---- compile and run -----------------------------------------------------------------------
@dataclasses.dataclass
class Region:
    gm: fx.GraphModule
    inputs: list          # ("graph", index into the whole graph's inputs) | ("boundary", i)
    key: str
    fn: Callable = None


def example_tensor(node: fx.Node, requires_grad: bool) -> torch.Tensor:
    """A real tensor with the fake value's shape, strides and dtype (compile-time example)."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"region boundary {node.name} has no tensor value in node.meta['val']")
    t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype,
                            device=v.device if v.device.type != "meta" else "cpu").zero_()
    return t.requires_grad_(requires_grad and v.dtype.is_floating_point)


def split_regions(gm: fx.GraphModule, example_inputs: list) -> list:
    """Cut ``gm`` at layer boundaries; each region records where its inputs come from."""
    from ptdp_compiler.passes.pipeline_split import build_chunks
    from ptdp_compiler.passes.sink_inputs import sink_input_ops
    gm = sink_input_ops(gm)
    cuts = layer_cuts(gm)
    if not cuts:
        return []
    chunks = build_chunks(gm, cuts).chunks
    ph_index = {n.name: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    regions = []
    prev_rg: list = []   # requires_grad of the previous region's outputs
    for ch in chunks:
        rg, inputs = [], []
        for kind, name in ch.inputs:
            if kind == "graph":
                i = ph_index[name]
                inputs.append(("graph", i))
                x = example_inputs[i]
                rg.append(bool(isinstance(x, torch.Tensor) and x.requires_grad))
            else:
                inputs.append(("boundary", name))
                rg.append(prev_rg[name])
        # an output needs grad when any input does (the residual stream depends on weights)
        prev_rg = [any(rg)] * ch.num_boundary_out
        regions.append(Region(ch.gm, inputs, region_key(ch.gm, rg)))
    return regions


def compile_regional(gm: fx.GraphModule, example_inputs: list, codegen: str,
                     compile_one: Callable):
    """Like ``compile_one(gm, example_inputs, codegen)`` but compiling each distinct layer
    region once. Falls back to ``compile_one`` on the whole graph when the graph has fewer
    than two regions."""
    regions = split_regions(gm, example_inputs)
    if len(regions) < 2:
        return compile_one(gm, example_inputs, codegen)
    from ptdp_compiler import progress
    compiled: dict = {}
    boundary_examples: list = []
    distinct = len({r.key for r in regions})
    for r in regions:
        args = [example_inputs[i] if kind == "graph" else boundary_examples[i]
                for kind, i in r.inputs]
        if r.key not in compiled:
            with progress.phase(f"region {len(compiled) + 1}/{distinct}") as info:
                before = progress.cache_counts()
                compiled[r.key] = compile_one(r.gm, args, codegen)
                info["note"] = progress.cache_note(before)
        r.fn = compiled[r.key]
        out_node = next(iter(r.gm.graph.find_nodes(op="output")))
        rg = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        boundary_examples = [example_tensor(o, rg) if isinstance(o, fx.Node) else o
                             for o in out_node.args[0]]
    regional_stats["regions"] += len(regions)
    regional_stats["distinct_regions"] += len(compiled)
    return RegionalProgram(regions, len(compiled))


class RegionalProgram:
    """Calls the compiled regions in order; autograd links their backward passes."""

    def __init__(self, regions: list, num_distinct: int):
        self.regions = regions
        self.num_distinct = num_distinct

    def __call__(self, *inputs) -> list:
        boundary: list = []
        for r in self.regions:
            args = [inputs[i] if kind == "graph" else boundary[i] for kind, i in r.inputs]
            boundary = list(r.fn(*args))
        return boundary

    def describe(self) -> str:
        return f"{len(self.regions)} regions, {self.num_distinct} distinct compiled"

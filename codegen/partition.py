"""The forward/backward partition: AOTAutograd's min-cut partitioner, honouring the
``node.meta["recompute"]`` tags the recompute pass wrote (``CheckpointPolicy``).

Why a custom partitioner object and not just the tags: the tags are not part of
AOTAutograd's cache key, so a graph compiled untagged (or tagged differently) would be
silently reused from the autograd cache. ``TaggedPartitioner.uuid()`` is a digest of
the tags, which Inductor folds into the cache key; ``aot_eager`` takes the same
partitioner directly, so both code generators cut the joint graph the same way.

Tags reach the joint graph because AOTAutograd copies ``recompute``, ``ac_graph_id``
and ``custom`` from each captured node onto every ATen node it traces from it.
Recomputed random ops (dropout) are replayed from a saved RNG state by the partitioner
(``functionalize_rng_ops``), so a recomputed mask equals the forward's.

``partition_report`` records, per compile, what the forward saved for backward:
``(joint node, bytes, captured node it came from)`` — the captured node is the one
that produced the saved tensor's storage (views are followed to their base).
"""
from __future__ import annotations

import hashlib
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

# one entry per partition: list of (joint node name, bytes, captured node name or None)
partition_report: list = []

ORIGIN_KEY = "ptdp_node"   # node.meta["custom"][ORIGIN_KEY]: the captured node's name


def concrete(x) -> int:
    """An int for a possibly symbolic size (its hint: the size the graph was traced at)."""
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint) if hint is not None else int(x)
    return int(x)


def tag_digest(gm: fx.GraphModule) -> str:
    """Digest of every node's recompute tag (position-based, so equal layers agree)."""
    h = hashlib.sha1()
    for i, n in enumerate(gm.graph.nodes):
        tag = n.meta.get("recompute")
        if tag is not None:
            h.update(f"{i}:{tag}:{n.meta.get('ac_graph_id')};".encode())
    return h.hexdigest()


def free_pointwise(gm: fx.GraphModule) -> bool:
    """Did the recompute pass leave values to the partitioner (PREFER_SAVE tags)?"""
    from torch.utils.checkpoint import CheckpointPolicy
    return any(n.meta.get("recompute") == CheckpointPolicy.PREFER_SAVE for n in gm.graph.nodes)


class TaggedPartitioner(CustomPartitionerFn):
    """Min-cut partition that honours recompute tags; its uuid covers the tags."""

    def __init__(self, digest: str, free_pointwise: bool = False):
        self.digest, self.free_pointwise = digest, free_pointwise

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs: Any):
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        kwargs.setdefault("compiler", "inductor")
        import torch._functorch.config as fc
        # PREFER_SAVE values (recompute_pointwise): the partitioner may recompute a cheap
        # pointwise op even where backward needs its output materialised (GeLU feeding the
        # next weight-gradient matmul), which its default heuristic forbids: one fused
        # kernel then recomputes it and computes its gradient, and forward keeps only its
        # input — as torch.compile's partition does when a no-op dropout hides the matmul
        with fc.patch(ban_recompute_materialized_backward=not self.free_pointwise):
            fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        partition_report.append(saved_values(fw, kwargs.get("num_fwd_outputs", 1)))
        return fw, bw

    def uuid(self) -> Optional[Any]:
        return ("ptdp-recompute-partition", 2, self.digest, self.free_pointwise)


aten = torch.ops.aten
# ops whose output shares its input's storage (any overload)
_VIEWS = frozenset({aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.t,
                    aten.permute, aten.expand, aten.slice, aten.select, aten.unsqueeze,
                    aten.squeeze, aten.as_strided, aten.alias, aten.split,
                    aten.split_with_sizes, aten.unbind, aten.chunk, aten.detach, aten.narrow,
                    aten.diagonal, aten.unflatten, aten.flatten})


def _is_view(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and \
        getattr(n.target, "overloadpacket", None) in _VIEWS


def _base(n: fx.Node) -> fx.Node:
    """The node that owns the storage ``n`` views (getitems of multi-outputs are their own)."""
    while n.op == "call_function":
        if _is_view(n) and n.args and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        elif n.target is operator.getitem and _is_view(n.args[0]):
            n = n.args[0].args[0]
        else:
            break
    return n


def saved_values(fw: fx.GraphModule, num_fwd_outputs: int) -> list:
    """The forward graph's saved tensors (outputs past the user outputs), deduplicated by
    storage base, parameters and other graph inputs left out."""
    out = next(iter(fw.graph.find_nodes(op="output")))
    rows, seen = [], set()
    for a in out.args[0][num_fwd_outputs:]:
        if not isinstance(a, fx.Node):
            continue
        b = _base(a)
        v = b.meta.get("val")
        if b.op == "placeholder" or b in seen or not isinstance(v, torch.Tensor):
            continue
        seen.add(b)
        origin = (b.meta.get("custom") or {}).get(ORIGIN_KEY)
        rows.append((b.name, concrete(v.numel()) * v.element_size(), origin))
    return rows


def aot_partition_kwargs(gm: fx.GraphModule, codegen: str) -> dict:
    """Keyword arguments that make ``compile_fx`` (inductor) or ``aot_module_simplified``
    (aot_eager) partition with the tags of ``gm``."""
    part = TaggedPartitioner(tag_digest(gm), free_pointwise(gm))
    if codegen == "inductor":
        return {"config_patches": {"custom_partitioner_fn": part}}
    return {"partition_fn": part}


def trial_partition(gm: fx.GraphModule) -> list:
    """Partition ``gm`` with its current tags on fake inputs (no kernels run) and return
    its ``saved_values`` rows. The recompute pass uses it to cost alternatives."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    phs = list(gm.graph.find_nodes(op="placeholder"))
    mode = detect_fake_mode([p.meta.get("val") for p in phs]) or FakeTensorMode()
    inputs = []
    with mode:
        for p in phs:
            v = p.meta["val"]
            x = torch.empty_strided([concrete(d) for d in v.shape],
                                    [concrete(d) for d in v.stride()], dtype=v.dtype,
                                    device=v.device)
            if p.meta.get("ptdp_input_kind") == "param" and v.dtype.is_floating_point:
                x.requires_grad_(True)
            inputs.append(x)
    before = len(partition_report)
    part = TaggedPartitioner(tag_digest(gm), free_pointwise(gm))

    def nop(g, _inputs):
        return make_boxed_func(g.forward)

    with mode:
        aot_module_simplified(gm, inputs, fw_compiler=nop, bw_compiler=nop, partition_fn=part)
    rows = partition_report[before:]
    del partition_report[before:]
    return rows[0] if rows else []

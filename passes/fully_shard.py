"""Fully sharded data parallelism (ZeRO-3 / FSDP) as a graph pass, after SimpleFSDP (Zhang
et al. 2024): the all-gathers are in the compiled graph, so AOTAutograd derives their
reduce-scatters and the compiler may reorder them.

Every parameter this rank holds (its tp shard when tp > 1) is stored flat and split over
the ``dp_shard`` ranks: rank r keeps elements ``[r·s, (r+1)·s)`` of the flattened tensor,
``s = ceil(numel / dp_shard)``, zero-padded at the end. In the graph each parameter
placeholder becomes that shard, and per *bucket* — the parameters one layer reads (the
region before the first layer and after the last are buckets of their own) — one node
sequence rebuilds the full tensors just before the bucket's first use::

    cat(shards) -> all_gather_into_tensor (autograd) -> wait_tensor -> view(n, Σs)
      -> split_with_sizes(dim=1) -> per parameter: reshape(-1)[:numel].view(shape)

The functional all-gather's autograd is a reduce-scatter (sum), so backward produces
each shard's gradient summed over dp_shard with ONE reduce-scatter per bucket; the
cat's backward splits it. A parameter read in several buckets (tied embedding / LM head)
belongs to the first: it is gathered and reduce-scattered once, and the full weight of
that gather serves its later readers too (with ``reshard_after_forward`` it is alive from
the embedding to the head, as FSDP2 keeps its root's parameters; recomputed once in
backward). So the bytes per step are exactly (n−1)/n·P per all-gather / reduce-scatter.

Memory: the gathered weights are tagged MUST_RECOMPUTE (``reshard_after_forward=True``,
FSDP2's default): the partitioner frees them after their layer's forward and re-gathers
them in backward, so a rank holds its 1/dp_shard of parameters, gradients and optimizer
state plus about one bucket's full weights. ``reshard_after_forward=False`` keeps them
for backward (ZeRO-2-like: no second all-gather, full weights live across the step).

Overlap: with ``prefetch`` each bucket's all-gather is issued before the previous
bucket's compute and waited just before its own first use, so it runs while the previous
layer computes (functional collectives are asynchronous until ``wait_tensor``).

Guarantees afterwards: no parameter placeholder is read except by the bucket gathers;
every placeholder's ``meta["val"]`` has the flat shard's shape; inserted nodes carry
``recompute`` / ``ac_graph_id`` tags and ``meta["ptdp"]["fsdp_bucket"]``; the plan's
``ParamPlan.fsdp_numel`` gives each parameter's shard length. Runs on each pipeline
chunk's graph (pp > 1), so a bucket never spans a pipeline cut.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ptdp_compiler.placement import CollectivePlan

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
_c10d_ag = torch.ops._c10d_functional_autograd


def shard_numel(numel: int, n: int) -> int:
    return -(-numel // n)


def shard_flat(t: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """Rank r's flat, zero-padded 1/n of ``t`` (a contiguous copy)."""
    s = shard_numel(t.numel(), n)
    flat = t.detach().reshape(-1)
    out = torch.zeros(s, dtype=t.dtype, device=t.device)
    lo, hi = min(r * s, flat.numel()), min((r + 1) * s, flat.numel())
    out[:hi - lo] = flat[lo:hi]
    return out


def unshard_flat(pieces: list, shape) -> torch.Tensor:
    """The tensor of ``shape`` from every rank's flat shard, in rank order."""
    return torch.cat([p.reshape(-1) for p in pieces])[:math.prod(shape)].view(shape)


def _bucket_keys(gm: fx.GraphModule) -> dict:
    """node -> bucket key: the layer (``ac_graph_id`` from the recompute pass), with the
    nodes outside every layer split into the region before the first layer and after."""
    keys, seen_layer = {}, False
    last_layer = max((n.meta.get("ac_graph_id", 0) for n in gm.graph.nodes
                      if n.op == "call_function" and n.meta.get("ac_graph_id", 0) < 1 << 30),
                     default=0)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        lid = n.meta.get("ac_graph_id", 0)
        if lid >= 1 << 30:   # computed from inputs only: no layer
            lid = 0
        if lid:
            seen_layer = True
            keys[n] = lid
        else:
            keys[n] = -1 if not seen_layer else last_layer + 1
    return keys


def fully_shard_graph(gm: fx.GraphModule, n: int, group_name: str, plan,
                      reshard_after_forward: bool = True, prefetch: bool = True) -> list:
    """Rewrite ``gm`` in place (see the module doc); returns the buckets as
    ``[(key, [param names], gathered bytes)]`` in graph order."""
    graph = gm.graph
    keys = _bucket_keys(gm)
    order = {node: i for i, node in enumerate(graph.nodes)}
    params = [ph for ph in graph.find_nodes(op="placeholder")
              if ph.meta.get("ptdp_input_kind") == "param"]
    # bucket -> {placeholder: [its users]}. A parameter read in several buckets (a tied
    # embedding / LM head) is gathered once, in the bucket that reads it first, and its
    # later readers use that gather: one all-gather and one reduce-scatter per parameter
    buckets: dict = {}
    for ph in params:
        if not ph.users:
            continue
        first = min(ph.users, key=order.__getitem__)
        buckets.setdefault(keys.get(first, -1), {})[ph] = list(ph.users)
    out = []
    policy = CheckpointPolicy.MUST_RECOMPUTE if reshard_after_forward else \
        CheckpointPolicy.MUST_SAVE
    first_use = {k: min((u for us in b.values() for u in us), key=order.__getitem__)
                 for k, b in buckets.items()}
    ordered = sorted(buckets, key=lambda k: order[first_use[k]])
    # a pipeline chunk's placeholders may sit between compute nodes: move them all to the
    # front (their relative order, the chunk's signature, is kept), so gathers can go anywhere
    phs_all = list(graph.find_nodes(op="placeholder"))
    head = next((n for n in graph.nodes if n.op != "placeholder"), None)
    if head is not None:
        for ph in phs_all:
            if order[ph] > order[head]:
                head.prepend(ph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    after_inputs = phs_all[-1].next
    issue_at = {}   # bucket -> the node before which its all-gather is issued
    for i, k in enumerate(ordered):
        at = first_use[ordered[i - 1]] if prefetch and i > 0 else first_use[k]
        issue_at[k] = max(at, after_inputs, key=order.__getitem__)
    for k in ordered:
        b = buckets[k]
        phs = sorted(b, key=order.__getitem__)
        vals = [ph.meta["val"] for ph in phs]
        sizes = [shard_numel(v.numel(), n) for v in vals]
        lid = first_use[k].meta.get("ac_graph_id", 0)
        new = []

        def call(target, *args, _new=new):
            node = graph.call_function(target, args)
            _new.append(node)
            return node
        with graph.inserting_before(issue_at[k]):
            flat = call(aten.cat.default, list(phs)) if len(phs) > 1 else phs[0]
            ag = call(_c10d_ag.all_gather_into_tensor.default, flat, n, group_name)
        with graph.inserting_before(max(first_use[k], after_inputs, key=order.__getitem__)):
            full = call(_c10d.wait_tensor.default, ag)
            rows = call(aten.view.default, full, [n, sum(sizes)])
            parts = call(aten.split_with_sizes.default, rows, sizes, 1)
            for j, (ph, v) in enumerate(zip(phs, vals)):
                piece = call(operator.getitem, parts, j)
                flat_j = call(aten.reshape.default, piece, [n * sizes[j]])
                if n * sizes[j] != v.numel():
                    flat_j = call(aten.slice.Tensor, flat_j, 0, 0, v.numel())
                w = call(aten.view.default, flat_j, list(v.shape))
                w.meta["val"] = v
                for u in b[ph]:
                    u.replace_input_with(ph, w)
        for node in new:
            node.meta["recompute"] = policy
            node.meta["ac_graph_id"] = lid
            node.meta.setdefault("ptdp", {})["fsdp_bucket"] = str(k)
            node.meta.setdefault("custom", {})["ptdp_node"] = node.name
        elem = vals[0].element_size()
        out.append((k, [ph.meta["ptdp_input_name"] for ph in phs], n * sum(sizes) * elem))
    for ph in params:
        v = ph.meta["val"]
        name = ph.meta["ptdp_input_name"]
        s = shard_numel(v.numel(), n)
        plan.params[name].fsdp_numel = s
        ph.meta["ptdp_fsdp_full_val"] = v
        ph.meta["val"] = v.new_empty((s,))
    graph.lint()
    gm.recompile()
    _refresh_vals(gm)
    return out


def _refresh_vals(gm: fx.GraphModule):
    """Fill ``meta["val"]`` of the inserted nodes (later passes and the memory model read
    shapes from it) by propagating fake tensors of the placeholders' values."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        v = ph.meta.get("val")
        inputs.append(mode.from_tensor(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype))
                      if isinstance(v, torch.Tensor) else v)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def fully_shard_pass(gms: list, cfg, coords, plan) -> None:
    """Apply ``fully_shard_graph`` to each graph of ``gms`` (the per-rank graph, or each
    pipeline chunk this rank runs) and record the collectives in the plan."""
    group = coords.group("dp_shard") if coords is not None else None
    group_name = group.group_name if group is not None else "dp_shard"
    n = cfg.dp_shard
    summary = []
    for gm in gms:
        for key, names, nbytes in fully_shard_graph(
                gm, n, group_name, plan, cfg.reshard_after_forward):
            sent = int((n - 1) * nbytes / n)
            again = 2 if cfg.reshard_after_forward else 1
            plan.collectives.append(CollectivePlan(
                "all_gather", "dp_shard", f"bucket {key} ({len(names)} parameters)",
                sent * again, f"{nbytes} bytes gathered per microbatch"
                + (", again in backward where backward reads the weights (an embedding's "
                   "gradient needs none: the bytes given are an upper bound)"
                   if again == 2 else "")
                + "; backward: one reduce-scatter of its gradients"))
            summary.append((key, len(names), nbytes))
            plan.fsdp_buckets.append((key, names, nbytes))
    total = sum(b for _, _, b in summary)
    plan.pass_log.append(("fully_shard", (
        f"dp_shard={n}: {len(summary)} buckets (one all-gather + one reduce-scatter each), "
        f"{total:,} bytes of full weights gathered per microbatch; "
        + ("re-gathered in backward where read" if cfg.reshard_after_forward else
           "kept for backward (reshard_after_forward=False)")
        + "; next bucket prefetched during the current one")))

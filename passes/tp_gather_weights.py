"""Large weights that tensor parallelism computes whole: stored split over tp, gathered
where they are read (ZeRO-3 over the tp group, for the leftovers only).

A weight matrix no sharding rule splits (``tp_coverage``'s *large* rows: >= 1 MiB or
>= 2% of the model, e.g. DeepSeek-V4's hyper-connection mixing weights, a norm over all
of a linear's features) is computed whole on every tp rank. Its compute has to stay
whole, its storage does not: rank r keeps the r-th block of rows (``Shard(d)``, the first
dimension t divides), and before each reader ``ptdp::sp_gather_whole`` all-gathers the
full weight. Its backward keeps this rank's rows of the full gradient and sends nothing:
that gradient is already complete and equal on every rank (the computation is
replicated, and where the weight meets a sharded value f's all-reduce has summed it).
The gather is re-run in backward (the recompute pass), so only the shard lives from
forward to backward, as FSDP does.

Cost: (t-1)/t of the weight's bytes all-gathered per microbatch, again in backward; in
return its parameter, gradient and optimizer state are 1/t per rank. The FLOPs stay whole:
``tp_coverage.check`` still names each such weight (warning, ``strict=True`` refuses).
``shard_replicated_weights=False`` keeps them whole instead (Megatron's behaviour).

Guarantees afterwards: each chosen parameter's placeholder is read only by its gathers
(one per former reader, inserted just before it, so a pipeline cut never carries a
gathered weight) and by dtype / device assertions; its ``plan.params`` placement / local shape are the stored split and
its coverage row says ``gathered``; gather nodes carry ``meta["ptdp"]["weight_gather"]``.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import readers
from ptdp_compiler.placement import CollectivePlan, Shard

from .sharding import local_shape

ROLE = "computed whole; stored split over tp and all-gathered where read"


def is_weight_gather(n: fx.Node) -> bool:
    return n.op == "call_function" and bool(n.meta.get("ptdp", {}).get("weight_gather"))


def _split_dim(shape, t: int):
    return next((d for d, s in enumerate(shape) if s % t == 0 and s >= t), None)


def gather_weights(gm: fx.GraphModule, rows: list, plan, t: int, rank: int, group_name: str,
                   skip_experts: bool = False) -> list:
    """Rewrite ``gm`` (this rank's tp graph) in place for the large replicated weights of
    ``rows`` (coverage rows, updated too); returns the names it split."""
    phs = {n.meta.get("ptdp_input_name"): n for n in gm.graph.find_nodes(op="placeholder")
           if n.meta.get("ptdp_input_kind") == "param"}
    done = []
    for row in rows:
        ph = phs.get(row.name)
        if not row.large or row.sharded or ph is None:
            continue
        if skip_experts and len(row.full_shape) > 2:   # routed experts: the ep pass's
            continue
        d = _split_dim(row.full_shape, t)
        if d is None:
            continue
        pl = Shard(d)
        pp = plan.params[row.name]
        users = readers(ph)   # a dtype / device assertion reads the shard, as for any split
        if not users:
            continue
        for user in users:
            with gm.graph.inserting_before(user):
                g = gm.graph.call_function(torch.ops.ptdp.sp_gather_whole.default,
                                           (ph, d, 1, group_name, t, rank))
            g.meta["ptdp"] = {"weight_gather": row.name, "role": ROLE}
            g.meta["ptdp_placement"] = None
            user.replace_input_with(ph, g)
        pp.placement, pp.local_shape = pl, tuple(local_shape(pp.full_shape, pl, t))
        pp.role = ROLE
        nbytes = row.local_bytes
        row.placement, row.gathered = pl, True
        row.local_bytes = nbytes * math.prod(pp.local_shape) // max(math.prod(pp.full_shape), 1)
        plan.collectives.append(CollectivePlan(
            "all_gather", "tp", f"weight {row.name} before each reader",
            nbytes * (t - 1) // t * 2 * len(users),
            "the whole weight for a computation no rule splits; again in backward "
            "(recomputed); backward keeps this rank's rows of the gradient, no send"))
        done.append(row.name)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def gather_pass(gm: fx.GraphModule, cfg, rank: int, group_name: str, plan) -> None:
    """``gather_weights`` on this rank's tp graph unless ``shard_replicated_weights`` is
    off; the routed experts are left to the ep pass when ep > 1."""
    if not getattr(cfg, "shard_replicated_weights", True):
        return
    done = gather_weights(gm, plan.coverage, plan, cfg.tp, rank, group_name,
                          skip_experts=getattr(cfg, "ep", 1) > 1)
    if done:
        plan.pass_log.append(("tp_gather_weights", (
            f"{len(done)} large weight(s) no rule splits stored split over tp and "
            "all-gathered where read (their compute stays whole): " + ", ".join(done))))

"""The pass pipeline, in order. Each pass takes the captured graph (and the plan so far)
and returns a graph, writing its decisions into the Plan and ``node.meta["ptdp"]``."""
from __future__ import annotations

import collections
import dataclasses

import torch.fx as fx

from ptdp_compiler.plan import CollectivePlan, ParamPlan, Plan

from .loss_weight import LossWeight, find_loss_weight


@dataclasses.dataclass
class Program:
    """The compiler's output for one input signature (before codegen)."""
    gm: fx.GraphModule
    plan: Plan
    loss_weight: LossWeight


def op_histogram(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run_passes(captured, cfg, coords, params: dict) -> Program:
    """captured graph → per-rank Program. ``params``: canonical name → local tensor."""
    plan = Plan()
    gm = captured.gm
    for name, p in params.items():
        plan.params[name] = ParamPlan(name, tuple(p.shape))
    lw = find_loss_weight(gm)
    plan.loss_weighting = lw.describe()
    plan.pass_log.append(("loss_weight", lw.describe()))
    if cfg.dp > 1:
        nbytes = sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
        plan.collectives.append(CollectivePlan(
            "all_reduce", "dp", "backward, per gradient bucket (overlapped)", 0,
            f"{nbytes} bytes of gradients per step"))
        plan.collectives.append(CollectivePlan(
            "all_reduce", "dp", "before the first forward", 8,
            "global count that weights each microbatch's loss"))
    return Program(gm=gm, plan=plan, loss_weight=lw)

"""The pass pipeline, in order. Each pass takes the captured graph (and the plan so far)
and returns a graph, writing its decisions into the Plan and ``node.meta["ptdp"]``.

    grad_regions       no_grad / enable_grad regions inlined (detached results)
    dead_code          drop what the loss never reads (a pooler the LM loss ignores)
    loss_weight        how each microbatch's loss weighs (reads the captured graph)
    analyze            column/row pairs, LM head, vocab embedding — from dataflow   (tp > 1)
                       (walk.py: the forward walk from each linear it reads)
    tensor_parallel    placements, f/g, shape rewrite (+ sequence_parallel rules)    (tp > 1)
                       (tp_gather_weights: large weights no rule splits stored split,
                       all-gathered where read)
    fake-tensor check  the per-rank graph re-run with FakeTensor at local shapes     (tp > 1)
    expert_parallel    routed experts -> all-to-all dispatch / combine over ep       (ep > 1)
    recompute          save / recompute tags for the partitioner
    pipeline_split     p·v chunks balanced by cost, boundary tensors, tied weights   (pp > 1)
    fully_shard        parameters split over dp_shard, gathered per layer in-graph  (dp_shard > 1)

``run_passes`` is called by ``ptdp_compiler.program.build_program`` only.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional

import torch.fx as fx

from ptdp_compiler.placement import CollectivePlan, ParamPlan, Plan

from .loss_weight import LossWeight, find_loss_weight
from .pipeline_split import SplitResult, pipeline_split_pass


@dataclasses.dataclass
class PassResult:
    """What the passes made of one input signature (before codegen)."""
    gm: fx.GraphModule
    plan: Plan
    loss_weight: LossWeight
    split: Optional[SplitResult] = None    # pipeline chunks (pp > 1)


def op_histogram(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run_passes(captured, cfg, coords, params: dict, full_shapes: dict | None = None,
               trial_partition: Optional[Callable] = None,
               ep_rows_scale: float = 1.0) -> PassResult:
    """captured graph → per-rank graph, plan and pipeline chunks. ``params``: canonical
    name → tensor (full shape or this rank's shard; ``full_shapes`` gives the full shapes
    when they differ). ``trial_partition(gm)``: codegen's partition of a tagged graph on
    fake inputs (what it saves for backward), which the recompute pass's budget mode
    costs its choices with."""
    plan = Plan()
    from .dead_code import eliminate_dead_code
    from .grad_regions import inline_grad_regions
    inlined = inline_grad_regions(captured.gm)
    if inlined is not captured.gm:
        plan.pass_log.append(("grad_regions", "no_grad / enable_grad regions inlined (their "
                              "results detached where gradients were off)"))
    gm = eliminate_dead_code(inlined)
    full_shapes = full_shapes or {n: tuple(p.shape) for n, p in params.items()}
    for name, p in params.items():
        plan.params[name] = ParamPlan(name, tuple(full_shapes[name]))
    lw = find_loss_weight(gm)
    if len(gm.graph.nodes) < len(inlined.graph.nodes):
        plan.pass_log.append(("dead_code", f"{len(inlined.graph.nodes) - len(gm.graph.nodes)}"
                              " op(s) the loss never reads dropped"))
    plan.loss_weighting = lw.describe()
    plan.pass_log.append(("loss_weight", lw.describe()))
    if getattr(cfg, "cp", 1) > 1:
        # before tp: tensor parallelism then splits a model of T/cp local tokens
        from .context_parallel import context_parallel_pass
        gm, lw = context_parallel_pass(gm, cfg, coords, plan, lw)
    if cfg.tp > 1:
        from .tensor_parallel import tensor_parallel_pass
        gm = tensor_parallel_pass(gm, cfg, coords, params, plan)
    if getattr(cfg, "ep", 1) > 1:
        from .expert_parallel import expert_parallel_pass
        gm = expert_parallel_pass(gm, cfg, coords, params, plan, ep_rows_scale)
    # recompute: tag nodes save / recompute for the partitioner
    from .recompute import recompute_pass
    gm, plan.recompute = recompute_pass(gm, cfg.recompute,
                                           cfg.sequence_parallel and cfg.sp_regather,
                                           pointwise=cfg.recompute_pointwise,
                                           trial=trial_partition)
    plan.pass_log.append(("recompute", plan.recompute.summary()))
    split = pipeline_split_pass(gm, cfg, plan) if cfg.pp > 1 else None
    if getattr(cfg, "dp_shard", 1) > 1:
        # per pipeline chunk, so that a gathered bucket never crosses a pipeline cut
        from .fully_shard import fully_shard_pass
        fully_shard_pass([gm] if split is None else [c.gm for c in split.chunks], cfg,
                         coords, plan)
    if cfg.dp > 1:
        nbytes = sum(math_prod(pp.local_shape or pp.full_shape) * params[n].element_size()
                     for n, pp in plan.params.items() if params[n].requires_grad)
        plan.collectives.append(CollectivePlan(
            "all_reduce", "dp", "backward, per gradient bucket (overlapped)", 0,
            f"{nbytes} bytes of gradients per step"))
        plan.collectives.append(CollectivePlan(
            "all_reduce", "dp", "before the first forward", 8,
            "global count that weights each microbatch's loss"))
    return PassResult(gm=gm, plan=plan, loss_weight=lw, split=split)


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

"""The pass pipeline, in order. Each pass takes the captured graph (and the plan so far)
and returns a graph, writing its decisions into the Plan and ``node.meta["ptdp"]``.

    loss_weight        how each microbatch's loss weighs (reads the captured graph)
    analyze            column/row pairs, LM head, vocab embedding — from dataflow   (tp > 1)
    tensor_parallel    placements, f/g, shape rewrite (+ sequence_parallel rules)    (tp > 1)
    fake-tensor check  the per-rank graph re-run with FakeTensor at local shapes     (tp > 1)
"""
from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx

from ptdp_compiler.placement import CollectivePlan, ParamPlan, Plan

from .loss_weight import LossWeight, find_loss_weight


@dataclasses.dataclass
class Program:
    """The compiler's output for one input signature (before codegen)."""
    gm: fx.GraphModule
    plan: Plan
    loss_weight: LossWeight


def op_histogram(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def run_passes(captured, cfg, coords, params: dict, full_shapes: dict | None = None) -> Program:
    """captured graph → per-rank Program. ``params``: canonical name → tensor (full shape
    or this rank's shard; ``full_shapes`` gives the full shapes when they differ)."""
    plan = Plan()
    gm = captured.gm
    full_shapes = full_shapes or {n: tuple(p.shape) for n, p in params.items()}
    for name, p in params.items():
        plan.params[name] = ParamPlan(name, tuple(full_shapes[name]))
    lw = find_loss_weight(gm)
    plan.loss_weighting = lw.describe()
    plan.pass_log.append(("loss_weight", lw.describe()))
    if cfg.tp > 1:
        gm = _tensor_parallel(gm, cfg, coords, params, plan)
    # ---- recompute (issue 4): tag nodes save / recompute for the partitioner -------------
    from .recompute import recompute_pass
    gm, plan.recompute = recompute_pass(gm, cfg.recompute,
                                           cfg.sequence_parallel and cfg.sp_regather,
                                           pointwise=cfg.recompute_pointwise)
    plan.pass_log.append(("recompute", plan.recompute.summary()))
    # ---- end recompute ---------------------------------------------------------------------
    if cfg.dp > 1:
        nbytes = sum(math_prod(pp.local_shape or pp.full_shape) * params[n].element_size()
                     for n, pp in plan.params.items() if params[n].requires_grad)
        plan.collectives.append(CollectivePlan(
            "all_reduce", "dp", "backward, per gradient bucket (overlapped)", 0,
            f"{nbytes} bytes of gradients per step"))
        plan.collectives.append(CollectivePlan(
            "all_reduce", "dp", "before the first forward", 8,
            "global count that weights each microbatch's loss"))
    return Program(gm=gm, plan=plan, loss_weight=lw)


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_parallel(gm, cfg, coords, params, plan):
    from ptdp_compiler.runtime.mesh import Coords  # noqa: F401 (type only)

    from . import analyze as _analyze
    from . import tensor_parallel as _tp
    from .sequence_parallel import describe_sequence_parallel
    from .sharding import PaddedShard, local_shape
    t = cfg.tp
    group = coords.group("tp")
    group_name = group.group_name if group is not None else "tp"
    an = _analyze.analyze(gm)
    rg = {n: p.requires_grad for n, p in params.items()}
    new, seeds, rw = _tp.tensor_parallel(gm, an, t, coords.tp_rank, group_name,
                                         cfg.sequence_parallel, rg)
    for name, pp in plan.params.items():
        pl = seeds.get(name)
        if pl is not None:
            pp.placement = pl
            pp.local_shape = tuple(local_shape(pp.full_shape, pl, t))
        pp.grad_tp_reduce = name in rw.grad_tp_params
    for n in gm.graph.nodes:
        name = _analyze.param_name(n)
        if name and "role" not in plan.params[name].role:
            for u in n.users:
                r = u.meta.get("ptdp", {}).get("role")
                if r and not plan.params[name].role:
                    plan.params[name].role = r
    _fake_check(new, params, plan)
    for n in new.graph.nodes:  # the pipeline split reads boundary placements (scatter/gather)
        n.meta["ptdp_placement"] = rw.pl.get(n)
    plan.collectives.extend(_tp.collective_plans(rw, t))
    plan.tp_rewrites = rw.rewrites
    plan.pass_log.append(("analyze", f"{len(an.groups)} tensor-parallel blocks "
                          f"({len(an.column)} column-, {len(an.row)} row-parallel linears); "
                          f"LM head: {an.head.node.name if an.head else 'none'}; vocab-parallel "
                          f"embeddings: {[e.name for e in an.vocab_embeddings]}"))
    plan.pass_log.append(("tensor_parallel", f"tp={t}: {len(seeds)} sharded parameters, "
                          f"{sum(1 for c in rw.collectives if c[0] != 'f')} forward collectives, "
                          f"{sum(1 for c in rw.collectives if c[0] == 'f')} f operators, "
                          f"{len(rw.rewrites)} shape constants rewritten"))
    if cfg.sequence_parallel:
        plan.pass_log.append(("sequence_parallel", describe_sequence_parallel(rw)))
    padded = sorted({(pl.size, pl.padded) for pl in seeds.values()
                     if isinstance(pl, PaddedShard)})
    for size, pad in padded:
        plan.pass_log.append(("vocabulary padding", (
            f"tp={t} does not divide the vocabulary of {size}: the embedding / LM-head rows "
            f"are padded with zeros to {pad} ({pad // t} per rank, Megatron-style); the "
            f"{pad - size} padded logits are masked to -inf in the vocab-parallel "
            "cross-entropy (they never win and get no gradient), and full_grads() / "
            "full_state_dict() return the original shapes")))
    if rw.dropouts["sharded"] or rw.dropouts["replicated"]:
        plan.pass_log.append(("dropout", (
            f"{rw.dropouts['sharded']} dropout(s) on tp-sharded tensors draw a different mask "
            f"on each tp rank; {rw.dropouts['replicated']} on replicated tensors draw the "
            "same mask on every tp rank")))
    plan.analysis = an
    return new


def _fake_check(gm, params, plan):
    """Re-run the per-rank graph with FakeTensor at local shapes (fills node.meta['val'])."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        kind, name = ph.meta.get("ptdp_input_kind"), ph.meta.get("ptdp_input_name")
        old = ph.meta.get("ptdp_full_val")
        if kind == "param":
            pp = plan.params[name]
            shape = pp.local_shape or pp.full_shape
            inputs.append(mode.from_tensor(torch.empty(shape, dtype=params[name].dtype)))
        else:
            inputs.append(mode.from_tensor(old) if old is not None else None)
    from ptdp_compiler.errors import ShardingError
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as e:
        raise ShardingError(f"the tensor-parallel graph does not type-check at local shapes: "
                            f"{type(e).__name__}: {e}") from e

"""``parallelize(model, plan="auto", example_inputs=..., global_batch=...)``: the planner
chooses (tp, pp, dp, v, m, sp, recompute) for the current world and the ParallelModule is
built with that choice.

The choice needs the model's graph, so the example inputs are given up front (they are
only captured, never run); the layout is then fixed before any parameter is placed, and
the returned module is an ordinary ParallelModule (``optimizer()``, ``load()``,
``parameters()`` work at once). Rank 0 plans and broadcasts the result: every rank builds
the same layout even if its timings or floating-point sums would differ.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .cluster import Cluster
from .hardware import GPU_SPECS, GPUSpec, Link

# A CPU rank as the cost model sees it when no calibration file is given: one core's
# GEMM rate, elementwise ops bound by arithmetic, gloo p2p between local processes
# (figures of the shared 2-core development machine, `python -m ptdp_compiler calibrate`
# measures the real ones).
CPU_NOMINAL = GPUSpec("cpu (nominal)", 80e9, 30e9, 16 * 2 ** 30, gemm_eff=1.0, gemm_dim_half=4.0,
                      attn_eff=0.5, mem_eff=0.25, kernel_overhead=3e-6, reserved_memory=0.0)
GLOO_LOCAL = Link("gloo-local", 4e9, 1e-4)
PLANNED_FIELDS = ("tp", "pp", "dp", "dp_shard", "ep", "cp", "virtual_stages", "microbatches",
                  "sequence_parallel", "recompute", "schedule")


def default_cluster(world: int) -> Cluster:
    """This machine with ``world`` ranks: the cluster file named by $PTDP_CLUSTER (from
    ``python -m ptdp_compiler calibrate``) if set, else a known GPU, else a nominal CPU."""
    path = os.environ.get("PTDP_CLUSTER")
    if path:
        return for_world(Cluster.load(path), world)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).upper()
        for key in sorted(GPU_SPECS, reverse=True):
            if key.split("-")[0] in name:
                return Cluster(nodes=1, gpus_per_node=world, gpu=key)
        raise ConfigError(f"plan='auto' does not know the GPU {name!r}: pass cluster=ptdp.Cluster"
                          "(...) or a calibrated cluster file (python -m ptdp_compiler calibrate)")
    mem = CPU_NOMINAL.memory
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(world, 1)
    except (ValueError, OSError):
        pass
    return Cluster(nodes=1, gpus_per_node=world, gpu=dataclasses.replace(CPU_NOMINAL, memory=mem),
                   intra=GLOO_LOCAL, inter=GLOO_LOCAL, name=f"this CPU x{world} ranks")


def for_world(cl: Cluster, world: int) -> Cluster:
    """``cl`` resized to ``world`` devices (a calibration file describes the machine,
    the world size says how many ranks run on it)."""
    if cl.num_gpus == world:
        return cl
    per = min(world, cl.gpus_per_node)
    if world % per:
        per = world
    return dataclasses.replace(cl, nodes=world // per, gpus_per_node=per)


def _global_batch(example_inputs, example_kwargs) -> int:
    for x in list(example_inputs) + list(example_kwargs.values()):
        if isinstance(x, torch.Tensor) and x.dim():
            return int(x.shape[0])
    raise ConfigError("plan='auto' needs global_batch=N (no example tensor has a batch dim)")


def choose(model, example_inputs, example_kwargs: dict, cluster: Optional[Union[Cluster, str]],
           global_batch: Optional[int], world: int, precision: str = "fp32",
           memory_limit: Optional[int] = None):
    """Run the planner for ``world`` ranks (on this rank only) and return its PlanResult."""
    from . import model_cost, plan
    if isinstance(cluster, str):
        cluster = Cluster.load(cluster)
    cluster = for_world(cluster, world) if cluster is not None else default_cluster(world)
    if cluster.num_gpus != world:
        raise ConfigError(f"cluster describes {cluster.num_gpus} devices but the world has "
                          f"{world} ranks")
    gb = global_batch or _global_batch(example_inputs, example_kwargs)
    mc = model_cost(model, example_inputs, example_kwargs,
                    dtype_bytes=4 if precision == "fp32" else 2)
    return plan(mc, cluster=cluster, global_batch=gb, memory_limit=memory_limit)


def choose_config(model, cfg, plan: str, cluster, global_batch, example_inputs,
                  example_kwargs) -> tuple:
    """``(ParallelConfig, PlanResult)``: plan on rank 0, broadcast, every rank gets ``cfg``
    with the chosen layout (``parallelize(plan="auto")`` builds the ParallelModule)."""
    from ..config import ParallelConfig
    if plan != "auto":
        raise ConfigError(f"plan={plan!r}: the only planner mode is plan='auto'")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError("plan='auto' needs a model instance (it captures the model with "
                          "example_inputs to plan); build the model first")
    default = ParallelConfig().validate()
    fixed = [f for f in PLANNED_FIELDS if getattr(cfg, f) != getattr(default, f)]
    if fixed:
        raise ConfigError(f"plan='auto' chooses {', '.join(PLANNED_FIELDS)}; do not also pass "
                          f"{', '.join(fixed)}")
    if example_inputs is None and not example_kwargs:
        raise ConfigError("plan='auto' needs example_inputs=(...) (and/or example_kwargs=)"
                          ": one batch to capture the model's graph with")
    args = example_inputs if isinstance(example_inputs, tuple) else \
        (() if example_inputs is None else (example_inputs,))
    kwargs = dict(example_kwargs or {})
    world = dist.get_world_size() if dist.is_initialized() else 1
    result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = choose(model, args, kwargs, cluster, global_batch, world, cfg.precision,
                            cfg.memory_limit)
        except Exception as e:   # every rank must learn it, not hang in the broadcast
            result = e
    if dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, Exception):
        raise result
    chosen = dataclasses.replace(cfg, **result.parallel_config_kwargs()).validate()
    return chosen, result


__all__ = ["choose_config", "choose", "default_cluster", "for_world", "CPU_NOMINAL"]

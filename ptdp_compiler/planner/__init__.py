"""Planner: cost model + schedule simulator → chooses t, p, d, v, b, m, sp, recompute.

    import ptdp_compiler as ptdp
    result = ptdp.plan(model, (idx,), cluster=ptdp.Cluster(nodes=4, gpus_per_node=8,
                       gpu="A100-80GB"), global_batch=512, kwargs={"targets": idx})
    print(result.explain())
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .cluster import Cluster
from .cost_model import (CostOptions, ModelCost, gpt_model_cost, model_cost_from_graph,
                         tp_placements)
from .hardware import GPU_SPECS, GPUSpec, Link
from .search import Candidate, Estimate, Evaluator, PlanResult, search

GPT_SHAPES = {  # name -> (hidden, heads, layers): Narayanan et al. 2021 Table 1 + GPT-3
    "1.7B": (2304, 24, 24), "3.6B": (3072, 32, 30), "7.5B": (4096, 32, 36),
    "18B": (6144, 48, 40), "18.4B": (6144, 48, 40), "39B": (8192, 64, 48),
    "39.1B": (8192, 64, 48), "76B": (10240, 80, 60), "76.1B": (10240, 80, 60),
    "145B": (12288, 96, 80), "145.6B": (12288, 96, 80), "175B": (12288, 96, 96),
    "310B": (16384, 128, 96), "310.1B": (16384, 128, 96), "530B": (20480, 128, 105),
    "529.6B": (20480, 128, 105), "1T": (25600, 160, 128), "1008B": (25600, 160, 128),
}


def scale_model_cost(mc: ModelCost, batch: int, dtype_bytes: int = 2) -> ModelCost:
    """Turn costs captured at ``batch`` samples in ``mc.dtype_bytes`` into per-sample costs
    in ``dtype_bytes`` (the training precision)."""
    f = 1.0 / batch
    bf = dtype_bytes / mc.dtype_bytes

    def sc(c):
        dims = c.gemm_dims
        if dims:
            dims = (max(1, dims[0] // batch),) + tuple(dims[1:])
        return dataclasses.replace(c, flops=c.flops * f, bytes=c.bytes * f * bf, gemm_dims=dims,
                                   attn_scores=c.attn_scores * f,
                                   measured_s=c.measured_s * f)
    return dataclasses.replace(mc, layers=[[sc(c) for c in l] for l in mc.layers],
                               pre=[sc(c) for c in mc.pre], post=[sc(c) for c in mc.post],
                               dtype_bytes=dtype_bytes)


def model_cost(model, example_inputs=(), kwargs: Optional[dict] = None,
               dtype_bytes: int = 2) -> ModelCost:
    """Capture ``model(*example_inputs, **kwargs)`` and derive its per-sample costs; the
    tensor-parallel shares of its parameters and GEMMs come from the placements the
    tensor-parallel pass gives it (``tp_placements``)."""
    import torch
    from ..config import ParallelConfig
    from ..program import build_program
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    captured = build_program(model, ParallelConfig(), (args, dict(kwargs or {}), None),
                             until="capture")
    placements, note = tp_placements(model, args, dict(kwargs or {}))
    mc = model_cost_from_graph(captured.gm, name=type(model).__name__, placements=placements)
    mc = dataclasses.replace(mc, tp_shares=note)
    leaves = [x for x in list(args) + list((kwargs or {}).values()) if isinstance(x, torch.Tensor)]
    batch = int(leaves[0].shape[0]) if leaves and leaves[0].dim() else 1
    return scale_model_cost(mc, batch, dtype_bytes)


def plan(model, example_inputs=(), cluster: Optional[Cluster] = None, global_batch: int = 0,
         kwargs: Optional[dict] = None, options: CostOptions = CostOptions(),
         progress: bool = False, memory_limit=None, **search_kw) -> PlanResult:
    """Choose (t, p, d, v, b, m, sp, recompute) for ``model`` on ``cluster``.

    ``model`` is an nn.Module (captured with ``example_inputs``/``kwargs``) or a ModelCost
    (e.g. ``gpt_model_cost(h, a, l)``). Returns a PlanResult whose
    ``to_parallel_config()`` gives a ParallelConfig and ``explain()`` the top-5 and the
    rejected configurations; its ``memory_prediction`` each pipeline stage's peak broken
    down. ``memory_limit`` (bytes, or a string such as "80GiB"): no layout predicted over it
    per rank is proposed; if none fits, ``MemoryLimitError`` with the least-memory layout."""
    from ..config import parse_bytes
    search_kw["memory_limit"] = parse_bytes(memory_limit)
    cluster = cluster or Cluster()
    mc = model if isinstance(model, ModelCost) else model_cost(model, example_inputs, kwargs)
    if global_batch <= 0:
        from ..errors import ConfigError
        raise ConfigError("plan(..., global_batch=N) needs the global batch size (samples/step)")
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = lambda it: tqdm(it, desc="planning", unit="cfg", leave=False)  # noqa: E731
        except ImportError:
            bar = None
    return search(mc, cluster, global_batch, options, progress=bar, **search_kw)


__all__ = ["plan", "Cluster", "CostOptions", "GPUSpec", "Link", "GPU_SPECS", "ModelCost",
           "gpt_model_cost", "model_cost", "model_cost_from_graph", "PlanResult", "Candidate",
           "Estimate", "Evaluator", "search", "GPT_SHAPES"]

"""Compile a forward graph ``(*inputs) -> outputs`` into a differentiable callable.

AOTAutograd traces the joint forward/backward graph and partitions it (the
min-cut partitioner, which honours ``node.meta["recompute"]`` tags); the two
halves then go to Inductor (C++ kernels on CPU, Triton on CUDA) or, with
``codegen="aot_eager"``, run as plain ATen calls — the same partition, no kernel
compile, bit-compatible results.

``comm_reorder`` (``ParallelConfig.comm_reorder``, overridable by ``PTDP_COMM_REORDER``)
turns on Inductor's compute/communication reordering for this compile only
(``inductor_options.py``); ``aot_eager`` runs the graph in traced order and ignores it.

A compiled callable is specialised to its inputs' shapes and dtypes; the caller
keys its cache on them, so a training loop compiles once (``compile_stats``
counts compiles, which tests use to prove there is no recompile per step).
"""
from __future__ import annotations

import collections
import functools
import os
import time

import torch
import torch.fx as fx

compile_stats = collections.Counter()

CODEGENS = ("inductor", "aot_eager")


def compile_graph(gm: fx.GraphModule, example_inputs: list, codegen: str = "inductor",
                  comm_reorder: bool = False):
    """Return ``fn(*inputs) -> list[Tensor]`` computing ``gm`` with autograd support.

    Identical layers are compiled once and their code reused (``regional.py``;
    ``PTDP_REGIONAL=0`` compiles the whole graph as one)."""
    from .regional import compile_regional, regional_enabled
    from .inductor_options import apply_inductor_options, comm_reorder_enabled
    apply_inductor_options()
    compile_one = functools.partial(compile_whole_graph,
                                    comm_reorder=comm_reorder_enabled(comm_reorder))
    if regional_enabled():
        return compile_regional(gm, example_inputs, codegen, compile_one)
    return compile_one(gm, example_inputs, codegen)


def compile_whole_graph(gm: fx.GraphModule, example_inputs: list, codegen: str = "inductor",
                        comm_reorder: bool = False):
    """``compile_graph`` without regions: one AOTAutograd trace of the whole graph."""
    from .partition import aot_partition_kwargs   # min-cut honouring recompute tags
    t0 = time.perf_counter()
    if codegen == "inductor":
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        from torch._inductor.compile_fx import compile_fx

        from .inductor_options import reorder_compile_kwargs
        kwargs = aot_partition_kwargs(gm, codegen)
        reorder = reorder_compile_kwargs(comm_reorder)
        kwargs["config_patches"] = {**kwargs.get("config_patches", {}),
                                    **reorder.get("config_patches", {})}
        if "decompositions" in reorder:
            kwargs["decompositions"] = reorder["decompositions"]
        # compile_fx outside Dynamo has no ShapeEnv, and without one Inductor bypasses its
        # FX-graph and AOTAutograd caches ("No shape env"); a tracing context with its own
        # (static) ShapeEnv makes compiled chunks cacheable across runs
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
            fn = compile_fx(gm, example_inputs, **kwargs)
    elif codegen == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def nop(g, _inputs):
            return make_boxed_func(g.forward)

        fn = aot_module_simplified(gm, example_inputs, fw_compiler=nop, bw_compiler=nop,
                                   **aot_partition_kwargs(gm, codegen))
    else:
        raise ValueError(f"unknown codegen {codegen!r}; choose one of {CODEGENS}")
    compile_stats["compiles"] += 1
    compile_stats[f"compiles_{codegen}"] += 1
    compile_stats["seconds"] += time.perf_counter() - t0
    return fn

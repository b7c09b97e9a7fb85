"""Compile a forward graph ``(*inputs) -> outputs`` into a differentiable callable.

AOTAutograd traces the joint forward/backward graph and partitions it (the
min-cut partitioner, which honours ``node.meta["recompute"]`` tags); the two
halves then go to Inductor (C++ kernels on CPU, Triton on CUDA) or, with
``codegen="aot_eager"``, run as plain ATen calls — the same partition, no kernel
compile, bit-compatible results.

A compiled callable is specialised to its inputs' shapes and dtypes; the caller
keys its cache on them, so a training loop compiles once (``compile_stats``
counts compiles, which tests use to prove there is no recompile per step).
"""
from __future__ import annotations

import collections
import os
import time

import torch
import torch.fx as fx

compile_stats = collections.Counter()

CODEGENS = ("inductor", "aot_eager")


def compile_graph(gm: fx.GraphModule, example_inputs: list, codegen: str = "inductor"):
    """Return ``fn(*inputs) -> list[Tensor]`` computing ``gm`` with autograd support.

    Identical layers are compiled once and their code reused (``regional.py``;
    ``PTDP_REGIONAL=0`` compiles the whole graph as one)."""
    from .regional import compile_regional, regional_enabled
    from .inductor_options import apply_inductor_options
    apply_inductor_options()
    if regional_enabled():
        return compile_regional(gm, example_inputs, codegen, compile_whole_graph)
    return compile_whole_graph(gm, example_inputs, codegen)


def compile_whole_graph(gm: fx.GraphModule, example_inputs: list, codegen: str = "inductor"):
    """``compile_graph`` without regions: one AOTAutograd trace of the whole graph."""
    from .partition import aot_partition_kwargs   # min-cut honouring recompute tags
    t0 = time.perf_counter()
    if codegen == "inductor":
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        from torch._inductor.compile_fx import compile_fx
        fn = compile_fx(gm, example_inputs, **aot_partition_kwargs(gm, codegen))
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

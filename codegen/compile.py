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
import contextlib
import functools
import os
import time

import torch
import torch.fx as fx

compile_stats = collections.Counter()

CODEGENS = ("inductor", "aot_eager")


def compile_graph(gm: fx.GraphModule, example_inputs: list, codegen: str = "inductor",
                  comm_reorder: bool = False, split_backward: bool = False):
    """Return ``fn(*inputs) -> list[Tensor]`` computing ``gm`` with autograd support.

    Identical layers are compiled once and their code reused (``regional.py``;
    ``PTDP_REGIONAL=0`` compiles the whole graph as one). ``split_backward`` compiles
    each backward as input-gradient and weight-gradient halves so a pipeline can send
    input gradients before computing weight gradients (``split_backward.py``)."""
    from .regional import compile_regional, regional_enabled
    from .inductor_options import apply_inductor_options, comm_reorder_enabled
    apply_inductor_options()
    compile_one = functools.partial(compile_whole_graph,
                                    comm_reorder=comm_reorder_enabled(comm_reorder),
                                    split_backward=split_backward)
    # dp_shard's gathers are prefetched one layer ahead and its reduce-scatters overlap
    # later layers' backward: both cross layer regions, so such a graph compiles whole
    if regional_enabled() and not _has_functional_collectives(gm):
        return compile_regional(gm, example_inputs, codegen, compile_one)
    return compile_one(gm, example_inputs, codegen)


def _has_functional_collectives(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and "_c10d_functional" in str(n.target)
               for n in gm.graph.nodes)


def compile_whole_graph(gm: fx.GraphModule, example_inputs: list, codegen: str = "inductor",
                        comm_reorder: bool = False, split_backward: bool = False):
    """``compile_graph`` without regions: one AOTAutograd trace of the whole graph."""
    from .partition import aot_partition_kwargs   # min-cut honouring recompute tags
    from . import split_backward as sb
    t0 = time.perf_counter()
    n_inputs = len(gm.graph.find_nodes(op="placeholder"))
    weights = sb.weight_input_positions(gm) if split_backward else []

    def split_of(bw):
        # AOTAutograd's backward returns one gradient per flat forward input; inputs it
        # lifted from the module (none for ptdp's graphs) would come first
        off = len(next(iter(bw.graph.find_nodes(op="output"))).args[0]) - n_inputs
        return sb.split_backward_graph(bw, {off + i for i in weights}) if off >= 0 else None

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
        # each partitioned half: its functional collectives placed to overlap compute
        kwargs["inner_compile"] = functools.partial(_inner_compile_split,
                                                    split_of if weights else None)
        # a split backward is two compiled graphs, which AOTAutograd's cache cannot store
        # (each half is still in Inductor's FX-graph cache); and no backward input may be
        # "donated" (its buffer reused by Inductor for temporaries): D would overwrite
        # saved activations that W reads after it
        # Likewise a graph with functional collectives: AOTAutograd's cache keys on the
        # graph before partitioning, so it would serve halves compiled before
        # overlap_collectives (run in inner_compile) placed them as it does now
        collectives = any(getattr(n.target, "namespace", "") in
                          ("_c10d_functional", "_c10d_functional_autograd")
                          for n in gm.graph.nodes if n.op == "call_function")
        no_aot_cache = torch._functorch.config.patch(enable_autograd_cache=False,
                                                     donated_buffer=False) if weights \
            else torch._functorch.config.patch(enable_autograd_cache=False) if collectives \
            else contextlib.nullcontext()
        # ...but AOTAutograd fakeifies real inputs against that ShapeEnv with every dim
        # dynamic (parameters included: here they are plain inputs), so Inductor would
        # emit size-generic kernels; static fakes of the same mode keep every shape a
        # constant, as the caller's one-compile-per-signature cache assumes
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        with tracing(TracingContext(fake_mode)), no_aot_cache:
            fakes = [fake_mode.from_tensor(x, static_shapes=True)
                     if isinstance(x, torch.Tensor) else x for x in example_inputs]
            fn = compile_fx(gm, fakes, **kwargs)
    elif codegen == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        from ptdp_compiler.passes.views_as_reshapes import views_as_reshapes

        from ptdp_compiler.passes.overlap_collectives import overlap_collectives

        def nop(g, _inputs):
            return make_boxed_func(overlap_collectives(views_as_reshapes(g)).forward)

        def bw_nop(g, _inputs):
            g = overlap_collectives(views_as_reshapes(g))
            sg = split_of(g) if weights else None
            if sg is None:
                return make_boxed_func(g.forward)
            return sb.SplitBackward(sg, sb.boxed_fx(sg.d_gm), sb.boxed_fx(sg.w_gm))

        # outside Dynamo's tracing context: inside ``ptdp.backend`` its ShapeEnv would make
        # every dim of an input Dynamo did not see (a dp_shard flat shard) symbolic, with no
        # source to guard on; this rank's shapes are static anyway
        from torch._guards import tracing
        with tracing(None):
            fn = aot_module_simplified(gm, example_inputs, fw_compiler=nop, bw_compiler=bw_nop,
                                       **aot_partition_kwargs(gm, codegen))
    else:
        raise ValueError(f"unknown codegen {codegen!r}; choose one of {CODEGENS}")
    compile_stats["compiles"] += 1
    compile_stats[f"compiles_{codegen}"] += 1
    compile_stats["seconds"] += time.perf_counter() - t0
    return _tracked(fn) if weights else fn


def _tracked(fn):
    """``fn`` whose backward node tells ``SplitBackward`` which parameters it feeds."""
    from .split_backward import track_backward_node

    def run(*args):
        outs = fn(*args)
        if torch.is_grad_enabled():
            track_backward_node(outs)
        return outs
    return run


def _inner_compile_split(split_of, gm: fx.GraphModule, example_inputs, **kwargs):
    """Inductor's ``inner_compile``: the half's collectives placed to overlap compute
    (passes/overlap_collectives.py); a backward graph compiled as its D and W halves when
    ``split_of`` is given."""
    from torch._inductor.compile_fx import compile_fx_inner
    from ptdp_compiler.passes.overlap_collectives import overlap_collectives
    from . import split_backward as sb
    gm = overlap_collectives(gm)
    sg = split_of(gm) if split_of is not None and kwargs.get("is_backward") else None
    if sg is None:
        return compile_fx_inner(gm, example_inputs, **kwargs)
    kw = {**kwargs, "static_input_idxs": []}
    d_fn = compile_fx_inner(sg.d_gm, list(example_inputs), **kw)
    w_fn = compile_fx_inner(sg.w_gm, sb.w_example_inputs(sg, list(example_inputs)), **kw)
    return sb.SplitBackwardCode(sg, d_fn, w_fn)

"""``build_program``: the one place where a model (or a Dynamo graph) becomes this rank's
compiled training program.

    capture      capture.py (an nn.Module) or capture_dynamo.py (a Dynamo graph, for
                 ``ptdp.backend``): one ATen FX graph, every input labelled param / buffer /
                 constant / user
    passes       passes.run_passes: loss weighting, tensor / sequence parallelism,
                 recomputation tags, pipeline split (pp > 1) — each a pass of the pipeline
    chunks       this rank's pieces: pipeline chunk k runs on pipeline rank k mod p; with
                 pp = 1 the whole per-rank graph is chunk 0
    compile      codegen.compile_graph per chunk (AOTAutograd partition honouring the
                 recompute tags, Inductor or aot_eager)

``until="capture"`` or ``"passes"`` stops after that step (the planner costs the captured
graph; ``inspect`` draws the per-rank graphs of every rank without compiling them).

A ``Program`` is plain data: per-rank chunk graphs, the plan (placements, collectives,
pass log: the report ``explain`` prints), the stage map (which pipeline rank holds which
parameters) and the compiled callables. Building one never touches runtime state: the
caller's parameters are read for shapes, dtypes and ``requires_grad`` only, and
compilation gets fresh tensors of this rank's local shapes where the caller's are not
already those. The runtime then *applies* the Program (``api.ParallelModule``,
``backend.PTDPBackend``, ``stages.PipelineRunner``): it shards parameters to
``placements``, keeps the stage's ``stage.local_params``, creates process groups and runs
the chunks, resolving every graph input with ``input_value``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import Captured, capture, user_tensors
from .capture_dynamo import capture_dynamo_graph
from .codegen import compile_graph
from .codegen.partition import trial_partition
from .errors import InputShapeError
from .passes import run_passes
from . import progress
from .placement import Plan, Shard


@dataclasses.dataclass
class BoundaryMeta:
    """A tensor crossing a pipeline cut, as the receiving rank allocates it."""
    shape: tuple
    dtype: torch.dtype
    scatter: bool            # sent as 1/t slices and all-gathered over tp

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class ChunkProgram:
    """One piece of the program this rank runs (the runtime's pipeline stage)."""
    index: int
    gm: fx.GraphModule
    inputs: list                       # per placeholder: ("graph", (kind, name)) | ("boundary", i)
    in_meta: list                      # BoundaryMeta per boundary input
    out_meta: list                     # BoundaryMeta per boundary output (empty: last chunk)
    params: list                       # canonical names of the parameters it reads
    fn: Optional[Callable] = None      # compiled: (*inputs) -> list[Tensor]; None if not compiled


@dataclasses.dataclass
class StageMap:
    """Which pipeline rank holds what (pp > 1): chunk k lives on pipeline rank k mod p."""
    pp: int
    pp_rank: int
    chunk_params: list       # per chunk of the whole pipeline: the parameter names it reads
    owners: dict             # parameter name -> pipeline ranks holding it (tied: several)
    local_params: list       # the parameters this pipeline rank holds, sorted

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_params)

    def local_chunks(self) -> list:
        return [k for k in range(self.num_chunks) if k % self.pp == self.pp_rank]

    def receives_from_peer(self, chunk: int) -> bool:
        """Whether ``chunk``'s input comes from another pipeline rank, so its backward
        sends an input gradient back to it (what a split backward speeds up)."""
        return chunk > 0 and (chunk - 1) % self.pp != chunk % self.pp


@dataclasses.dataclass
class Program:
    """One input signature, compiled for this rank."""
    captured: Captured
    gm: fx.GraphModule              # the whole per-rank graph after the passes
    plan: Plan                      # placements, collectives, recompute, pass log
    loss_weight: object             # passes.loss_weight.LossWeight
    chunks: dict                    # chunk index -> ChunkProgram, this rank's only
    stage: Optional[StageMap]       # pp > 1
    split: Optional[object]         # passes.pipeline_split.SplitResult (pp > 1)

    @property
    def placements(self) -> dict:
        """{parameter name: Shard} for the parameters split over tp."""
        return {n: pp.placement for n, pp in self.plan.params.items()
                if isinstance(pp.placement, Shard)}

    def user_inputs(self, mb) -> list:
        """The graph's user inputs from a microbatch ``(args, kwargs, target)``."""
        return user_tensors(self.captured, *mb)

    def estimate_saved_bytes(self):
        """Fill the recompute report's bytes saved for backward per layer (a trial
        partition of the tagged graph on fake inputs), as ``explain`` prints them."""
        from .passes.recompute import estimate
        estimate(self.gm, self.plan.recompute, trial=trial_partition)


def input_value(key: tuple, params: Mapping, buffer: Callable, constants: Mapping, users):
    """The tensor a graph input ``key = (kind, name)`` takes: a parameter by canonical
    name, a buffer by name (``buffer(name)``), a constant lifted by capture, or the user
    input at position ``name``."""
    kind, name = key
    if kind == "param":
        return params[name]
    if kind == "buffer":
        return buffer(name)
    if kind == "constant":
        return constants[name]
    return users[name]


# ---- building ---------------------------------------------------------------------------------
STEPS = ("capture", "passes", "compile")


def build_program(model_or_graph, config, example_inputs, coords=None,
                  params: Optional[dict] = None, full_shapes: Optional[dict] = None, *,
                  from_dynamo: bool = False, until: str = "compile",
                  ep_rows_scale: float = 1.0) -> Program:
    """Capture, transform, split and compile for this rank (``coords``: its place in the
    mesh; its tp process group names the collectives).

    ``model_or_graph``: an nn.Module called with ``example_inputs = (args, kwargs,
    target)``, or (``from_dynamo=True``) a Dynamo graph with Dynamo's example input list.
    ``params``: canonical name → tensor, full-size or already this rank's shard (default:
    the module's, or the parameters among Dynamo's inputs); ``full_shapes`` gives the full
    shapes when they differ. Read, never modified. ``until``: the last step to run (see
    the module doc); ``"capture"`` needs no ``coords`` and returns the captured graph as
    ``gm`` with an empty plan and no chunks.
    """
    if until not in STEPS:
        raise ValueError(f"until={until!r}: one of {STEPS}")
    if until == "compile":
        extra = "".join(f" {k}={getattr(config, k)}" for k in ("dp_shard", "cp", "ep")
                        if getattr(config, k, 1) > 1)
        progress.say(f"building rank 0's program (dp={config.dp} tp={config.tp} "
                     f"pp={config.pp}{extra}): capture -> passes -> compile")
    with progress.phase("capture"):
        if from_dynamo:
            captured = capture_dynamo_graph(model_or_graph, list(example_inputs),
                                            loss_only=config.tp > 1)
            params = params if params is not None else captured.params(example_inputs)
            buffer = captured.buffers(example_inputs).__getitem__
            users = captured.users(example_inputs)
        else:
            args, kwargs, target = example_inputs
            captured = capture(model_or_graph, args, kwargs, target, config.loss_fn)
            params = params if params is not None else dict(model_or_graph.named_parameters())
            buffer = model_or_graph.get_buffer
            users = user_tensors(captured, args, kwargs, target)
    if until == "capture":
        return Program(captured, captured.gm, Plan(), None, {}, None, None)
    full_shapes = full_shapes or {n: tuple(p.shape) for n, p in params.items()}
    with progress.phase("passes"):
        result = run_passes(captured, config, coords, params, full_shapes,
                            ep_rows_scale=ep_rows_scale,
                            trial_partition=trial_partition)
    if result.split is None:
        chunks = {0: ChunkProgram(0, result.gm, [("graph", key) for key in captured.inputs],
                                  [], [], sorted(n for k, n in captured.inputs if k == "param"))}
        stage = None
    else:
        stage, chunks = _pipeline_chunks(result.split, config, coords)
    program = Program(captured, result.gm, result.plan, result.loss_weight, chunks, stage,
                      result.split)
    if until == "compile":
        with progress.phase("compile"):
            _compile(program, config, params, buffer, users, coords.device)
    return program


def _pipeline_chunks(split, config, coords) -> tuple:
    """The stage map and this pipeline rank's chunks of ``split``."""
    p, per_chunk = config.pp, split.chunk_params
    mine = [k for k in range(len(split.chunks)) if k % p == coords.pp_rank]
    stage = StageMap(p, coords.pp_rank, per_chunk, split.owners,
                     sorted({n for k in mine for n in per_chunk[k]}))
    chunks = {}
    last = len(split.chunks) - 1
    for k in mine:
        ch = split.chunks[k]
        inputs = []
        for ph, (kind, ref) in zip(ch.gm.graph.find_nodes(op="placeholder"), ch.inputs):
            inputs.append(("boundary", ref) if kind == "boundary" else
                          ("graph", (ph.meta.get("ptdp_input_kind", "user"),
                                     ph.meta.get("ptdp_input_name"))))
        in_meta = [_boundary_meta(b, config) for b in ch.in_boundaries]
        out_meta = [] if k == last else [_boundary_meta(b, config) for b in ch.out_boundaries]
        chunks[k] = ChunkProgram(k, ch.gm, inputs, in_meta, out_meta, per_chunk[k])
    return stage, chunks


def _boundary_meta(b, config) -> BoundaryMeta:
    if b.shape is None:
        raise InputShapeError(f"pipeline boundary {b.name} has no known shape; the graph "
                              "must be traced with concrete microbatch shapes")
    meta = BoundaryMeta(tuple(b.shape), b.dtype, False)
    # replicated over tp and evenly divisible: scatter/gather
    tp = config.tp
    meta.scatter = config.scatter_gather and tp > 1 and b.tp_replicated and meta.numel % tp == 0
    return meta


# ---- compiling ----------------------------------------------------------------------------------
def _compile(program: Program, config, params: dict, buffer: Callable, users,
             device: torch.device):
    """Compile every chunk of ``program`` for example inputs of this rank's shapes."""
    for k, ch in program.chunks.items():
        local: dict = {}   # this chunk's parameter examples, freed after its compile

        def param(name):
            if name not in local:
                local[name] = _param_example(params[name], program.plan.params[name], device)
            return local[name]

        example = []
        for kind, ref in ch.inputs:
            if kind == "boundary":
                meta = ch.in_meta[ref]
                example.append(torch.zeros(meta.shape, dtype=meta.dtype,
                                           requires_grad=meta.dtype.is_floating_point))
            elif ref[0] == "param":
                example.append(param(ref[1]))
            else:
                example.append(_real(input_value(ref, params, buffer, program.captured.constants,
                                                 users), device))
        with progress.phase(f"chunk {k}") as info:
            before = progress.cache_counts()
            if program.stage is None:
                ch.fn = compile_graph(ch.gm, example, config.codegen, config.comm_reorder)
            else:
                # a chunk that sends no input gradient (chunk 0) gains nothing from a split
                ch.fn = compile_graph(ch.gm, example, config.codegen, config.comm_reorder,
                                      split_backward=config.split_backward
                                      and program.stage.receives_from_peer(k))
            info["note"] = progress.cache_note(before)


def _param_example(p: torch.Tensor, plan, device: torch.device) -> torch.Tensor:
    """``p`` itself when it already has this rank's shape and a value, else an
    uninitialised tensor of the local shape that the runtime's copy will have (a
    contiguous shard on ``p``'s device; a meta parameter: on the compute device)."""
    local = (plan.fsdp_numel,) if plan.fsdp_numel else tuple(plan.local_shape or plan.full_shape)
    if not p.is_meta and tuple(p.shape) == local:
        return p
    x = torch.empty(local, dtype=p.dtype, device=device if p.is_meta else p.device)
    if isinstance(p, nn.Parameter):
        return nn.Parameter(x, requires_grad=p.requires_grad)
    return x.requires_grad_(p.requires_grad)


def _real(x, device: torch.device):
    """A meta tensor (a buffer of a meta-built model not yet given values) as an
    uninitialised tensor of the same layout on the compute device; others unchanged."""
    if isinstance(x, torch.Tensor) and x.is_meta:
        return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype,
                                   device=device)
    return x

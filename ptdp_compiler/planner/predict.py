"""Predict the step time of a pipeline configuration the runtime will run, on a
calibrated machine: the runtime's own chunk cuts (``passes/pipeline_split.choose_cuts``)
over the model's captured graph, every chunk costed node by node with the cost model and
the cluster's calibrated figures, then the runtime's own action lists played by the
schedule simulator.

Nothing here looks at a measured step of the configuration being predicted; the inputs
are the graph, the calibration (GEMM FLOP/s, op overhead, p2p α–β, opaque ops timed on
their shapes) and two executor constants measured once per machine (``Overheads``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .cluster import Cluster
from .cost_model import BACKWARD_FACTOR, CostOptions, graph_costs, node_time
from .hardware import p2p_time
from .simulator import SimResult, simulate_config
from ..schedules import SEND_ACT


@dataclasses.dataclass(frozen=True)
class Overheads:
    """Per-action costs of the pipeline executor beyond the chunk's own ops
    (``calibrate.measure_call_overhead``).

    ``forward_s`` / ``backward_s``: a compiled chunk's fixed cost per call (AOTAutograd
    runtime wrapper, the RNG fork per (step, microbatch), autograd entry). ``comm_s``: a
    p2p group's fixed cost beyond the link's α, charged to each send (0 when α was
    measured through ``batch_isend_irecv`` as the executor issues it)."""
    forward_s: float = 0.0
    backward_s: float = 0.0
    comm_s: float = 0.0


@dataclasses.dataclass
class ChunkCosts:
    fwd: list          # seconds per chunk, one microbatch
    bwd: list
    boundary_bytes: list   # bytes sent after chunk k (activation; its gradient is the same size)
    cuts: list         # node names the chunks end at
    wgrad: list = None  # seconds of bwd that are weight gradients (the split backward's W)


def chunk_costs(gm, num_chunks: int, cluster: Cluster, opts: CostOptions = CostOptions(),
                measured: Optional[dict] = None) -> ChunkCosts:
    """Forward/backward seconds of each of the ``num_chunks`` chunks the runtime cuts
    ``gm`` (captured at one microbatch) into. ``measured`` ({node name: s}) times opaque
    ops (``calibrate.time_opaque_ops``)."""
    from ..graph_utils import legal_cuts
    from ..passes.pipeline_split import choose_cuts
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    cuts = choose_cuts(gm, num_chunks) if num_chunks > 1 else []
    live_at = {nodes[i].name: live for i, live in legal_cuts(gm)}
    costs = {c.name: c for c in graph_costs(gm)}
    measured = measured or {}
    fwd = [0.0] * num_chunks
    wgrad = [0.0] * num_chunks
    k = 0
    for n in nodes:
        c = costs.get(n.name)
        if c is not None:
            if n.name in measured:
                c = dataclasses.replace(c, measured_s=measured[n.name])
            t = node_time(c, cluster.gpu, 1, 1, False, opts)
            fwd[k] += t
            # a GEMM with a weight: its weight gradient is one GEMM of the same FLOPs
            wgrad[k] += t if c.kind == "gemm" and c.param_elems else 0.0
        if k < len(cuts) and n.name == cuts[k]:
            k += 1
    nbytes = []
    for name in cuts:
        v = live_at[name].meta.get("val")
        nbytes.append(float(v.numel() * v.element_size()) if isinstance(v, torch.Tensor) else 0.0)
    return ChunkCosts(fwd, [BACKWARD_FACTOR * f for f in fwd], nbytes, cuts, wgrad)


def predict_pipeline(cc: ChunkCosts, cluster: Cluster, schedule: str, p: int, v: int, m: int,
                     overheads: Overheads = Overheads(), rendezvous: bool = True,
                     split_backward: bool = True) -> SimResult:
    """Simulated step (makespan of the schedule) for chunk costs ``cc`` (p·v chunks).
    ``rendezvous``: a transfer starts once the peer has posted its recv (gloo TCP and
    NCCL p2p both do); as in the executor, a sender never waits for its sends.
    ``split_backward``: as the runtime's option of that name (its default), weight
    gradients of chunks that send an input gradient wait to fill the pipeline's gaps."""
    if len(cc.fwd) != p * v:
        raise ValueError(f"{len(cc.fwd)} chunk costs for p·v = {p * v} chunks")
    link = cluster.intra
    of, ob = overheads.forward_s, overheads.backward_s
    return simulate_config(
        schedule, p, v, m, lambda ch: cc.fwd[ch] + of, lambda ch: cc.bwd[ch] + ob,
        lambda a: p2p_time(cc.boundary_bytes[a.chunk if a.kind == SEND_ACT else a.chunk - 1],
                           link) + overheads.comm_s, eager_sends=not rendezvous,
        wgrad_cost=(lambda ch: cc.wgrad[ch]) if split_backward and cc.wgrad else None,
        blocking_sends=False)


__all__ = ["Overheads", "ChunkCosts", "chunk_costs", "predict_pipeline"]

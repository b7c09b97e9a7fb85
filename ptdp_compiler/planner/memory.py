"""Per-rank peak memory, predicted before launch.

One rank's peak during a training step is modelled as

    params + grads (+ fp32 main grads) + optimizer states       (static: alive all step)
  + activations saved for backward × the microbatches in flight on that pipeline stage
  + the weight-gradient half a split backward defers (its GEMMs' inputs and output grads)
  + p2p receive buffers (pipeline boundaries)
  + max(what a layer's backward recomputes (selective / full),
        backward workspace: 3× the largest intermediate, e.g. the loss's logits)

What decides each term (the runtime's own choices, read from ``runtime/optimizer.py`` and
``runtime/precision.py``):

- parameters: this rank's elements (tp shares, pp stage) × 4 (fp32) or 2 (bf16 / fp16);
- gradients: fp32 always (``main_grad`` under bf16/fp16). Without buckets (fp32, dp = 1,
  no ZeRO) they do not exist between steps (``train_step`` clears them) and grow while the
  activations shrink in backward, so the peak holds max(activations, gradients);
- optimizer: AdamW's two fp32 states, plus fp32 master weights under bf16/fp16; with
  ZeRO-1 (``distributed_optimizer=True``) masters and states are 1/d, and the gradient
  bucket gains this rank's reduce-scattered 1/d shard;
- in flight: 1 for pp = 1 (microbatches run forward+backward one after the other), else
  ``schedules.expected_peak_inflight`` (1F1B: p − r on stage r; interleaved: its warm-up + 1).

Two sources feed the same arithmetic. ``predict(mc, layout)`` uses a captured
``ModelCost`` and Korthikanti et al.'s per-layer activation bytes (the planner, ``ptdp.plan``,
``python -m ptdp_compiler plan``). ``predict_program(program, config, ...)`` uses this
rank's transformed chunk graphs: the bytes a trial partition of each chunk saves for
backward (``codegen.partition.trial_partition``), with no kernel compiled and no tensor of
the training state allocated (``pm.explain()``, ``parallelize(memory_limit=...)``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ..config import parse_bytes  # noqa: F401  (re-exported: memory_limit=)
from ..schedules import expected_peak_inflight

GiB = 2 ** 30
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
COMPONENTS = ("params", "grads", "optimizer", "activations", "recompute_workspace",
              "deferred_wgrad", "p2p_buffers", "workspace")


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


@dataclasses.dataclass(frozen=True)
class Layout:
    """The knobs memory depends on (a ParallelConfig or a planner Candidate reduced to them)."""
    t: int = 1
    p: int = 1
    d: int = 1
    v: int = 1
    m: int = 1
    b: int = 1                   # microbatch size (samples)
    sp: bool = False
    recompute: str = "none"
    precision: str = "bf16"
    zero: bool = False           # distributed optimizer (ZeRO-1) over d
    split_backward: bool = True
    schedule: Optional[str] = None
    optimizer_states: int = 2    # fp32 tensors per parameter the optimizer keeps (AdamW: 2)
    fs: int = 1                  # dp_shard: parameters, gradients, optimizer state / fs
    ep: int = 1                  # routed experts split over ep ranks (ep divides d)
    cp: int = 1                  # context parallel: s/cp tokens per rank; grads summed
                                 # (and ZeRO-1 sharded) over d × cp

    @property
    def grad_ranks(self) -> int:
        """Ranks a gradient is summed over outside the graph (the "grad" group)."""
        return self.d * self.cp

    @property
    def sched(self) -> str:
        return self.schedule or ("interleaved" if self.v > 1 else "1f1b")

    def short(self) -> str:
        return (f"t={self.t} p={self.p} d={self.d} v={self.v} m={self.m} b={self.b} "
                f"sp={'on' if self.sp else 'off'} recompute={self.recompute} "
                f"{self.precision}{' zero1' if self.zero else ''}"
                f"{f' dp_shard={self.fs}' if self.fs > 1 else ''}"
                f"{f' ep={self.ep}' if self.ep > 1 else ''}"
                f"{f' cp={self.cp}' if self.cp > 1 else ''}")

    @classmethod
    def from_config(cls, config, microbatch_size: int = 1) -> "Layout":
        rc = config.recompute if isinstance(config.recompute, str) else "budget"
        return cls(config.tp, config.pp, config.dp, config.virtual_stages, config.microbatches,
                   microbatch_size, config.sequence_parallel, rc, config.precision,
                   config.distributed_optimizer, config.split_backward, config.schedule,
                   fs=getattr(config, "dp_shard", 1), ep=getattr(config, "ep", 1),
                   cp=getattr(config, "cp", 1))


@dataclasses.dataclass
class StageMemory:
    """Predicted peak of one rank of pipeline stage ``stage`` (bytes per component)."""
    stage: int
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0         # per_microbatch × inflight
    recompute_workspace: float = 0.0
    deferred_wgrad: float = 0.0
    p2p_buffers: float = 0.0
    workspace: float = 0.0
    per_microbatch: float = 0.0      # activation bytes one microbatch keeps on this stage
    inflight: int = 1
    grads_bucketed: bool = True      # gradients alive through the whole step
    # facts the what-if estimates of a refusal use (cheapest_fit_program)
    elems: float = 0.0               # local parameter elements
    layers: int = 0                  # transformer layers on this stage, per microbatch
    residual: float = 0.0            # bytes of one layer's output (its full-recompute checkpoint)
    outside: float = 0.0             # per-microbatch bytes saved outside layers

    @property
    def peak(self) -> float:
        # the loss's workspace is alive at the start of backward, a layer's recomputed values
        # later, once the head's activations are freed: one or the other, not both
        dynamic = self.activations + self.deferred_wgrad + self.p2p_buffers + \
            max(self.recompute_workspace, self.workspace)
        if self.grads_bucketed:
            return self.params + self.optimizer + self.grads + dynamic
        # gradients appear in backward while the saved activations are freed
        return self.params + self.optimizer + max(dynamic, self.grads + self.workspace)

    def row(self) -> dict:
        return {k: getattr(self, k) for k in COMPONENTS} | {
            "stage": self.stage, "inflight": self.inflight,
            "per_microbatch": self.per_microbatch, "peak": self.peak}


@dataclasses.dataclass
class MemoryPrediction:
    layout: Layout
    stages: list                     # StageMemory per pipeline stage predicted
    source: str                      # "model cost (Korthikanti formulas)" | "trial partition"
    limit: Optional[int] = None
    notes: list = dataclasses.field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(s.peak for s in self.stages)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    def fits(self, limit: Optional[int] = None) -> bool:
        limit = self.limit if limit is None else limit
        return limit is None or self.peak <= limit

    def lines(self, indent: str = "  ") -> list:
        out = [f"{indent}predicted peak memory per rank ({self.layout.short()}; from "
               f"{self.source}): {fmt(self.peak)} on pipeline stage {self.worst.stage}" +
               (f", limit {fmt(self.limit)}" if self.limit else "")]
        head = f"{indent}  {'stage':>5} " + "".join(f"{c.replace('_', ' '):>13}"
                                                   for c in ("params", "grads", "optimizer",
                                                             "activations", "recompute",
                                                             "deferred W", "p2p", "workspace",
                                                             "peak"))
        out.append(head)
        for s in self.stages:
            vals = [s.params, s.grads, s.optimizer, s.activations, s.recompute_workspace,
                    s.deferred_wgrad, s.p2p_buffers, s.workspace, s.peak]
            out.append(f"{indent}  {s.stage:>5} " + "".join(f"{fmt(v):>13}" for v in vals) +
                       f"   ({s.inflight} microbatch(es) in flight × "
                       f"{fmt(s.per_microbatch)})")
        out += [f"{indent}  note: {n}" for n in self.notes]
        return out

    def explain(self) -> str:
        return "\n".join(self.lines(""))

    def rows(self) -> list:
        return [s.row() for s in self.stages]


# ---- the arithmetic both sources share ------------------------------------------------------
def state_bytes(elems: float, lay: Layout) -> tuple:
    """(params, grads, optimizer) bytes of ``elems`` local parameter elements."""
    e = PARAM_BYTES[lay.precision]
    low = lay.precision != "fp32"
    elems = elems / lay.fs     # dp_shard: each rank keeps a flat 1/fs (padding aside)
    params = e * elems
    states = 4.0 * lay.optimizer_states * elems
    g = lay.grad_ranks
    if lay.zero:
        # the bucket keeps every local fp32 gradient; the reduce-scatter lands this rank's 1/g
        grads = 4.0 * elems + (4.0 * elems / g if g > 1 else 0.0)
        optimizer = states / g + (4.0 * elems / g if low else 0.0)
    else:
        grads = 4.0 * elems
        optimizer = states + (4.0 * elems if low else 0.0)
    return params, grads, optimizer


def grads_bucketed(lay: Layout) -> bool:
    """Are gradients alive while activations are: buffers for the whole step
    (runtime/optimizer.make_buckets), or an earlier microbatch's gradients accumulating?"""
    return lay.grad_ranks > 1 or lay.zero or lay.precision != "fp32" or lay.m > 1


def stage_memory(stage: int, lay: Layout, elems: float, chunk_acts: list,
                 recompute_layer: float, deferred: float, recv_bytes: float,
                 workspace: float, gathered: float = 0.0) -> StageMemory:
    """``chunk_acts``: activation bytes one microbatch keeps in each of this stage's chunks;
    ``recv_bytes``: boundary bytes one microbatch receives on this stage (all chunks);
    ``gathered``: dp_shard's full weights alive at once (the current bucket and the
    prefetched next), counted with the parameters."""
    params, grads, optimizer = state_bytes(elems, lay)
    params += gathered
    if lay.p == 1:
        inflight = 1
    else:
        inflight = expected_peak_inflight(lay.sched, lay.p, lay.v, lay.m, stage)
    per_mb = sum(chunk_acts) / max(len(chunk_acts), 1)   # chunk-microbatches are per chunk
    # a received boundary tensor becomes a chunk input, kept for backward as part of the
    # chunk's activations; the buffers: an activation and a gradient being received
    p2p = recv_bytes / max(len(chunk_acts), 1) if lay.p > 1 else 0.0
    return StageMemory(stage, params, grads, optimizer, inflight * per_mb, recompute_layer,
                       deferred, p2p, workspace, per_mb, inflight, grads_bucketed(lay), elems)


# ---- source 1: a ModelCost and Korthikanti et al.'s formulas ---------------------------------
def layer_activation_bytes(s: int, b: int, h: int, a: int, t: int, sp: bool, recompute: str,
                           dtype_bytes: int = 2, cp: int = 1) -> float:
    """Korthikanti et al. 2022 Table 2 (16-bit activations, ``cost_model``), scaled to
    ``dtype_bytes``."""
    from .cost_model import activation_bytes_per_layer
    return activation_bytes_per_layer(s, b, h, a, t, sp, recompute, cp) * dtype_bytes / 2.0


def stage_param_elems(mc, lay: Layout, stage: int) -> float:
    """Local parameter elements on a rank of pipeline stage ``stage`` (tp shares from the
    placements the tensor-parallel pass gave the model, replicated ones in full)."""
    k = mc.num_layers / lay.p
    n, rep = mc.params_layer * k, mc.replicated_layer * k
    if stage == 0:
        n += mc.params_pre
        rep += mc.replicated_pre
    if stage == lay.p - 1 and (lay.p > 1 or not mc.tied_embedding):
        n += mc.params_post
        rep += mc.replicated_post
    # routed experts (expert tensor parallel over t) split over ep as well
    ex = getattr(mc, "expert_params", 0) / max(mc.num_layers, 1) * k * (1 - 1 / lay.ep)
    return (n - rep) / lay.t + rep - ex / lay.t


def predict(mc, lay: Layout, limit: Optional[int] = None, stages=None) -> MemoryPrediction:
    """Every pipeline stage's predicted peak for a model cost ``mc`` (planner.ModelCost)."""
    e = PARAM_BYTES[lay.precision]
    s, h, a, V = mc.seq, mc.hidden, max(mc.heads, 1), mc.vocab or 0
    sp_div = lay.t if lay.sp else 1
    sbh = s / lay.cp * lay.b * h          # this rank's tokens (cp splits the sequence)
    per_layer = layer_activation_bytes(s, lay.b, h, a, lay.t, lay.sp, lay.recompute, e, lay.cp)
    chunks = lay.p * lay.v
    per_chunk_layers = mc.num_layers / chunks
    out = []
    for st in (range(lay.p) if stages is None else stages):
        acts = []
        for ch in range(st, chunks, lay.p):
            x = per_chunk_layers * per_layer
            if ch == 0:    # embedding output and its dropout mask
                x += sbh * (e + 1) / sp_div
            if ch == chunks - 1 and V:   # final norm input, fp32 log-probabilities
                x += sbh * e / sp_div + 4.0 * s / lay.cp * lay.b * V / lay.t
            acts.append(x)
        none = layer_activation_bytes(s, lay.b, h, a, lay.t, lay.sp, "none", e, lay.cp)
        # while a layer's backward runs, what it recomputed is alive again
        rc_layer = none - per_layer if lay.recompute in ("full", "selective") else 0.0
        # a deferred weight-gradient half keeps each weight GEMM's input (7h per token in a
        # GPT layer) and output gradient (9h) of one chunk-microbatch
        deferred = per_chunk_layers * 16.0 * sbh * e / lay.t \
            if lay.p > 1 and lay.split_backward and (st > 0 or lay.v > 1) else 0.0
        # a received boundary is the residual stream, whole after scatter/gather (1/t with SP)
        recv = sum(sbh * e / sp_div * ((ch > 0) + (ch < chunks - 1))
                   for ch in range(st, chunks, lay.p))
        ws = 2.0 * 4.0 * s / lay.cp * lay.b * V / lay.t if st == lay.p - 1 and V \
            else 2.0 * sbh * e
        gathered = 2.0 * e * mc.params_layer / lay.t if lay.fs > 1 else 0.0
        out.append(stage_memory(st, lay, stage_param_elems(mc, lay, st), acts, rc_layer,
                                deferred, recv, ws, gathered))
    return MemoryPrediction(lay, out, "model cost (Korthikanti et al. 2022 per-layer bytes)",
                            limit)


# ---- source 2: this rank's transformed program ---------------------------------------------
def _tensor_bytes(v) -> int:
    import torch
    if isinstance(v, torch.Tensor):
        return int(math.prod(int(d) for d in v.shape)) * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_tensor_bytes(x) for x in v)
    return 0


@dataclasses.dataclass
class _ChunkFacts:
    saved: int          # bytes a trial partition saves for backward per microbatch
    outside: int        # of which saved by nodes outside any layer
    recomputed: int     # bytes of the largest layer's recomputed values
    largest: int        # largest single intermediate
    wgrad: int          # held by a deferred weight-gradient half (_wgrad_bytes)
    recomputed_total: int  # every layer's recomputed values (recompute_holds summed)
    layers: int
    residual: int       # bytes of a layer's output


def _sdpa_internals(n) -> int:
    """Bytes an attention node on the math path materialises inside itself when it runs
    (scores, probabilities, dropout mask and output, the probabilities' gradient): what
    recomputing it in backward holds at once; 0 for other nodes."""
    import torch
    if n.target is not torch.ops.aten.scaled_dot_product_attention.default:
        return 0
    q, k = (a.meta.get("val") for a in n.args[:2])
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return 0
    scores = math.prod(int(d) for d in q.shape[:-1]) * int(k.shape[-2])
    return scores * (4 * q.element_size() + 1)


_GEMMS = ("linear", "mm", "addmm", "matmul", "bmm", "baddbmm")


def _reads_param(a, depth: int = 6) -> bool:
    """Is ``a`` a parameter placeholder, through single-input ops (views, casts, tp's f)?"""
    while depth and a is not None and hasattr(a, "op"):
        if a.op == "placeholder":
            return a.meta.get("ptdp_input_kind") == "param"
        ins = a.all_input_nodes
        if len(ins) != 1:
            return False
        a, depth = ins[0], depth - 1
    return False


def _wgrad_bytes(gm) -> int:
    """What a deferred weight-gradient half holds for one microbatch: each weight GEMM's
    activation input and its output gradient (the same size as its output)."""
    total = 0
    for n in gm.graph.nodes:
        name = getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
        if n.op != "call_function" or name not in _GEMMS:
            continue
        ins = [a for a in n.args if hasattr(a, "op")]
        if not any(_reads_param(a) for a in ins):
            continue
        total += _tensor_bytes(n.meta.get("val"))
        total += sum(_tensor_bytes(a.meta.get("val")) for a in ins if not _reads_param(a))
    return total


def _chunk_facts(gm) -> _ChunkFacts:
    from torch.utils.checkpoint import CheckpointPolicy
    from ..codegen.partition import trial_partition
    from ..graph_utils import layer_spans
    rows = trial_partition(gm)
    saved = sum(b for _, b, _ in rows)
    layer_of = {n.name: n.meta.get("ac_graph_id", 0) for n in gm.graph.nodes}
    outside = sum(b for _, b, origin in rows if not 0 < layer_of.get(origin, 0) < (1 << 30))
    per_layer: dict = {}
    largest = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        nb = _tensor_bytes(n.meta.get("val"))
        largest = max(largest, nb)
        if n.meta.get("recompute") == CheckpointPolicy.MUST_RECOMPUTE:
            nb += _sdpa_internals(n)
            lid = n.meta.get("ac_graph_id", 0)
            if 0 < lid < (1 << 30):
                per_layer[lid] = per_layer.get(lid, 0) + nb
    if any(n.meta.get("recompute") == CheckpointPolicy.MUST_RECOMPUTE for n in gm.graph.nodes
           if 0 < n.meta.get("ac_graph_id", 0) < (1 << 30)):
        # what a layer's backward holds again = its saves with nothing recomputed − now
        from ..passes.recompute import recompute_holds
        per_layer = recompute_holds(gm, trial_partition)
    spans = layer_spans(gm)
    residual = max((_tensor_bytes(out.meta.get("val")) for _, out in spans), default=0)
    return _ChunkFacts(saved, outside, max(per_layer.values(), default=0), largest,
                       _wgrad_bytes(gm), sum(per_layer.values()), len(spans), residual)


def predict_program(program, config, microbatch_size: int = 1, pp_rank: int = 0,
                    limit: Optional[int] = None, local_elems: Optional[float] = None
                    ) -> MemoryPrediction:
    """This rank's predicted peak from ``program`` (built with ``until="passes"`` or
    later): activation bytes from a trial partition of each local chunk, parameters
    from the plan's local shapes (``local_elems`` overrides)."""
    lay = Layout.from_config(config, microbatch_size)
    if local_elems is None:
        names = set(program.stage.local_params) if program.stage is not None else None
        local_elems = sum(math.prod(pp_.local_shape or pp_.full_shape)
                          for n, pp_ in program.plan.params.items()
                          if names is None or n in names)
    acts, rc_layers, largest, recv, facts = [], [], 0, 0.0, []
    for k, ch in sorted(program.chunks.items()):
        f = _chunk_facts(ch.gm)
        inputs = sum(mt.numel * mt.dtype.itemsize for mt in ch.in_meta)
        outputs = sum(mt.numel * mt.dtype.itemsize for mt in ch.out_meta)
        # a received input is a chunk input autograd keeps; a sent output stays alive until
        # its gradient arrives (the runtime calls backward on it)
        acts.append(f.saved + inputs + outputs)
        rc_layers.append(f.recomputed)
        largest = max(largest, f.largest)
        recv += inputs + outputs
        facts.append(f)
    p = config.pp
    # chunks that receive from a peer split their backward (program.StageMap); at most one
    # backward's W waits past a compute step
    # (measured: with recompute, a split chunk also keeps every layer's recomputed values
    # until W has run, not one layer's: D recomputes the chunk and W reads from it)
    split = [f.wgrad + (f.recomputed_total if lay.recompute != "none" else 0)
             for (k, _), f in zip(sorted(program.chunks.items()), facts)
             if program.stage is not None and program.stage.receives_from_peer(k)]
    deferred = max(split, default=0) if p > 1 and config.split_backward else 0.0
    # backward of a layer with recomputed values holds them (and their gradients' share)
    rc_layer = max(rc_layers) if lay.recompute != "none" else 0.0
    # dp_shard: the largest two buckets' gathered weights (current + prefetched)
    buckets = sorted((b for _, _, b in getattr(program.plan, "fsdp_buckets", [])), reverse=True)
    st = stage_memory(pp_rank, lay, local_elems, acts, rc_layer, deferred, recv, 3.0 * largest,
                      float(sum(buckets[:2])))
    n = max(len(facts), 1)
    st.layers = round(sum(f.layers for f in facts) / n)
    st.residual = max((f.residual for f in facts), default=0)
    st.outside = sum(f.outside for f in facts) / n
    pred = MemoryPrediction(lay, [st], "trial partition of this rank's chunks", limit)
    pred.notes.append("activations: bytes the compiled partition saves for backward per "
                      "microbatch (recompute tags honoured); workspace: 3x the largest "
                      "intermediate (its value, its gradient and the next; calibrated on CPU)")
    return pred


# ---- a limit: refuse, and say what would fit --------------------------------------------------
def cheapest_fit(evaluate, lay: Layout, limit: int, world: Optional[int] = None) -> list:
    """Changes to ``lay`` that fit under ``limit``, cheapest first: [(description, peak)].
    ``evaluate(layout) -> MemoryPrediction or None`` (None: not possible for the model)."""
    tries = []
    if lay.grad_ranks > 1 and not lay.zero:
        tries.append(("distributed_optimizer=True (ZeRO-1: optimizer states 1/d)",
                      dataclasses.replace(lay, zero=True)))
    order = ["none", "selective", "full"]
    if lay.recompute in order:
        for rc in order[order.index(lay.recompute) + 1:]:
            tries.append((f"recompute={rc!r}", dataclasses.replace(lay, recompute=rc)))
    if lay.t > 1 and not lay.sp:
        tries.append(("sequence_parallel=True", dataclasses.replace(lay, sp=True)))
    p2 = lay.p * 2
    if lay.d % 2 == 0:
        tries.append((f"pp={p2} (dp={lay.d // 2})",
                      dataclasses.replace(lay, p=p2, d=lay.d // 2, m=max(lay.m, p2))))
    out = []
    for desc, alt in tries:
        pred = evaluate(alt)
        if pred is not None and pred.peak <= limit:
            out.append((desc, pred.peak))
    # combined: ZeRO-1 + full recompute as a last resort
    if not out and lay.grad_ranks > 1:
        alt = dataclasses.replace(lay, zero=True, recompute="full")
        pred = evaluate(alt)
        if pred is not None and pred.peak <= limit:
            out.append(("distributed_optimizer=True and recompute='full'", pred.peak))
    return out


def cheapest_fit_program(pred: MemoryPrediction) -> list:
    """``cheapest_fit`` for a prediction from a program: the alternatives are estimated
    from its components (ZeRO-1 re-prices the state; full recompute keeps one residual
    checkpoint per layer; pp×2 halves the stage and doubles its in-flight microbatches)."""
    st, lay = pred.worst, pred.layout

    def evaluate(alt: Layout):
        new = dataclasses.replace(st)
        new.params, new.grads, new.optimizer = state_bytes(st.elems, alt)
        new.grads_bucketed = grads_bucketed(alt)
        if alt.recompute != lay.recompute:
            if alt.recompute != "full" or not st.layers:
                return None        # selective from a program: not estimated here
            new.per_microbatch = st.outside + st.layers * st.residual
            new.recompute_workspace = max(st.recompute_workspace,
                                          (st.per_microbatch - st.outside) / st.layers)
            new.activations = new.per_microbatch * st.inflight
        if alt.p != lay.p:
            new.params, new.grads, new.optimizer = state_bytes(st.elems / 2, alt)
            inflight = expected_peak_inflight(alt.sched, alt.p, alt.v, alt.m, 0)
            new.per_microbatch = st.per_microbatch / 2
            new.activations, new.inflight = new.per_microbatch * inflight, inflight
        return MemoryPrediction(alt, [new], pred.source)
    return cheapest_fit(evaluate, lay, pred.limit)


def refusal(pred: MemoryPrediction, limit: int, fixes: list) -> str:
    lines = [f"the layout is predicted to need {fmt(pred.peak)} on its busiest rank "
             f"(pipeline stage {pred.worst.stage}), over memory_limit={fmt(limit)}:"]
    lines += pred.lines("  ")
    if fixes:
        desc, peak = fixes[0]
        lines.append(f"cheapest change that fits: {desc} -> {fmt(peak)}")
        for d_, pk in fixes[1:]:
            lines.append(f"  also fits: {d_} -> {fmt(pk)}")
    else:
        lines.append("no single change (ZeRO-1, more recompute, sequence parallelism, a larger "
                     "pp) fits: add devices, or lower the microbatch size")
    return "\n".join(lines)


__all__ = ["Layout", "StageMemory", "MemoryPrediction", "predict", "predict_program",
           "parse_bytes", "state_bytes", "cheapest_fit", "cheapest_fit_program", "refusal", "layer_activation_bytes",
           "COMPONENTS"]

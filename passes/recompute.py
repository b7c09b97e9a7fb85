"""Activation recomputation: tag every forward node *save* or *recompute*.

Modes (``ParallelConfig.recompute``):

- ``"none"``: nothing is recomputed — every value the backward needs is saved (the
  baseline of Korthikanti et al. 2022, 34sbh + 5as²b bytes per layer).

  What "saved" means (``ParallelConfig.recompute_pointwise``). True (the default): a
  value the mode does not recompute is tagged PREFER_SAVE, so AOTAutograd's min-cut
  partitioner may still recompute it where that is free — a pointwise op (GeLU, a
  norm's elementwise tail) fused into the backward kernel that reads its input anyway —
  as plain ``torch.compile`` does: fewer bytes kept and fewer kernels run (on one H100,
  a 4-layer h=4096 GPT step ~3% faster). False: MUST_SAVE, exactly the set the paper's
  Table 2 counts (what ``benchmarks/activation_memory.py`` reproduces). Each layer's
  output (the residual stream) is always MUST_SAVE.
- ``"selective"``: the attention core — Q·Kᵀ, scaling, masking, softmax, attention
  dropout, probs·V — is recomputed; everything else is saved (34sbh/t with TP+SP). The
  core is found by dataflow: a softmax fed (through single-activation elementwise ops)
  by a matmul of two activations, feeding a matmul with another activation. An
  ``aten.scaled_dot_product_attention`` that runs as a fused kernel (flash / efficient:
  no s² tensors kept) is left as it is; one that falls back to the math path (e.g.
  dropout on CPU) is recomputed, so its s² intermediates are not kept either.
- ``"full"``: only each layer's input (the residual stream at a layer boundary) is
  saved; the rest of the layer is recomputed in backward (2sbh per layer, /t with SP).
  Measured from outside (saved_tensors_hooks around ``pm.train_step``, tests/test_memory.py,
  benchmarks/activation_memory.py): exactly one (b, s, h) tensor per layer, plus the
  generator state each recomputed dropout replays (an 8-byte seed under Inductor at t=1;
  the 5056-byte CPU generator state under aot_eager and for tp-rank dropouts).
- ``{"budget_bytes": N}``: per layer, choose what to recompute so the bytes saved for
  backward on this rank (one microbatch) stay ≤ N at the least recompute FLOPs: a
  multiple-choice knapsack over per-layer options (none, the attention core, greedy
  FLOP-cheap/byte-heavy node sets, full) costed from the graph (``node_flops``) and a
  trial partition that says how many bytes each node leaves saved.

In every mode, values computed only from inputs (masks, position ids) are recomputed,
and with sequence parallelism the all-gathered input of a column-parallel linear is
re-gathered in backward rather than stored (Megatron-SP stores the sequence shard;
``sp_regather=False`` stores the gathered tensor instead, as DTensor plans do).

Guarantees afterwards: every compute node has ``node.meta["recompute"]`` (a
``CheckpointPolicy``), ``node.meta["ac_graph_id"]`` (its layer + 1, 0 outside layers)
and ``node.meta["custom"]["ptdp_node"]`` (its name, to trace saved tensors back); the
graph itself is unchanged. The codegen partitioner (``codegen/partition.py``) honours
the tags; recomputed dropout replays the forward's RNG state, so masks are identical.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from ptdp_compiler.collectives import TP_COLLECTIVES
from ptdp_compiler.errors import ConfigError

from ptdp_compiler.graph_utils import input_only as _input_only
from ptdp_compiler.graph_utils import DROPOUT_OPS, is_op, layer_spans, node_flops, numel

from .cp_ops import CP_COLLECTIVES
from .cp_rules import regathered as cp_regathered
from .expert_parallel import EP_REPLAYABLE, ep_redispatched
from .tp_gather_weights import is_weight_gather

aten = torch.ops.aten
SAVE, RECOMPUTE = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.MUST_RECOMPUTE
# saved unless the min-cut partitioner finds recomputing it free (a pointwise op it fuses
# into the backward kernel that reads its input anyway); it never recomputes matmuls,
# random ops or ops outside its allowlist (collectives, custom ops)
PREFER_SAVE = CheckpointPolicy.PREFER_SAVE

_MATMUL2 = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
# ops whose output shares its input's storage (contiguous: when already contiguous)
_VIEWS = frozenset({aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.t,
                    aten.permute, aten.expand, aten.slice, aten.select, aten.unsqueeze,
                    aten.squeeze, aten.alias, aten.split, aten.split_with_sizes, aten.unbind,
                    aten.chunk, aten.detach, aten.narrow, aten.unflatten, aten.flatten,
                    aten.contiguous, aten._assert_tensor_metadata, operator.getitem})
# bytes of the RNG state the partitioner saves per recomputed random op
RNG_STATE_BYTES = {"cpu": int(torch.get_rng_state().numel()), "cuda": 16}


def _is_view(n: fx.Node) -> bool:
    return is_op(n, *_VIEWS)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _bytes(n: fx.Node) -> int:
    v = _val(n)
    if isinstance(v, torch.Tensor):
        return numel(v) * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(numel(x) * x.element_size() for x in v if isinstance(x, torch.Tensor))
    return 0


def _is_random(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if is_op(n, *DROPOUT_OPS) or (hasattr(n.target, "tags") and
                                  torch.Tag.nondeterministic_seeded in n.target.tags):
        p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        return not isinstance(p, (int, float)) or p > 0
    if n.target is aten.scaled_dot_product_attention.default:
        p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
        return p > 0
    return False


# ---- what is the attention core (layers: graph_utils.layer_spans) -------------------------
def _activation(a, input_only) -> bool:
    return isinstance(a, fx.Node) and a not in input_only and \
        a.meta.get("ptdp_input_kind") not in ("param", "buffer", "constant") and \
        a.op != "get_attr"


def attention_cores(gm: fx.GraphModule) -> list:
    """Sets of nodes forming an explicit attention core (Q·Kᵀ … probs·V), by dataflow."""
    input_only = _input_only(gm)
    cores = []
    for s in gm.graph.nodes:
        if s.op != "call_function" or s.target not in _SOFTMAX:
            continue
        size = _val(s).numel() if isinstance(_val(s), torch.Tensor) else None
        back, n, qk = [], s.args[0], None
        while isinstance(n, fx.Node) and n.op == "call_function":
            acts = [a for a in n.all_input_nodes if _activation(a, input_only)]
            if n.target in _MATMUL2 and len(acts) == 2:
                qk = n
                break
            if len(acts) != 1 or not isinstance(_val(n), torch.Tensor) or \
                    _val(n).numel() != size:
                break
            back.append(n)
            n = acts[0]
        if qk is None:
            continue
        fwd, pv, frontier, seen = [], None, [s], {s}
        while frontier and pv is None:
            m = frontier.pop()
            for u in m.users:
                if u in seen or u.op != "call_function":
                    continue
                acts = [a for a in u.all_input_nodes if _activation(a, input_only)]
                if u.target in _MATMUL2 and u.args[0] is m and len(acts) == 2:
                    pv = u
                    break
                # a node rejected now may be accepted once its other inputs join the chain
                v = _val(u)
                # an op that only mixes values of the chain (a dropout drawn from a detached
                # copy of the probabilities, then multiplied in) stays in the core
                closed = all(x in seen or x is s for x in acts)
                if u.target is operator.getitem or (isinstance(v, torch.Tensor) and
                                                    v.numel() == size and closed):
                    seen.add(u)
                    fwd.append(u)
                    frontier.append(u)
        if pv is not None:
            cores.append({qk, *back, s, *fwd, pv})
    return cores


def sdpa_is_fused(n: fx.Node) -> bool:
    """Would this scaled_dot_product_attention run a fused kernel (flash / efficient /
    cuDNN, which keep no s² tensors) rather than the math path? Asked of the dispatcher
    with small real tensors of the same head dim, dtype, device, mask and dropout."""
    q, k, v = (_val(a) for a in n.args[:3])
    mask = _val(n.args[3]) if len(n.args) > 3 else _val(n.kwargs.get("attn_mask"))
    p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
    causal = n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False)
    try:
        def small(x):
            return torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device.type)
        m = small(mask) if isinstance(mask, torch.Tensor) else None
        choice = torch._fused_sdp_choice(small(q), small(k), small(v), m, p, causal)
        return int(choice) != int(torch.nn.attention.SDPBackend.MATH)
    except Exception:
        return False


# ---- the plan ---------------------------------------------------------------------------------
@dataclasses.dataclass
class LayerChoice:
    index: int
    option: str                    # none | selective | full | greedy-k | selective+greedy-k
    recomputed: list               # node names
    saved: list                    # (node name, bytes) — estimated, from the trial partition
    saved_bytes: int = 0
    recompute_flops: float = 0.0
    forward_flops: float = 0.0


@dataclasses.dataclass
class RecomputeReport:
    mode: str
    layers: list                   # LayerChoice
    outside_saved_bytes: int = 0   # saved by nodes outside any layer (embedding, head, loss)
    budget_bytes: Optional[int] = None
    forward_flops: float = 0.0     # whole graph
    notes: list = dataclasses.field(default_factory=list)
    estimated: bool = False        # saved bytes filled in (trial partition ran)

    @property
    def recompute_flops(self) -> float:
        return sum(c.recompute_flops for c in self.layers)

    @property
    def saved_bytes(self) -> int:
        return sum(c.saved_bytes for c in self.layers) + self.outside_saved_bytes

    def overhead_pct(self) -> float:
        """Recompute FLOPs as a percentage of the forward+backward FLOPs (3× forward)."""
        return 100.0 * self.recompute_flops / (3 * self.forward_flops or 1.0)

    def summary(self) -> str:
        opts = {}
        for c in self.layers:
            opts[c.option] = opts.get(c.option, 0) + 1
        s = (f"recompute={self.mode}: {len(self.layers)} layers "
             f"({', '.join(f'{k}×{v}' for k, v in opts.items())}); recompute overhead "
             f"{self.overhead_pct():.1f}% of step FLOPs")
        if self.estimated:
            s += f"; ~{self.saved_bytes:,} bytes saved for backward per microbatch"
        if self.budget_bytes is not None:
            s += f" (budget {self.budget_bytes:,})"
        return s


def replayable(n: fx.Node) -> bool:
    """May the partitioner recompute ``n``? ATen ops yes (random ones are replayed from a
    saved RNG state); custom ops only when known deterministic — a custom op may draw
    random numbers the partitioner cannot replay (it replays only ops tagged
    ``nondeterministic_seeded``), and recomputing it would change the mask."""
    t = n.target
    if not isinstance(t, torch._ops.OpOverload) or t.namespace in ("aten", "prims"):
        return True
    if torch.Tag.nondeterministic_seeded in t.tags:
        return True
    # ptdp's own collectives are deterministic: safe to run again in backward
    return t in TP_COLLECTIVES or t in CP_COLLECTIVES or t in EP_REPLAYABLE


def _tag(gm, layers, recomputed: set, input_only: set, always: set, free: set = frozenset()):
    layer_of = {n: i + 1 for i, span in enumerate(layers) for n in span}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        n.meta.setdefault("custom", {})["ptdp_node"] = n.name
        # inputs-only values (masks) get no layer: the partitioner turns a recomputed node
        # whose recomputed user has a larger ac_graph_id into a saved one (checkpoint-region
        # boundary), which would store a per-layer copy of an s×s mask
        n.meta["ac_graph_id"] = 1 << 30 if n in input_only else layer_of.get(n, 0)
        if (n in input_only or n in always or n in recomputed) and replayable(n):
            n.meta["recompute"] = RECOMPUTE
        elif n in free:
            n.meta["recompute"] = PREFER_SAVE
        else:
            n.meta["recompute"] = SAVE
        n.meta.setdefault("ptdp", {})["recompute"] = \
            "recompute" if n.meta["recompute"] is RECOMPUTE else "save"


class _CostModel:
    """Estimates bytes left saved and FLOPs recomputed for a set R of recomputed nodes,
    from a trial partition of the all-save tagging (bytes each node's storage keeps)."""

    def __init__(self, gm, base_bytes: dict):
        self.base = base_bytes          # node -> bytes saved in the no-recompute partition
        self.device = next((v.device.type for n in gm.graph.nodes
                            if isinstance(v := _val(n), torch.Tensor)), "cpu")

    @staticmethod
    def storage(a: fx.Node) -> fx.Node:
        while _is_view(a) and a.args and isinstance(a.args[0], fx.Node):
            a = a.args[0]
        return a

    def evaluate(self, span: list, R: set) -> tuple:
        """(saved bytes of the span's nodes, recompute FLOPs) when R ⊆ span is recomputed."""
        live: set = set()
        for n in reversed(span):
            if n in R and (self.base.get(n, 0) > 0 or any(u in live for u in n.users) or
                           any(self.storage(u) in live for u in n.users if _is_view(u))):
                live.add(n)
        need_out = set()
        for r in live:
            for a in r.all_input_nodes:
                b = self.storage(a)
                if b not in R:
                    need_out.add(b)
        saved = 0
        for n in span:
            if n in R:
                continue
            b = self.base.get(n, 0)
            if n in need_out:
                b = max(b, _bytes(n))
            saved += b
        rng = sum(RNG_STATE_BYTES.get(self.device, 16) for r in live if _is_random(r))
        return saved + rng, sum(node_flops(r) for r in live)


def _options(span: list, core: set, model: _CostModel, output: fx.Node, skip: set) -> list:
    """Candidate recompute sets for one layer: [(name, R)]."""
    cands = [n for n in span if n is not output and n not in skip and not _is_view(n)]
    opts = [("none", set()), ("full", set(cands))]
    if core:
        opts.append(("selective", set(core)))
    for label, start in (("greedy", set()), ("selective+greedy", set(core))):
        if label != "greedy" and not core:
            continue
        R = set(start)
        b0, f0 = model.evaluate(span, R)
        for k in range(1, len(cands) + 1):
            best, best_r = None, -1.0
            for c in cands:
                if c in R:
                    continue
                b, f = model.evaluate(span, R | {c})
                freed, extra = b0 - b, f - f0
                if freed <= 0:
                    continue
                ratio = freed / (extra + 1.0)
                if ratio > best_r:
                    best, best_r, bb, ff = c, ratio, b, f
            if best is None:
                break
            R = R | {best}
            b0, f0 = bb, ff
            opts.append((f"{label}-{k}", set(R)))
    return opts


def _knapsack(per_layer: list, budget: int) -> Optional[list]:
    """per_layer: [[(bytes, flops, option index)]]; pick one per layer, Σbytes ≤ budget,
    min Σflops. Pareto frontier DP (bytes ascending, flops strictly descending)."""
    frontier = [(0, 0.0, [])]
    for opts in per_layer:
        nxt = []
        for b0, f0, picks in frontier:
            for b, f, i in opts:
                if b0 + b <= budget:
                    nxt.append((b0 + b, f0 + f, picks + [i]))
        nxt.sort(key=lambda x: (x[0], x[1]))
        frontier, best = [], math.inf
        for item in nxt:
            if item[1] < best - 1e-9:
                frontier.append(item)
                best = item[1]
        if len(frontier) > 4000:   # thin out: keep the cheapest-flops points evenly
            step = len(frontier) / 4000
            frontier = [frontier[int(i * step)] for i in range(4000)] + [frontier[-1]]
        if not frontier:
            return None
    return min(frontier, key=lambda x: (x[1], x[0]))[2]


def recompute_pass(gm: fx.GraphModule, mode, sp_regather: bool = False,
                   pointwise: bool = True, trial: Optional[Callable] = None):
    """Tag ``gm`` for ``mode``; returns ``(gm, RecomputeReport)`` (the graph is tagged in
    place; see the module docstring for the guarantees). ``pointwise``: values the mode
    saves are PREFER_SAVE (the partitioner may recompute cheap fused pointwise ops)
    rather than MUST_SAVE, except each layer's output (the residual stream).
    ``trial(gm)``: codegen's trial partition of the tagged graph (rows of what it saves
    for backward: joint node, bytes, captured node), which the budget mode costs with;
    ``program.build_program`` hands in ``codegen.partition.trial_partition``."""
    budget = None
    if isinstance(mode, dict):
        budget = int(mode["budget_bytes"])
        mode_name = "budget"
        if trial is None:
            raise ValueError("recompute_pass in budget mode needs trial=, a trial partition "
                             "(codegen.partition.trial_partition)")
    else:
        mode_name = mode
    input_only = {n for n in _input_only(gm) if n.op == "call_function"}
    spans = layer_spans(gm)
    layers = [span for span, _ in spans]
    outputs = [out for _, out in spans]   # the residual stream leaving each layer
    in_layer = {n for span in layers for n in span}
    cores = attention_cores(gm)
    for n in gm.graph.nodes:     # SDPA cores: recompute only where the math path runs
        if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default \
                and not sdpa_is_fused(n):
            cores.append({n})
    fused = [n.name for n in gm.graph.nodes if n.op == "call_function" and
             n.target is aten.scaled_dot_product_attention.default and sdpa_is_fused(n)]
    core_nodes = set().union(*cores) if cores else set()
    regather = set()
    if sp_regather:
        regather = {n for n in in_layer if n.target is torch.ops.ptdp.sp_gather.default}
    regather |= cp_regathered(in_layer)   # context parallelism's K/V all-gathers
    # weights stored split over tp (tp_gather_weights): gathered again in backward, so
    # only the shard is kept
    weights = {n for n in gm.graph.nodes if is_weight_gather(n)}
    redispatch = ep_redispatched(in_layer) if mode_name not in ("none", "budget") else set()
    regather |= redispatch
    flops = {n: node_flops(n) for n in gm.graph.nodes}
    report = RecomputeReport(mode_name, [], budget_bytes=budget,
                             forward_flops=sum(flops.values()))
    if fused:
        report.notes.append(f"{len(fused)} scaled_dot_product_attention node(s) run a fused "
                            "kernel that keeps no s² activations: left as they are")
    if redispatch:
        report.notes.append(f"expert parallelism: "
                            f"{sum(1 for n in redispatch if n.target in EP_REPLAYABLE)} token "
                            "dispatch(es) re-run in backward: their counts are kept, not the "
                            "received rows")
    if regather:
        report.notes.append(f"sequence parallel: {len(regather)} all-gathered linear inputs "
                            "are re-gathered in backward instead of stored")
    if weights:
        report.notes.append(f"{len(weights)} weight all-gather(s) (weights stored split over "
                            "tp, computed whole) re-run in backward: only the shards are kept")
    regather |= weights
    skip = input_only | regather
    free = {n for n in gm.graph.nodes if n.op == "call_function"} - set(outputs) \
        if pointwise else set()
    choices: list = []
    if mode_name in ("none", "selective", "full"):
        for i, span in enumerate(layers):
            if mode_name == "none":
                R, opt = set(), "none"
            elif mode_name == "selective":
                R, opt = {n for n in span if n in core_nodes}, "selective"
            else:
                R = {n for n in span if n is not outputs[i] and n not in skip}
                opt = "full"
            choices.append((opt, R))
    else:
        model = _CostModel(gm, baseline_bytes(gm, layers, input_only, regather, trial))
        per_layer, all_opts = [], []
        for i, span in enumerate(layers):
            core = {n for n in span if n in core_nodes}
            opts = _options(span, core, model, outputs[i], skip)
            scored = [(*model.evaluate(span, R), j) for j, (_, R) in enumerate(opts)]
            per_layer.append(scored)
            all_opts.append(opts)
        outside = sum(b for n, b in model.base.items() if n not in in_layer)
        target = budget - outside
        for _attempt in range(6):
            picks = _knapsack(per_layer, target)
            if picks is None:
                least = outside + sum(min(s[0] for s in sc) for sc in per_layer)
                raise ConfigError(
                    f"recompute={{'budget_bytes': {budget}}} is below the least this program "
                    f"can save for backward per microbatch on this rank (~{least:,} bytes, "
                    "with full recomputation); raise the budget, use more microbatches or "
                    "more tp")
            choices = [all_opts[i][j] for i, j in enumerate(picks)]
            # the cost model is an estimate: check the choice with a trial partition and
            # tighten the target by the overshoot until it fits
            _tag(gm, layers, set().union(*(R for _, R in choices)), input_only, regather,
                 free)
            got = sum(b for _, b, _ in trial(gm))
            if got <= budget:
                break
            target -= got - budget
        else:
            raise ConfigError(f"recompute={{'budget_bytes': {budget}}}: no choice of "
                              f"recomputed nodes fits (last try saved {got:,} bytes); "
                              "raise the budget")
    choices = [(opt, {n for n in R if replayable(n)}) for opt, R in choices]
    for i, (opt, R) in enumerate(choices):
        report.layers.append(LayerChoice(
            i, opt, [n.name for n in layers[i] if n in R], [],
            recompute_flops=sum(flops[n] for n in R),
            forward_flops=sum(flops[n] for n in layers[i])))
    recomputed = set().union(*(R for _, R in choices)) if choices else set()
    _tag(gm, layers, recomputed, input_only, regather, free)
    if pointwise:
        report.notes.append("values not recomputed are saved unless the partitioner can "
                            "recompute them for free (pointwise ops fused into backward "
                            "kernels); recompute_pointwise=False saves exactly Table 2's set")
    if mode_name == "budget":
        estimate(gm, report, trial)
    gm.meta["ptdp_recompute_layers"] = [[n.name for n in s] for s in layers]
    return gm, report


def baseline_bytes(gm, layers, input_only, regather, trial: Callable) -> dict:
    """Bytes each node keeps saved when nothing (but inputs-only values and SP re-gathers)
    is recomputed: a trial partition on fake inputs."""
    _tag(gm, layers, set(), input_only, regather)
    return _attribute(gm, trial(gm))


def _attribute(gm, rows) -> dict:
    by_name = {n.name: n for n in gm.graph.nodes}
    out: dict = {}
    for _joint, nbytes, origin in rows:
        n = by_name.get(origin)
        if n is not None:
            out[n] = out.get(n, 0) + nbytes
    return out


def estimate(gm: fx.GraphModule, report: RecomputeReport,
             trial: Optional[Callable] = None) -> RecomputeReport:
    """Fill per-layer saved bytes from a trial partition (``trial(gm)``) of the current
    tags; ``program.Program.estimate_saved_bytes`` calls it with codegen's."""
    if report.estimated:
        return report
    if trial is None:
        raise ValueError("the recompute report's saved bytes are not estimated yet: call "
                         "Program.estimate_saved_bytes() (a trial partition) first")
    rows = trial(gm)
    per_node = _attribute(gm, rows)
    by_name = {n.name: n for n in gm.graph.nodes}
    spans = gm.meta.get("ptdp_recompute_layers", [])
    in_layer = set()
    for c, names in zip(report.layers, spans):
        nodes = [by_name[x] for x in names]
        in_layer.update(nodes)
        c.saved = [(n.name, per_node[n]) for n in nodes if per_node.get(n, 0)]
        c.saved_bytes = sum(b for _, b in c.saved)
    attributed = sum(per_node.values())
    total = sum(b for _, b, _ in rows)
    report.outside_saved_bytes = sum(b for n, b in per_node.items() if n not in in_layer) + \
        (total - attributed)
    report.estimated = True
    return report


def explain_lines(gm: fx.GraphModule, report: RecomputeReport, max_names: int = 6) -> list:
    """Per layer: what is saved and what recomputed, with bytes, and the FLOP overhead
    (``report`` estimated: ``Program.estimate_saved_bytes``)."""
    estimate(gm, report)
    lines = [f"    recompute: {report.summary()}"]
    for note in report.notes:
        lines.append(f"      note: {note}")
    for c in report.layers:
        pct = 100.0 * c.recompute_flops / (3 * c.forward_flops or 1.0)
        saved = ", ".join(f"{n} {b:,}B" for n, b in sorted(c.saved, key=lambda x: -x[1])
                          [:max_names])
        more = f" (+{len(c.saved) - max_names} more)" if len(c.saved) > max_names else ""
        rec = ", ".join(c.recomputed[:max_names]) + \
            (f" (+{len(c.recomputed) - max_names} more)" if len(c.recomputed) > max_names else "")
        lines.append(f"      layer {c.index} [{c.option}]: saves {c.saved_bytes:,} bytes "
                     f"({saved}{more}); recomputes {len(c.recomputed)} ops "
                     f"({rec or '-'}), +{pct:.1f}% of the layer's step FLOPs")
    lines.append(f"      outside layers (embedding, head, loss): "
                 f"{report.outside_saved_bytes:,} bytes saved")
    return lines


def recompute_holds(gm: fx.GraphModule, trial: Callable) -> dict:
    """Per layer (``ac_graph_id``): bytes its backward holds again once it has recomputed
    its values — what the layer would save with nothing recomputed minus what it saves
    now — from two trial partitions (``trial(gm)``). The memory model's recompute
    workspace. The tags are put back as they were; the graph is not changed."""
    def per_layer(rows):
        layer = {n.name: n.meta.get("ac_graph_id", 0) for n in gm.graph.nodes}
        out: dict = {}
        for _joint, nbytes, origin in rows:
            lid = layer.get(origin, 0)
            if 0 < lid < (1 << 30):
                out[lid] = out.get(lid, 0) + nbytes
        return out

    now = per_layer(trial(gm))
    old = {}
    for n in gm.graph.nodes:
        lid = n.meta.get("ac_graph_id", 0)
        if n.op == "call_function" and n.meta.get("recompute") is RECOMPUTE and \
                0 < lid < (1 << 30):
            old[n] = n.meta["recompute"]
            n.meta["recompute"] = SAVE
    try:
        none = per_layer(trial(gm)) if old else now
    finally:
        for n, tag in old.items():
            n.meta["recompute"] = tag
    return {lid: max(0, none.get(lid, 0) - now.get(lid, 0)) for lid in set(now) | set(none)}

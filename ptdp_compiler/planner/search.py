"""Search: enumerate legal (t, p, d, v, b, m, sp, recompute, dp_shard, ep, cp), estimate each with the cost
model (closed form to screen, the schedule simulator for the finalists), keep those that
fit in memory and pick the fastest."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Optional

from ..errors import ConfigError
from .cluster import Cluster
from .cost_model import (BACKWARD_FACTOR, CostOptions, ModelCost, activation_bytes_per_layer,
                         model_flops_per_iteration, nodes_time, param_bytes_per_gpu,
                         tp_allreduces_per_layer, weight_grad_time)
from .hardware import all_gather_time, all_reduce_time, p2p_time, reduce_scatter_time
from .memory import Layout, MemoryPrediction, stage_param_elems
from .memory import predict as predict_memory
from .simulator import SimResult, simulate_config
from ..schedules import SEND_ACT, expected_peak_inflight

RECOMPUTES = ("none", "selective", "full")


@dataclasses.dataclass(frozen=True)
class Candidate:
    t: int
    p: int
    d: int
    v: int
    b: int
    m: int
    sp: bool
    recompute: str
    fs: int = 1          # dp_shard: of the d data-parallel ranks, fs shard the model
    ep: int = 1          # routed experts split over ep of the d data-parallel ranks
    cp: int = 1          # context parallel: each sequence split over cp more ranks

    @property
    def schedule(self) -> str:
        return "interleaved" if self.v > 1 else "1f1b"

    def short(self) -> str:
        return (f"t={self.t} p={self.p} d={self.d} v={self.v} b={self.b} m={self.m} "
                f"sp={'on' if self.sp else 'off'} rc={self.recompute}"
                f"{f' dp_shard={self.fs}' if self.fs > 1 else ''}"
                f"{f' ep={self.ep}' if self.ep > 1 else ''}"
                f"{f' cp={self.cp}' if self.cp > 1 else ''}")

    @property
    def world(self) -> int:
        return self.t * self.p * self.d * self.cp


@dataclasses.dataclass
class Estimate:
    cand: Candidate
    step_time: float
    pipeline_time: float
    dp_time: float
    optimizer_time: float
    bubble: float
    memory: float                # peak bytes on the worst rank
    memory_limit: float
    fits: bool
    samples_per_s: float
    model_tflops_per_gpu: float  # model FLOPs (no recompute) / time / GPU
    paper_tflops_per_gpu: float  # Narayanan et al. 2021 formula (counts full recompute)
    hw_tflops_per_gpu: float     # FLOPs actually executed (incl. the chosen recompute)
    mfu: float
    simulated: bool = False
    breakdown: dict = dataclasses.field(default_factory=dict)
    reason: str = ""


class Evaluator:
    """Predicts step time and memory of one configuration for a model on a cluster."""

    def __init__(self, mc: ModelCost, cluster: Cluster, global_batch: int,
                 opts: CostOptions = CostOptions(), memory_limit: Optional[int] = None):
        self.mc, self.cl, self.B, self.o = mc, cluster, global_batch, opts
        self.user_limit = memory_limit   # memory_limit= (bytes): a hard cap below the GPU's
        self.gpu = cluster.gpu
        self.pairs = tp_allreduces_per_layer(mc.layers[0])
        self._cache: dict = {}

    # ---- per microbatch times ------------------------------------------------------------
    def _tp_link(self, t):
        return self.cl.group_link(t, 1)

    def layer_times(self, b: int, t: int, sp: bool, rc: str, ep: int = 1,
                    stride: int = 1, cp: int = 1) -> tuple:
        """(forward, backward incl. recompute) seconds of one layer for one microbatch;
        ``ep`` > 1 adds the MoE layers' token all-to-all (averaged over the layers);
        ``cp`` > 1 runs s/cp tokens per rank (causal chunks balanced, so attention too is
        1/cp) and adds the K/V all-gather (``cp_time``)."""
        key = ("layer", b, t, sp, rc, ep, stride, cp)
        if key in self._cache:
            return self._cache[key]
        layer = self.mc.layers[0]
        tokens = b / cp          # node costs scale with the tokens a rank holds
        f = nodes_time(layer, self.gpu, tokens, t, sp, self.o)
        act = self.mc.seq * tokens * self.mc.hidden * self.mc.dtype_bytes
        comm = all_reduce_time(act, t, self._tp_link(t)) if t > 1 else 0.0
        f_tot = f + self.pairs * comm
        bwd = BACKWARD_FACTOR * f + self.pairs * comm
        a2a = self.a2a_time(tokens, t, ep, stride)
        f_tot += a2a
        bwd += a2a
        kv_fwd, kv_bwd = self.cp_time(b, t, cp)
        f_tot += kv_fwd
        bwd += kv_bwd
        if rc == "full":
            bwd += f_tot
        elif rc == "selective":
            bwd += nodes_time(layer, self.gpu, tokens, t, sp, self.o,
                              kinds=("attention", "softmax"))
        self._cache[key] = (f_tot, bwd)
        return f_tot, bwd

    def cp_kv_bytes(self, b: int, t: int, cp: int) -> float:
        """Bytes one rank receives per layer and microbatch in forward when context
        parallelism all-gathers K and V: 2·(cp−1)/cp · b·s·kv_width/t elements."""
        mc = self.mc
        if cp == 1:
            return 0.0
        return 2.0 * (cp - 1) / cp * b * mc.seq * (mc.kv_width or mc.hidden) / t * \
            mc.dtype_bytes

    def cp_time(self, b: int, t: int, cp: int) -> tuple:
        """(forward, backward) seconds of context parallelism's K/V traffic per layer and
        microbatch: forward all-gathers K and V over the cp ranks (``t`` apart in the mesh);
        backward gathers them again (they are not kept) and reduce-scatters their
        gradients: three transfers of the same size. Attention waits for them, so they are
        on the critical path."""
        if cp == 1:
            return 0.0, 0.0
        full = 2.0 * b * self.mc.seq * (self.mc.kv_width or self.mc.hidden) / t * \
            self.mc.dtype_bytes
        link = self.cl.group_link(cp, t)
        ag = all_gather_time(full, cp, link)
        return ag, ag + reduce_scatter_time(full, cp, link)

    def a2a_time(self, b: int, t: int, ep: int, stride: int) -> float:
        """Per layer (averaged over all layers) and microbatch, one direction: dispatch +
        combine all-to-alls of the routed tokens, 2·tokens·k·h·(ep−1)/ep bytes per rank,
        over ep ranks ``stride`` apart (ep is carved out of dp)."""
        mc = self.mc
        if ep == 1 or not mc.moe_layers:
            return 0.0
        rows = mc.seq * b * mc.moe_topk
        nbytes = 2.0 * rows * mc.hidden * mc.dtype_bytes * (ep - 1) / ep
        link = self.cl.group_link(ep, stride)
        per_moe = 2 * (ep - 1) * link.latency + nbytes / link.bandwidth
        return per_moe * mc.moe_layers / max(mc.num_layers, 1)

    def edge_times(self, b, t, sp, rc) -> tuple:
        """(pre fwd, pre bwd, post fwd, post bwd): embedding on the first chunk, final norm,
        LM head and loss on the last (``b``: samples, or a fraction of one under cp)."""
        act = self.mc.seq * b * self.mc.hidden * self.mc.dtype_bytes
        ar = all_reduce_time(act, t, self._tp_link(t)) if t > 1 else 0.0
        pf = nodes_time(self.mc.pre, self.gpu, b, t, sp, self.o) + ar
        qf = nodes_time(self.mc.post, self.gpu, b, t, sp, self.o)
        return pf, BACKWARD_FACTOR * pf, qf, BACKWARD_FACTOR * qf + ar

    def p2p(self, c: Candidate) -> float:
        if c.p == 1:
            return 0.0
        nbytes = self.mc.seq * c.b / c.cp * self.mc.hidden * self.mc.dtype_bytes
        stride = c.t * c.d * c.cp
        link = self.cl.group_link(2, stride)
        if c.sp:
            return p2p_time(nbytes / c.t, link)
        if self.o.scatter_gather and c.t > 1:
            return p2p_time(nbytes / c.t, link) + all_gather_time(nbytes, c.t, self._tp_link(c.t))
        return p2p_time(nbytes, link)

    def chunk_costs(self, c: Candidate):
        L = self.mc.num_layers
        per_chunk = L // (c.p * c.v)
        lf, lb = self.layer_times(c.b, c.t, c.sp, c.recompute, c.ep, c.t * c.p, c.cp)
        pf, pb, qf, qb = self.edge_times(c.b / c.cp, c.t, c.sp, c.recompute)
        last = c.p * c.v - 1

        def fwd(ch):
            return per_chunk * lf + (pf if ch == 0 else 0.0) + (qf if ch == last else 0.0)

        def bwd(ch):
            return per_chunk * lb + (pb if ch == 0 else 0.0) + (qb if ch == last else 0.0)
        return fwd, bwd

    def weight_grad_costs(self, c: Candidate):
        """chunk -> seconds of its backward that are weight gradients (the split
        backward's deferred part; the embedding's chunk 0 never defers)."""
        L, g = self.mc.num_layers, (c.b / c.cp, c.t, c.sp)
        per_chunk = L // (c.p * c.v)
        lw = weight_grad_time(self.mc.layers[0], self.gpu, *g, self.o)
        qw = weight_grad_time(self.mc.post, self.gpu, *g, self.o)
        last = c.p * c.v - 1
        return lambda ch: per_chunk * lw + (qw if ch == last else 0.0)

    # ---- memory --------------------------------------------------------------------------
    def params_on_rank(self, c: Candidate, rank: int) -> float:
        """Parameter elements on one rank of pipeline stage ``rank``: those the
        tensor-parallel pass shards count 1/t, those it leaves replicated in full."""
        return stage_param_elems(self.mc, self.layout(c), rank)

    def act_per_chunk(self, c: Candidate) -> float:
        mc = self.mc
        per_layer = activation_bytes_per_layer(mc.seq, c.b, mc.hidden, max(mc.heads, 1), c.t,
                                               c.sp, c.recompute, c.cp)
        return per_layer * mc.num_layers / (c.p * c.v)

    def layout(self, c: Candidate) -> Layout:
        return Layout(c.t, c.p, c.d // c.fs, c.v, c.m, c.b, c.sp, c.recompute, "bf16",
                      self.o.distributed_optimizer and c.fs == 1, self.o.split_backward,
                      c.schedule, fs=c.fs, ep=c.ep, cp=c.cp)

    def memory_prediction(self, c: Candidate) -> MemoryPrediction:
        """Every pipeline stage's peak, broken down (planner/memory.py)."""
        return predict_memory(self.mc, self.layout(c), self.user_limit)

    def memory(self, c: Candidate) -> float:
        """Peak bytes on the busiest rank: the larger of memory.predict's breakdown and
        Korthikanti-style bound below, so a layout over either is never proposed."""
        return max(self.memory_prediction(c).peak, self._memory_bound(c))

    def _memory_bound(self, c: Candidate) -> float:
        """Peak bytes on the worst of the first and last pipeline ranks."""
        mc = self.mc
        sbh = mc.seq * c.b / c.cp * mc.hidden
        worst = 0.0
        for r in {0, c.p - 1}:
            static = param_bytes_per_gpu(self.params_on_rank(c, r) / c.fs,
                                         c.d // c.fs * c.cp, self.o) + self.gathered_bytes(c)
            inflight = expected_peak_inflight(c.schedule, c.p, c.v, c.m, r)
            act = inflight * self.act_per_chunk(c)
            if c.recompute == "full":   # one layer's activations while recomputing it
                act += activation_bytes_per_layer(mc.seq, c.b, mc.hidden, max(mc.heads, 1), c.t,
                                                  c.sp, "none", c.cp)
            if r == 0:   # embedding output + dropout mask per microbatch in flight
                act += inflight / c.v * 3 * sbh / (c.t if c.sp else 1)
            if r == c.p - 1 and mc.vocab:   # fp32 logits / softmax of one microbatch
                act += 4.0 * mc.seq * c.b / c.cp * mc.vocab / c.t * 2
            worst = max(worst, static + act)
        return worst

    @property
    def memory_limit(self) -> float:
        device = self.gpu.memory - self.gpu.reserved_memory
        return device if self.user_limit is None else min(device, self.user_limit)

    def gathered_bytes(self, c: Candidate) -> float:
        """dp_shard: full weights alive at once (the current layer's and the prefetched)."""
        return 2.0 * self.mc.params_layer / c.t * self.mc.dtype_bytes if c.fs > 1 else 0.0

    # ---- step time -----------------------------------------------------------------------
    def fsdp_time(self, c: Candidate, compute: float) -> float:
        """dp_shard's exposed communication. Per microbatch every local weight is gathered
        (again in backward when resharding) and its gradient reduce-scattered over fs. The
        compiler prefetches the next layer's gather during this one, so of the gathers only
        what exceeds the compute, or at least one layer's share (the first), is exposed; of
        the reduce-scatters the last microbatch's is exposed as DP's all-reduce is (unless
        ``dp_overlap``), the earlier ones overlap the following microbatches' compute."""
        if c.fs == 1:
            return 0.0
        P = max(self.params_on_rank(c, r) for r in {0, c.p - 1}) * self.mc.dtype_bytes
        link = self.cl.group_link(c.fs, c.t)
        layers = max(self.mc.num_layers // c.p, 1)
        # one collective per bucket (each layer, plus the embedding / head): their latencies
        ag = all_gather_time(P, c.fs, link) + layers * (c.fs - 1) * link.latency
        gathers = c.m * ag * (2 if self.o.reshard_after_forward else 1)
        exposed = max(gathers - compute, gathers / layers)
        last_rs = 0.1 * ag if self.o.dp_overlap else ag
        earlier = (c.m - 1) * ag
        return exposed + last_rs + max(0.0, earlier - compute * (c.m - 1) / c.m)

    def dp_time(self, c: Candidate) -> float:
        """The gradient all-reduce over the "grad" group: the replicated dp ranks and the
        cp ranks (each saw part of every sequence)."""
        if c.d // c.fs * c.cp == 1:
            return 0.0
        if c.fs > 1:   # HSDP / cp: the shards' gradients all-reduced over replicas × cp
            grads = max(self.params_on_rank(c, r) for r in {0, c.p - 1}) / c.fs * \
                self.o.grad_reduce_bytes
            r = c.d // c.fs * c.cp
            t = all_reduce_time(grads, r, self.cl.group_link(r, c.t * c.fs))
            return 0.1 * t if self.o.dp_overlap else t
        grads = max(self.params_on_rank(c, r) for r in {0, c.p - 1}) * self.o.grad_reduce_bytes
        g = c.d * c.cp
        t = all_reduce_time(grads, g, self.cl.group_link(g, c.t))
        return 0.1 * t if self.o.dp_overlap else t

    def optimizer_time(self, c: Candidate) -> float:
        n = max(self.params_on_rank(c, r) for r in {0, c.p - 1}) / c.fs
        if self.o.distributed_optimizer and c.fs == 1:
            n /= c.d * c.cp
        return n * self.o.optimizer_bytes_per_param * self.o.optimizer_passes / \
            (self.gpu.mem_bw * self.gpu.mem_eff)

    def pipeline_closed_form(self, c: Candidate) -> float:
        fwd, bwd = self.chunk_costs(c)
        comm = self.p2p(c)
        per_rank = [sum(fwd(ch) + bwd(ch) for ch in range(r, c.p * c.v, c.p)) for r in range(c.p)]
        sends = 2 * comm * (c.v if c.p > 1 else 0)
        busiest = max(per_rank) + sends
        mean_stage = sum(per_rank) / c.p
        return c.m * busiest + (c.p - 1) * (mean_stage + sends) / c.v

    def pipeline_simulated(self, c: Candidate, max_m: int = 16) -> SimResult:
        fwd, bwd = self.chunk_costs(c)
        comm = self.p2p(c)
        act = self.act_per_chunk(c)
        static = [param_bytes_per_gpu(self.params_on_rank(c, r) / c.fs, c.d // c.fs * c.cp,
                                      self.o)
                  + self.gathered_bytes(c) for r in range(c.p)]
        return simulate_config(c.schedule, c.p, c.v, c.m, fwd, bwd, lambda a: comm,
                               act_bytes=lambda ch: act, static_bytes=static, max_m=max_m,
                               wgrad_cost=self.weight_grad_costs(c) if self.o.split_backward
                               else None, eager_sends=False,
                               blocking_sends=self.o.blocking_sends)

    def evaluate(self, c: Candidate, simulate: bool = False) -> Estimate:
        sim = None
        if simulate:
            sim = self.pipeline_simulated(c)
            pipe = sim.step_time
        else:
            pipe = self.pipeline_closed_form(c)
        dp, opt = self.dp_time(c), self.optimizer_time(c)
        fs = self.fsdp_time(c, pipe)
        dp += fs
        T = pipe + dp + opt
        mc = self.mc
        N = c.world
        B = c.b * c.m * c.d
        paper = model_flops_per_iteration(B, mc.seq, mc.num_layers, mc.hidden, mc.vocab or 0, True)
        model = model_flops_per_iteration(B, mc.seq, mc.num_layers, mc.hidden, mc.vocab or 0,
                                          False)
        if c.recompute == "full":
            hw = paper
        elif c.recompute == "selective":
            hw = model + 4.0 * B * mc.seq * mc.seq * mc.hidden * mc.num_layers
        else:
            hw = model
        fwd, bwd = self.chunk_costs(c)
        ideal = c.m * max(sum(fwd(ch) + bwd(ch) for ch in range(r, c.p * c.v, c.p))
                          for r in range(c.p))
        mem = self.memory(c)
        est = Estimate(c, T, pipe, dp, opt, (pipe - ideal) / ideal if ideal else 0.0, mem,
                       self.memory_limit, mem <= self.memory_limit, B / T,
                       model / T / N / 1e12, paper / T / N / 1e12, hw / T / N / 1e12,
                       model / T / N / self.gpu.peak_flops, simulate)
        est.breakdown = {"pipeline_s": pipe, "dp_allreduce_s": dp - fs, "optimizer_s": opt,
                         "dp_shard_exposed_s": fs,
                         "p2p_per_transfer_s": self.p2p(c),
                         "layer_fwd_bwd_s": self.layer_times(c.b, c.t, c.sp, c.recompute,
                                                             c.ep, c.t * c.p, c.cp),
                         "all_to_all_per_layer_s": self.a2a_time(c.b / c.cp, c.t, c.ep,
                                                                 c.t * c.p),
                         "cp_kv_per_layer_s": sum(self.cp_time(c.b, c.t, c.cp)),
                         "cp_kv_bytes_per_layer": 3 * self.cp_kv_bytes(c.b, c.t, c.cp)}
        return est


# --------------------------------------------------------------------------------------------
# enumeration
# --------------------------------------------------------------------------------------------
def _divisors(n: int) -> list:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_candidates(mc: ModelCost, num_gpus: int, gpus_per_node: int, global_batch: int,
                         max_v: int = 8, microbatch_sizes: Iterable[int] = (1, 2, 4, 8, 16),
                         recomputes=RECOMPUTES, rejected: Optional[list] = None,
                         dp_shard: bool = True, cp: bool = True) -> list:
    """All legal candidates; illegal ones are appended to ``rejected`` as (desc, reason)."""
    out = []
    rej = rejected if rejected is not None else []
    L, a = mc.num_layers, max(mc.heads, 1)
    for t in _divisors(min(num_gpus, gpus_per_node)):
        if a % t or mc.hidden % t:
            rej.append((f"t={t}", f"{a} heads / hidden {mc.hidden} not divisible by t"))
            continue
        for p, cpn in ((p, k) for p in _divisors(num_gpus // t)
                       for k in _divisors(num_gpus // (t * p))):
            if L % p:
                if cpn == 1:
                    rej.append((f"t={t} p={p}", f"{L} layers not divisible by p"))
                continue
            if cpn > 1 and not cp:
                continue
            if cpn > 1 and (not mc.heads or mc.seq % (2 * cpn)):
                rej.append((f"t={t} p={p} cp={cpn}",
                            "cp needs an attention op and 2·cp dividing the sequence "
                            f"({mc.seq})"))
                continue
            d = num_gpus // (t * p * cpn)
            if global_batch % d:
                rej.append((f"t={t} p={p} d={d}" + (f" cp={cpn}" if cpn > 1 else ""),
                            f"batch {global_batch} not divisible by d"))
                continue
            per = global_batch // d
            for b in microbatch_sizes:
                if per % b:
                    continue
                m = per // b
                vs = [1] + ([v for v in range(2, max_v + 1) if L % (p * v) == 0 and m % p == 0]
                            if p > 1 else [])
                # dp_shard: none, all d ranks, or (HSDP) the d-divisor filling a node
                node = max(k for k in _divisors(d) if k * t <= max(gpus_per_node, t))
                fss = sorted({1, d, node}) if dp_shard and d > 1 else [1]
                # expert parallelism: ep | d and ep | experts (not with dp_shard yet)
                eps = [e for e in _divisors(d) if mc.experts and mc.experts % e == 0] or [1]
                for v in vs:
                    for sp in ([False, True] if t > 1 else [False]):
                        for rc in recomputes:
                            for fs in fss:
                                for ep in (eps if fs == 1 else [1]):
                                    out.append(Candidate(t, p, d, v, b, m, sp, rc, fs, ep,
                                                         cpn))
    return out


@dataclasses.dataclass
class PlanResult:
    """The chosen configuration (ParallelConfig-compatible fields) and why."""
    tp: int
    pp: int
    dp: int
    virtual_stages: int
    microbatch_size: int
    microbatches: int
    sequence_parallel: bool
    recompute: str
    schedule: str
    step_time_s: float
    samples_per_s: float
    tflops_per_gpu: float        # model FLOPs (no recompute)
    mfu: float
    memory_gib: float
    best: Estimate
    top: list                    # top-5 Estimates (simulated)
    rejected: list               # (description, reason)
    num_candidates: int
    cluster: Cluster
    memory_prediction: Optional[MemoryPrediction] = None   # the chosen layout, per stage
    dp_shard: int = 1                                      # dp above is the replicated part
    ep: int = 1                                            # experts split over ep of dp
    cp: int = 1                                            # context parallel ranks

    def parallel_config_kwargs(self) -> dict:
        return dict(tp=self.tp, pp=self.pp, dp=self.dp, dp_shard=self.dp_shard, ep=self.ep,
                    cp=self.cp,
                    virtual_stages=self.virtual_stages,
                    microbatches=self.microbatches, sequence_parallel=self.sequence_parallel,
                    recompute=self.recompute, schedule=self.schedule)

    def to_parallel_config(self):
        from ..config import ParallelConfig
        return ParallelConfig(**self.parallel_config_kwargs())

    def explain(self) -> str:
        lines = [f"planner: {self.num_candidates} legal configurations on {self.cluster.name}; "
                 f"chose {self.best.cand.short()}",
                 f"  predicted step {self.step_time_s:.3f} s, {self.samples_per_s:.1f} samples/s, "
                 f"{self.tflops_per_gpu:.0f} model TFLOP/s/GPU, MFU {self.mfu:.1%}, "
                 f"peak memory {self.memory_gib:.1f} GiB", "  top 5:"]
        if self.memory_prediction is not None:
            lines[2:2] = self.memory_prediction.lines("  ")
        for i, e in enumerate(self.top):
            lines.append(f"   {i + 1}. {e.cand.short():60s} step {e.step_time:8.3f} s  "
                         f"bubble {e.bubble:5.1%}  mem {e.memory / 2**30:6.1f} GiB  "
                         f"MFU {e.mfu:5.1%}" + (f"  ({e.reason})" if e.reason else ""))
        reasons = {}
        for desc, why in self.rejected:
            key = why.split(":")[0]
            reasons.setdefault(key, []).append(desc)
        lines.append("  rejected:")
        for why, descs in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"   {len(descs):6d} × {why}  (e.g. {descs[0]})")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: what was chosen, on which cluster, and the predicted step."""
        return (f"plan='auto' chose {self.best.cand.short()} schedule={self.schedule} on "
                f"{self.cluster.name} ({self.num_candidates} legal configurations; predicted "
                f"step {self.step_time_s:.4g} s, peak memory {self.memory_gib:.2f} GiB; "
                f"pm.auto_plan.explain() lists the top 5 and the rejected)")

    def __str__(self):
        return self.explain()


def search(mc: ModelCost, cluster: Cluster, global_batch: int, opts: CostOptions = CostOptions(),
           top_k: int = 5, progress: Optional[Callable] = None,
           memory_limit: Optional[int] = None, **enum_kw) -> PlanResult:
    """Fastest legal configuration that fits in memory (the GPU's, and ``memory_limit``
    bytes per rank when given: no layout predicted over it is ever proposed)."""
    rejected: list = []
    enum_kw.setdefault("dp_shard", opts.dp_shard_search)
    enum_kw.setdefault("cp", opts.cp_search)
    cands = enumerate_candidates(mc, cluster.num_gpus, cluster.gpus_per_node, global_batch,
                                 rejected=rejected, **enum_kw)
    if not cands:
        raise ConfigError(f"no legal configuration for {mc.name} on {cluster.num_gpus} GPUs with "
                          f"global batch {global_batch}: " +
                          "; ".join(f"{d}: {w}" for d, w in rejected[:5]))
    ev = Evaluator(mc, cluster, global_batch, opts, memory_limit)
    fitting = []
    it = progress(cands) if progress else cands
    for c in it:
        e = ev.evaluate(c)
        if not e.fits:
            rejected.append((c.short(), f"out of memory: needs {e.memory / 2**30:.1f} GiB > "
                                        f"{e.memory_limit / 2**30:.1f} GiB"))
            continue
        fitting.append(e)
    if not fitting:
        from ..errors import MemoryLimitError
        least = min((ev.evaluate(c) for c in cands), key=lambda e: e.memory)
        raise MemoryLimitError(
            f"no configuration of {mc.name} fits in {ev.memory_limit / 2**30:.2f} GiB per "
            f"rank ({cluster.gpu.name}" + (f", memory_limit" if memory_limit else "") +
            f") on {cluster.num_gpus} GPUs; the least memory is {least.cand.short()} at "
            f"{least.memory / 2**30:.2f} GiB:\n" +
            "\n".join(ev.memory_prediction(least.cand).lines("  ")) +
            "\nadd GPUs, use a GPU with more memory or a smaller global batch")
    fitting.sort(key=lambda e: e.step_time)
    finalists = [ev.evaluate(e.cand, simulate=True) for e in fitting[:top_k + 3]]
    finalists.sort(key=lambda e: e.step_time)
    for e in fitting[top_k + 3:]:
        rejected.append((e.cand.short(), f"slower: predicted {e.step_time:.3f} s vs best "
                                         f"{finalists[0].step_time:.3f} s"))
    top = finalists[:top_k]
    best = top[0]
    for e in top[1:]:
        e.reason = f"{e.step_time / best.step_time - 1:+.1%} vs best"
    c = best.cand
    return PlanResult(c.t, c.p, c.d // c.fs, c.v, c.b, c.m, c.sp, c.recompute, c.schedule,
                      best.step_time, best.samples_per_s, best.model_tflops_per_gpu, best.mfu,
                      best.memory / 2**30, best, top, rejected, len(cands), cluster,
                      ev.memory_prediction(c), c.fs, c.ep, c.cp)


__all__ = ["Candidate", "Estimate", "Evaluator", "enumerate_candidates", "search", "PlanResult",
           "RECOMPUTES"]

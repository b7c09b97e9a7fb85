"""Calibration: measure this machine's achieved GEMM FLOP/s (and how it falls off for
small GEMMs), memory bandwidth, per-op dispatch overhead, collective and p2p α–β (gloo
between local processes) and write a cluster JSON the planner reads with
``Cluster.load(path)``. Ops the cost model has no formula for (custom ops) are timed on
their captured shapes (``time_opaque_ops``)."""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Optional

import torch

from .planner.cluster import Cluster
from .planner.hardware import GPUSpec, Link


def _best(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class _threads:
    """Run with ``n`` intra-op threads (ranks sharing a CPU each use one)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def measure_flops(n: int = 1024, dtype=torch.float32, device="cpu", threads: int = 0) -> float:
    with _threads(threads):
        return _measure_flops(n, dtype, device)


def _measure_flops(n, dtype, device):
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        for _ in range(4):
            torch.mm(a, b)
        sync()
    return 4 * 2 * n ** 3 / _best(run)


def fit_gemm_dim_half(peak: float, n_small: int = 128, threads: int = 0) -> float:
    """x in the cost model's GEMM efficiency (d/(d+x))³ for a square GEMM of side
    ``n_small``, from its measured FLOP/s relative to ``peak``."""
    eff = min(measure_flops(n_small, threads=threads) / peak, 0.999)
    # a noisy peak can make the small GEMM look as fast: keep a floor of one element
    return max(1.0, n_small * (eff ** (-1.0 / 3.0) - 1.0))


def measure_elementwise_bandwidth(n: int = 2 ** 20, threads: int = 0) -> float:
    """Bytes/s (read + write) of a transcendental elementwise op (GELU, erf form) — on a
    CPU these ops are bound by per-element arithmetic, not by memory bandwidth, so the
    cost model's elementwise rate is calibrated on one."""
    x = torch.randn(n)
    with _threads(threads):
        return 2 * 4 * n / _best(lambda: torch.nn.functional.gelu(x))


def measure_op_overhead(reps: int = 2000) -> float:
    """Seconds per ATen op call from Python on a tiny tensor: what an aot_eager graph
    (one Python call per node) or a kernel launch costs beyond its FLOPs and bytes."""
    a = torch.ones(1)
    add = torch.ops.aten.add.Tensor

    def run():
        for _ in range(reps):
            add(a, a)
    return _best(run, reps=3) / reps


def measure_call_overhead(codegen: str = "aot_eager", reps: int = 30) -> tuple:
    """(forward, backward) seconds a compiled chunk costs per call beyond its ops: the
    AOTAutograd runtime wrapper, the executor's per-(step, microbatch) RNG fork, autograd
    entry. Measured on a one-linear module compiled the way the runtime compiles chunks."""
    import torch.nn as nn
    from .codegen import compile_graph
    from .config import ParallelConfig
    from .program import build_program
    from .runtime.rng import RNGTracker

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).sum()
    mod = One()
    x = torch.ones(2, 4)
    cap = build_program(mod, ParallelConfig(), ((x,), {}, None), until="capture").captured
    params = dict(mod.named_parameters())
    users = {n: v for n, v in zip([n for k, n in cap.inputs if k == "user"], [x])}
    inputs = [params[n] if k == "param" else users[n] for k, n in cap.inputs]
    fn = compile_graph(cap.gm, inputs, codegen)
    rng = RNGTracker(0, 0, 0, 0)
    ops = sum(1 for n in cap.gm.graph.nodes if n.op == "call_function")
    per_op = measure_op_overhead()
    fwd, bwd = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        with rng.fork(0, i):
            out = fn(*inputs)[0]
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    fwd.sort()
    bwd.sort()
    # the median call minus what its own ops cost (the cost model counts those)
    return (max(0.0, fwd[reps // 2] - ops * per_op), max(0.0, bwd[reps // 2] - 2 * ops * per_op))


def measure_executor_overhead(p: int = 2, m: int = 4, steps: int = 4) -> tuple:
    """(forward, backward) seconds the pipeline executor spends per compute action beyond
    the chunk's ops, measured on every rank of the initialized world (``p`` ranks, call on
    all): a near-zero-cost model (embedding, two width-8 residual linears, LM head) runs
    1F1B and the median recorded forward/backward event is the overhead (its few tiny ops
    are ~µs). This is a property of the runtime on this machine (RNG fork, AOTAutograd
    wrappers, autograd entry, Python), independent of the configuration being predicted."""
    import statistics
    import torch.nn as nn
    from .api import parallelize

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(8, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(p))
            self.head = nn.Linear(8, 8)

        def forward(self, ids, targets):
            x = self.emb(ids)
            for lin in self.layers:
                x = x + lin(x)
            return nn.functional.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())
    torch.manual_seed(0)
    pm = parallelize(Tiny(), pp=p, microbatches=m, codegen="aot_eager")
    ids = torch.zeros(m, 4, dtype=torch.long)
    fwd, bwd = [], []
    for i in range(steps + 1):
        pm.train_step(ids, targets=ids)
        if i:
            for r in pm.timeline()["pipeline"]:
                fwd += [e[4] - e[3] for e in r["events"] if e[0] == "F"]
                bwd += [e[4] - e[3] for e in r["events"] if e[0] == "B"]
    return statistics.median(fwd), statistics.median(bwd)


def time_opaque_ops(gm, reps: int = 3) -> dict:
    """{node name: forward seconds} for the graph's custom ops (namespace other than
    aten/prims), run on zero tensors of their captured shapes: the cost model has no
    FLOPs formula for an op it does not know, so it uses this measurement."""
    import torch.fx as fx
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        ns = getattr(n.target, "namespace", "") or ""
        if ns in ("", "aten", "prims", "_operator", "higher_order"):
            continue

        def real(x):
            if isinstance(x, fx.Node):
                v = x.meta.get("val")
                if isinstance(v, torch.Tensor):
                    return torch.zeros(tuple(int(d) for d in v.shape), dtype=v.dtype)
                return v
            return x
        args = torch.fx.node.map_aggregate(n.args, real)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, real)
        out[n.name] = _best(lambda: n.target(*args, **kwargs), reps=reps)
    return out


def measure_bandwidth(nbytes: int = 64 * 2 ** 20, device="cpu") -> float:
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        y.copy_(x)
        sync()
    return 2 * nbytes / _best(run)   # read + write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank, world, port, sizes, q):
    try:
        _allreduce_body(rank, world, port, sizes, q)
    except BaseException as e:  # report instead of leaving the parent waiting
        q.put({"error": f"rank {rank}: {type(e).__name__}: {e}"})


def _allreduce_body(rank, world, port, sizes, q):
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    out = {}
    for n in sizes:
        x = torch.ones(max(1, n // 4))
        dist.all_reduce(x)
        best = float("inf")
        for _ in range(5):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            best = min(best, time.perf_counter() - t)
        out[n] = best
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def measure_p2p(a: int = 0, b: int = 1, sizes=(4, 2 ** 20), reps: int = 15) -> Optional[Link]:
    """α–β of one pipeline p2p transfer between ranks ``a`` and ``b`` of the initialized
    world, issued as the pipeline executor issues it (``batch_isend_irecv`` + wait):
    half a ping-pong round trip, median of ``reps``. Call on every rank; ranks other
    than ``a`` and ``b`` return None at once."""
    import statistics
    import torch.distributed as dist
    me = dist.get_rank()
    if me not in (a, b):
        return None
    peer = b if me == a else a
    one_way = {}
    for n in sizes:
        x = torch.zeros(max(1, n // 4))
        y = torch.empty_like(x)
        times = []
        for i in range(reps + 2):
            t = time.perf_counter()
            if me == a:
                for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer)]):
                    w.wait()
                for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, y, peer)]):
                    w.wait()
            else:
                for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, y, peer)]):
                    w.wait()
                for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer)]):
                    w.wait()
            if i >= 2:
                times.append((time.perf_counter() - t) / 2)
        one_way[n] = statistics.median(times)
    small, large = one_way[sizes[0]], one_way[sizes[-1]]
    return Link("gloo-p2p", (sizes[-1] - sizes[0]) / max(large - small, 1e-9), small)


def device_spec(threads: int = 0, name: str = "", memory: Optional[float] = None,
                log=lambda *_: None) -> GPUSpec:
    """This CPU as the cost model sees it (``threads`` intra-op threads per rank): peak
    GEMM FLOP/s and its fall-off for small GEMMs, elementwise rate, memory bandwidth and
    the per-op dispatch overhead."""
    peak = measure_flops(threads=threads)
    half = fit_gemm_dim_half(peak, 128, threads=threads)
    bw = measure_bandwidth()
    ew = measure_elementwise_bandwidth(threads=threads)
    oh = measure_op_overhead()
    log(f"  GEMM: {peak / 1e9:.1f} GFLOP/s (efficiency halves at dim {half:.1f}); elementwise "
        f"{ew / 1e9:.1f} GB/s of {bw / 1e9:.1f} GB/s copy; {oh * 1e6:.1f} us per op")
    if memory is None:
        try:
            memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            memory = 16.0 * 2 ** 30
    return GPUSpec(name or f"calibrated-cpu-{threads or torch.get_num_threads()}t", peak, bw,
                   memory, gemm_eff=1.0, gemm_dim_half=half, attn_eff=0.5,
                   mem_eff=min(1.0, ew / bw), kernel_overhead=oh, reserved_memory=0.0)


def measure_allreduce(world: int = 2, sizes=(4, 4 * 2 ** 20)) -> Link:
    """α–β of a ring all-reduce among ``world`` local gloo processes:
    t(n) = 2(w−1)α + 2(w−1)/w · n/β, fitted from a tiny and a large message."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, sizes, q))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        res = q.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if "error" in res:
        raise RuntimeError(f"all-reduce measurement failed: {res['error']}")
    small, large = res[sizes[0]], res[sizes[-1]]
    alpha = small / (2 * (world - 1))
    beta = (2 * (world - 1) / world) * sizes[-1] / max(large - small, 1e-9)
    return Link("gloo-local", beta, alpha)


def calibrate(path: str = "cluster.json", world: int = 2, log=print) -> Cluster:
    """Measure this machine and write ``path``. On a CPU each of ``world`` ranks is given
    cores/world intra-op threads (what ranks sharing the CPU get)."""
    # collectives first: forked children hang if the parent already ran OpenMP kernels
    link = measure_allreduce(world)
    log(f"  all-reduce: alpha {link.latency * 1e6:.1f} us, beta {link.bandwidth / 1e9:.2f} GB/s")
    if torch.cuda.is_available():
        flops = measure_flops(device="cuda", dtype=torch.bfloat16, n=8192)
        bw = measure_bandwidth(device="cuda")
        log(f"  GEMM: {flops / 1e12:.1f} TFLOP/s; memory: {bw / 1e9:.0f} GB/s")
        gpu = GPUSpec("calibrated-cuda", flops, bw,
                      float(torch.cuda.get_device_properties(0).total_memory), gemm_eff=1.0)
    else:
        gpu = device_spec(threads=max(1, (os.cpu_count() or 1) // world), log=log)
    cl = Cluster(nodes=1, gpus_per_node=world, gpu=gpu, intra=link, inter=link,
                 name=f"{socket.gethostname()} ({os.cpu_count()} cores)")
    cl.save(path)
    log(f"wrote {path}")
    return cl


__all__ = ["calibrate", "measure_flops", "measure_bandwidth", "measure_allreduce", "fit_gemm_dim_half",
           "measure_elementwise_bandwidth", "measure_op_overhead", "time_opaque_ops",
           "measure_p2p", "device_spec", "measure_call_overhead",
           "measure_executor_overhead"]

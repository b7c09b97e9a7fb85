"""Calibration: measure this machine's achieved GEMM FLOP/s, memory bandwidth and
collective α–β (gloo all-reduce between local processes) and write a cluster JSON the
planner reads with ``Cluster.load(path)``."""
from __future__ import annotations

import dataclasses
import os
import socket
import time

import torch

from .cluster import Cluster
from .cost_model import GPUSpec, Link


def _best(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_flops(n: int = 1024, dtype=torch.float32, device="cpu") -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        for _ in range(4):
            torch.mm(a, b)
        sync()
    return 4 * 2 * n ** 3 / _best(run)


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
    # collectives first: forked children hang if the parent already ran OpenMP kernels
    link = measure_allreduce(world)
    log(f"  all-reduce: alpha {link.latency * 1e6:.1f} us, beta {link.bandwidth / 1e9:.2f} GB/s")
    flops = measure_flops()
    log(f"  GEMM: {flops / 1e9:.1f} GFLOP/s")
    bw = measure_bandwidth()
    log(f"  memory: {bw / 1e9:.1f} GB/s")
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 16 * 2 ** 30
    gpu = GPUSpec("calibrated-" + ("cuda" if torch.cuda.is_available() else "cpu"), flops, bw,
                  float(mem), gemm_eff=1.0, gemm_dim_half=16.0, attn_eff=0.8, mem_eff=1.0,
                  kernel_overhead=5e-6, reserved_memory=2 * 2 ** 30)
    cl = Cluster(nodes=1, gpus_per_node=world, gpu=gpu, intra=link, inter=link,
                 name=f"{socket.gethostname()} ({os.cpu_count()} cores)")
    cl.save(path)
    log(f"wrote {path}")
    return cl


__all__ = ["calibrate", "measure_flops", "measure_bandwidth", "measure_allreduce"]

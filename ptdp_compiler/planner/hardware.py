"""Hardware as the cost model sees it: GPU specs (peak FLOP/s, HBM bandwidth, memory,
achievable efficiencies), links (α–β) and the time of ring collectives and p2p on them.
Calibration (``ptdp_compiler/calibrate.py``) measures these for this machine.
"""
from __future__ import annotations

import dataclasses

# --------------------------------------------------------------------------------------------
# hardware
# --------------------------------------------------------------------------------------------
GB = 1e9
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """Peak dense bf16 FLOP/s, HBM bandwidth and memory, plus achievable efficiencies."""
    name: str
    peak_flops: float           # dense bf16/fp16 tensor-core FLOP/s
    mem_bw: float               # HBM bytes/s
    memory: float               # bytes
    gemm_eff: float = 0.76      # best achievable fraction of peak on large GEMMs
    gemm_dim_half: float = 64.0  # GEMM efficiency halves per dimension of this size (d/(d+x))
    attn_eff: float = 0.55      # fused (flash) attention fraction of peak
    mem_eff: float = 0.80       # achievable fraction of HBM bandwidth on elementwise kernels
    kernel_overhead: float = 4e-6  # seconds per kernel launch (forward)
    reserved_memory: float = 3 * GiB  # CUDA context, allocator fragmentation, workspace


GPU_SPECS = {
    "A100-40GB": GPUSpec("A100-40GB", 312e12, 1555 * GB, 40 * GiB),
    "A100-80GB": GPUSpec("A100-80GB", 312e12, 2039 * GB, 80 * GiB),
    "H100-SXM": GPUSpec("H100-SXM", 989e12, 3350 * GB, 80 * GiB, gemm_eff=0.70),
    "H200": GPUSpec("H200", 989e12, 4800 * GB, 141 * GB, gemm_eff=0.70),
}


@dataclasses.dataclass(frozen=True)
class Link:
    """α–β model: a message of n bytes takes ``latency + n / bandwidth`` seconds.
    ``bandwidth`` is what one GPU can push (per direction) on this kind of link, already
    times an achievable efficiency."""
    name: str
    bandwidth: float
    latency: float

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


# per-GPU link figures: NVLink per direction; one InfiniBand HCA per GPU (DGX A100/H100)
NVLINK = {"A100": Link("NVLink3", 300 * GB * 0.78, 2e-6), "H100": Link("NVLink4", 450 * GB * 0.78, 2e-6),
          "H200": Link("NVLink4", 450 * GB * 0.78, 2e-6)}
INFINIBAND = {"A100": Link("IB-HDR-200", 25 * GB * 0.85, 6e-6),
              "H100": Link("IB-NDR-400", 50 * GB * 0.85, 6e-6),
              "H200": Link("IB-NDR-400", 50 * GB * 0.85, 6e-6)}


def gpu_spec(gpu) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    if gpu not in GPU_SPECS:
        from ..errors import ConfigError
        raise ConfigError(f"unknown gpu {gpu!r}: choose one of {sorted(GPU_SPECS)} or pass a "
                          "GPUSpec / a calibrated cluster file")
    return GPU_SPECS[gpu]


def gemm_efficiency(gpu: GPUSpec, m: float, n: float, k: float) -> float:
    """Fraction of peak a GEMM [m,k]x[k,n] reaches: saturating in each dimension."""
    x = gpu.gemm_dim_half
    return gpu.gemm_eff * (m / (m + x)) * (n / (n + x)) * (k / (k + x))


# --------------------------------------------------------------------------------------------
# collectives (ring algorithms, α–β)
# --------------------------------------------------------------------------------------------
def all_reduce_time(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * link.latency + 2 * (n - 1) / n * nbytes / link.bandwidth


def all_gather_time(nbytes_out: float, n: int, link: Link) -> float:
    """All-gather producing ``nbytes_out`` on every rank (reduce-scatter is symmetric)."""
    if n <= 1 or nbytes_out <= 0:
        return 0.0
    return (n - 1) * link.latency + (n - 1) / n * nbytes_out / link.bandwidth


reduce_scatter_time = all_gather_time


def p2p_time(nbytes: float, link: Link) -> float:
    return link.time(nbytes) if nbytes > 0 else 0.0

"""Random-number streams, so dropout is reproducible and placed like Megatron's.

Every (step, microbatch) draws from a generator seeded from the user's seed and
the rank's coordinates: data-parallel ranks see different masks (different data),
tensor-parallel ranks of one replicated region the same ones. A stream is a
deterministic function of (seed, step, microbatch, coordinates), so a step can be
replayed (recompute, restarts) and reproduces its masks.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch


def _mix(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class RNGTracker:
    def __init__(self, seed: int, dp_rank: int = 0, pp_rank: int = 0, tp_rank: int = 0):
        self.seed, self.dp_rank, self.pp_rank, self.tp_rank = seed, dp_rank, pp_rank, tp_rank

    def seed_for(self, step: int, microbatch: int, region: str = "replicated") -> int:
        """``replicated``: same on all tp ranks; ``sharded``: different per tp rank."""
        tp = self.tp_rank if region == "sharded" else -1
        return _mix(self.seed, step, microbatch, self.dp_rank, self.pp_rank, tp)

    @contextlib.contextmanager
    def fork(self, step: int, microbatch: int, region: str = "replicated"):
        """Run the body with the global generator on this (step, microbatch) stream,
        restoring the caller's generator state afterwards."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and \
            torch.cuda.is_initialized() else []
        seed = self.seed_for(step, microbatch, region)
        with torch.random.fork_rng(devices=devices):
            # the generators themselves, not torch.manual_seed: on a machine without an
            # initialised CUDA, that one queues a lazy CUDA seed with a formatted stack
            # trace on every call (~0.1-1 ms, once per microbatch and chunk)
            torch.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed(seed)
            yield


# ---- dropout on tensor-parallel shards ----------------------------------------------------------
# Dropout whose input is sharded over tp (a sequence shard under sequence parallelism, a
# head or FFN shard) must draw different numbers on each tp rank: the ranks hold different
# elements, and equal masks would correlate them (Megatron forks a model-parallel RNG
# state for this). Dropout on replicated tensors keeps drawing from the shared stream the
# executor forks per (step, microbatch), identical on every tp rank.
#
# The sharded stream is derived from the shared one: one 63-bit draw from the shared
# generator (the same draw on every tp rank, so the shared stream stays in step across
# ranks), mixed with the tp rank, seeds a private generator for this mask. A replayed
# (step, microbatch) therefore reproduces every mask.
@torch.library.custom_op("ptdp::tp_rank_dropout_mask", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))  # recompute replays its RNG
def tp_rank_dropout_mask(x: torch.Tensor, p: float, tp_rank: int) -> torch.Tensor:
    """Keep-mask (True = keep, probability 1-p) of x's shape, on this tp rank's stream."""
    base = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    g = torch.Generator(device=x.device)
    g.manual_seed(_mix("tp-sharded dropout", base, tp_rank))
    return torch.rand(x.shape, generator=g, device=x.device) >= p


@tp_rank_dropout_mask.register_fake
def _(x, p, tp_rank):
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)

"""Random-number streams, so dropout is reproducible and placed like Megatron's.

Every (step, microbatch) draws from a generator seeded from the user's seed and
the rank's coordinates: data-parallel ranks see different masks (different data),
tensor-parallel ranks of one replicated region the same ones. A stream is a
deterministic function of (seed, step, microbatch, coordinates), so a step can be
replayed (recompute, restarts) and reproduces its masks.
"""
from __future__ import annotations

import contextlib

import torch

# the seed mixer the sharded-dropout op shares; importing ops also registers
# ptdp::tp_rank_dropout_mask, which the executor's graphs call
from ..ops import mix_seed as _mix
from ..ops import tp_rank_dropout_mask  # noqa: F401


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

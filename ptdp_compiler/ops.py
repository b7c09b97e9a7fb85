"""ptdp's own custom ops that are not collectives (those are in ``collectives.py``).

They sit below the passes, which insert them into graphs, and the runtime, which runs
those graphs: importing this module registers them.
"""
from __future__ import annotations

import hashlib

import torch


def mix_seed(*parts) -> int:
    """A 63-bit seed that is a deterministic function of ``parts``."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


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
    g.manual_seed(mix_seed("tp-sharded dropout", base, tp_rank))
    return torch.rand(x.shape, generator=g, device=x.device) >= p


@tp_rank_dropout_mask.register_fake
def _(x, p, tp_rank):
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)

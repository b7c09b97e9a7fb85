"""A model whose layers cost a fixed wall time: each layer's forward sleeps ``ms``
milliseconds and its backward ``2·ms`` (the usual backward:forward ratio), inside
custom ops that the compiler treats like any other op.

Pipeline schedules are about time, and on a shared CPU real compute time is noise;
with sleeping layers every chunk costs the same, so a measured bubble can be compared
with the paper's (p−1)/(v·m) (tests/test_pipeline.py, benchmarks/pipeline.py).
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.library.custom_op("ptdp_examples::busy", mutates_args=())
def busy(x: torch.Tensor, ms: float) -> torch.Tensor:
    time.sleep(ms / 1000)
    return x.clone()


@busy.register_fake
def _(x, ms):
    return torch.empty_like(x)


@torch.library.custom_op("ptdp_examples::busy_grad", mutates_args=())
def busy_grad(g: torch.Tensor, ms: float) -> torch.Tensor:
    time.sleep(2 * ms / 1000)
    return g.clone()


@busy_grad.register_fake
def _(g, ms):
    return torch.empty_like(g)


def _setup(ctx, inputs, output):
    ctx.ms = inputs[1]


busy.register_autograd(lambda ctx, g: (busy_grad(g, ctx.ms), None), setup_context=_setup)


class SleepyStack(nn.Module):
    """Token embedding → ``layers`` × (x + busy(linear(x))) → LM head → cross-entropy."""

    def __init__(self, layers: int, ms: float, width: int = 16, vocab: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, vocab)
        self.ms = ms

    def forward(self, ids, targets):
        x = self.emb(ids)
        for layer in self.layers:
            x = x + busy(layer(x), self.ms)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())

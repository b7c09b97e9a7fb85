"""Tensor and sequence parallelism: parity with the single-device model, collective counts,
named errors. Jobs are module-level functions run on shared gloo worlds (``world`` fixture)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ptdp_compiler as ptdp
from tests.models import SEQ, VOCAB, assert_close_tensor, batch, build

STEPS = 3
LR = 0.1


# ---- a second, independently written decoder (fused qkv in (heads, 3, hd) order, parallel
# attention + MLP residual as in GPT-J / NeoX, rotary embeddings, untied output) -------------
class ParallelDecoderLayer(nn.Module):
    def __init__(self, width, n_heads, mult=4):
        super().__init__()
        self.h, self.hd = n_heads, width // n_heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.o = nn.Linear(width, width)
        self.up = nn.Linear(width, mult * width)
        self.down = nn.Linear(mult * width, width)

    @staticmethod
    def rotate(x, cos, sin):
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-b, a), dim=-1) * sin

    def forward(self, x, cos, sin):
        B, T, W = x.shape
        y = self.norm(x)
        qkv = self.qkv(y).reshape(B, T, self.h, 3, self.hd)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(B, T, W)
        return x + self.o(a) + self.down(F.silu(self.up(y)))


class TinyNeoX(nn.Module):
    def __init__(self, vocab=VOCAB, width=32, n_heads=4, depth=2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(ParallelDecoderLayer(width, n_heads) for _ in range(depth))
        self.final = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, vocab, bias=False)
        hd = width // n_heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("inv", inv, persistent=False)

    def forward(self, input_ids, labels):
        ids = input_ids
        T = ids.shape[1]
        f = torch.outer(torch.arange(T, dtype=torch.float32), self.inv)
        e = torch.cat((f, f), -1)
        cos, sin = e.cos(), e.sin()
        x = self.tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.unembed(self.final(x))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _build(name):
    if name == "neox":
        torch.manual_seed(0)
        return TinyNeoX()
    return build(name)


def _batch(name, gb):
    return batch("llama" if name == "neox" else name, gb)


def _reference(name, gb):
    """Single-device losses and gradients over STEPS SGD steps."""
    model = _build(name)
    args, kwargs = _batch(name, gb)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        out = model(*args, **kwargs)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return losses, grads


def parity_job(name, tp, dp, sp, codegen="aot_eager", gb=4):
    pm = ptdp.parallelize(_build(name), tp=tp, dp=dp, sequence_parallel=sp, codegen=codegen)
    args, kwargs = _batch(name, gb)
    args = tuple(pm.dp_shard(a) for a in args)
    kwargs = {k: pm.dp_shard(v) for k, v in kwargs.items()}
    opt = torch.optim.SGD(pm.parameters(), lr=LR)
    losses, grads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(pm.train_step(*args, **kwargs).detach())
        grads.append(pm.full_grads())
        opt.step()
    nlocal = sum(p.numel() for p in pm.parameters())
    return losses, grads, nlocal, pm.explain()


def _check_parity(world, name, tp, dp, sp, codegen="aot_eager"):
    ref_losses, ref_grads = _reference(name, 4)
    res = world(tp * dp, parity_job, name, tp, dp, sp, codegen, timeout=400)
    full = sum(g.numel() for g in ref_grads[0].values())
    for rank, (losses, grads, nlocal, _) in enumerate(res):
        for s in range(STEPS):
            assert_close_tensor(f"rank {rank} step {s} loss", losses[s], ref_losses[s])
            assert set(grads[s]) == set(ref_grads[s])
            for n in ref_grads[s]:
                assert_close_tensor(f"rank {rank} step {s} grad {n}", grads[s][n],
                                    ref_grads[s][n])
        assert nlocal < full, "tensor parallelism should leave each rank a fraction of the weights"
    return res


@pytest.mark.parametrize("name,tp,dp,sp", [
    ("gpt", 2, 1, False), ("gpt", 2, 1, True),
])
def test_parity(world, name, tp, dp, sp):
    _check_parity(world, name, tp, dp, sp)


def _probe(name, tp, sp):
    return parity_job(name, tp, 1, sp, gb=2)[3]

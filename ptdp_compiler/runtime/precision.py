"""Mixed precision as Megatron does it: low-precision parameters and compute, fp32 master
weights and fp32 gradient accumulation.

- ``fp32`` (default): nothing changes.
- ``bf16``: the model's floating-point parameters and buffers are cast to bfloat16 before
  capture, so the compiled graph computes in bf16. Each microbatch's bf16 gradient is
  added into an fp32 buffer (Megatron's ``main_grad``) as soon as autograd produces it,
  so accumulation across microbatches and the data-parallel reduction happen in fp32.
  The optimizer (runtime/optimizer.py) keeps fp32 master weights, steps them with the
  fp32 gradients and copies them back to the bf16 parameters; checkpoints store the
  fp32 masters.
- ``fp16``: as bf16, plus dynamic loss scaling: the backward seed is multiplied by the
  scale (``GradBuckets.loss_scale``, read by the executor), the optimizer divides the
  gradients by it, skips the step when any gradient is inf/NaN and halves the scale;
  after ``growth_interval`` clean steps the scale doubles.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .data_parallel import GradBuckets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(precision: str) -> torch.dtype:
    return DTYPES[precision]


def cast_module(module: nn.Module, precision: str) -> nn.Module:
    """Cast floating-point parameters and buffers to the compute dtype, in place (the
    Parameter objects stay the same, as ``module.to(dtype)`` keeps them)."""
    dtype = param_dtype(precision)
    if dtype != torch.float32:
        module.to(dtype)
    return module


class MainGradBuckets(GradBuckets):
    """Gradient buckets whose buffers are fp32 even when parameters are bf16/fp16.

    ``param.main_grad`` is the parameter's fp32 slot. When the dtypes differ,
    ``param.grad`` is left None between microbatches: the post-accumulate hook adds the
    microbatch's low-precision gradient into ``main_grad`` and frees it. ``pad_to`` pads
    each buffer so a reduce-scatter can split it evenly (distributed optimizer)."""

    loss_scale = 1.0
    always_flat = True

    def __init__(self, params: list, group=None, bucket_bytes: int = 25 * 2**20,
                 grad_dtype: torch.dtype = torch.float32, pad_to: int = 1):
        self.grad_dtype, self.pad_to = grad_dtype, pad_to
        super().__init__(params, group, bucket_bytes)

    def _add_bucket(self, params):
        n = sum(p.numel() for p in params)
        padded = -(-n // self.pad_to) * self.pad_to
        buf = torch.zeros(padded, dtype=self.grad_dtype, device=params[0].device)
        views, offsets, off = {}, {}, 0
        for p in params:
            views[p] = buf[off:off + p.numel()].view_as(p)
            offsets[p] = off
            off += p.numel()
        self.buckets.append({"buffer": buf, "views": views, "offsets": offsets, "numel": n,
                             "pending": set(), "launched": False})

    def start_step(self):
        super().start_step()
        for b in self.buckets:
            for p, v in b["views"].items():
                p.main_grad = v

    def _absorb(self, p, b, view):
        if p.grad is None or view.dtype == p.dtype:
            return super()._absorb(p, b, view)
        # this microbatch's bf16/fp16 gradient, moved into (or accumulated in) fp32
        if p in b["unwritten"]:
            view.copy_(p.grad)
        else:
            view.add_(p.grad)
        p.grad = None
        b["unwritten"].discard(p)

    def _expose(self, p, view):
        if view.dtype == p.dtype:
            p.grad = view


class DynamicLossScaler:
    """fp16 loss scale: halve on an inf/NaN gradient, double after ``growth_interval``
    clean steps (the schedule of Megatron's and torch.amp's dynamic scalers)."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000,
                 backoff: float = 0.5, growth: float = 2.0, min_scale: float = 1.0):
        self.scale, self.growth_interval = float(init_scale), growth_interval
        self.backoff, self.growth, self.min_scale = backoff, growth, min_scale
        self.good_steps = 0

    def update(self, found_inf: bool):
        if found_inf:
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= self.growth

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, sd: dict):
        self.scale, self.good_steps = float(sd["scale"]), int(sd["good_steps"])

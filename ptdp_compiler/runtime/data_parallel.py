"""Data-parallel gradient reduction in buckets that overlap with backward (as DDP does).

Gradients live in flat per-bucket buffers (``param.grad`` is a view into them), so
a bucket is reduced in place with one collective, launched asynchronously from a
post-accumulate-grad hook as soon as its last gradient of the step is ready.
Buckets follow reverse parameter order, roughly the order backward produces them.
The loss is already weighted by the global token count, so the reduction is a SUM.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class GradBuckets:
    def __init__(self, params: list, group=None, bucket_bytes: int = 25 * 2**20):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.reduce = group is not None and dist.get_world_size(group) > 1
        self.buckets: list[dict] = []
        cur, size = [], 0
        for p in reversed(self.params):
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self._add_bucket(cur)
                cur, size = [], 0
        if cur:
            self._add_bucket(cur)
        self._owner = {p: b for b in self.buckets for p in b["views"]}
        self._final = False
        self._suspended = False
        self._handles = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _add_bucket(self, params):
        dtype = params[0].dtype
        n = sum(p.numel() for p in params)
        buf = torch.zeros(n, dtype=dtype, device=params[0].device)
        views, off = {}, 0
        for p in params:
            views[p] = buf[off:off + p.numel()].view_as(p)
            off += p.numel()
        self.buckets.append({"buffer": buf, "views": views, "pending": set(), "launched": False})

    def _bucket_of(self, p):
        return self._owner[p]

    def start_step(self):
        """Zero the gradient buffers and point every ``param.grad`` at its slot."""
        for b in self.buckets:
            b["buffer"].zero_()
            for p, v in b["views"].items():
                p.grad = v
            b["pending"] = set(b["views"])
            b["launched"] = False
        self._final = False
        self._handles = []

    def last_microbatch(self):
        """Gradients completed from now on are final: reduce each bucket when full."""
        self._final = True

    def mark_final(self, params):
        """Gradients of ``params`` completed from now on are final (a pipeline chunk's last
        backward): other parameters may still be accumulating, so finality is per param."""
        if self._final is not True:
            self._final = (self._final or set()) | {p for p in params if p in self._owner}

    @contextlib.contextmanager
    def not_final(self):
        """Accumulations inside are not final even after ``mark_final`` (a pipeline's
        deferred weight gradients of an earlier microbatch, run after the last one's
        backward began)."""
        prev, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = prev

    def _on_grad(self, p):
        b = self._bucket_of(p)
        view = b["views"][p]
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            # the optimizer (or user) replaced .grad: fold it back into the bucket
            view.copy_(p.grad)
            p.grad = view
        if not self.reduce or self._suspended:   # nothing to launch (yet)
            return
        if not self._final or (self._final is not True and p not in self._final):
            return
        b["pending"].discard(p)
        if not b["pending"]:
            self._launch(b)

    def _launch(self, b):
        if b["launched"]:
            return
        b["launched"] = True
        if self.reduce:
            self._handles.append(dist.all_reduce(b["buffer"], group=self.group, async_op=True))

    def finish(self):
        """Reduce buckets whose parameters got no gradient, then wait for every reduction."""
        for b in self.buckets:
            self._launch(b)
        for h in self._handles:
            h.wait()
        self._handles = []

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    @property
    def nbytes(self) -> int:
        return sum(b["buffer"].numel() * b["buffer"].element_size() for b in self.buckets)

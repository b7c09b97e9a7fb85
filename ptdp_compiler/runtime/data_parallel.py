"""Data-parallel gradient reduction in buckets that overlap with backward (as DDP does).

Gradients live in flat per-bucket buffers (``param.grad`` is a view into them), so
a bucket is reduced in place with one collective, launched asynchronously from a
post-accumulate-grad hook as soon as its last gradient of the step is ready.
Buckets follow reverse parameter order, roughly the order backward produces them.
The loss is already weighted by the global token count, so the reduction is a SUM.

What a step costs in memory traffic, per gradient element. The buffers are not zeroed:
a parameter's first gradient of the step is *copied* into its slot (autograd hands it
over as a fresh tensor because ``param.grad`` is None at the step's start), later ones
accumulate in place; slots that got no gradient are zeroed just before their bucket is
reduced. That is one read + one write, where zero-then-accumulate is one write, two
reads and one write. With nothing to reduce (dp = 1) and nothing else needing a flat
buffer, there are no buffers at all: gradients stay where autograd puts them, as in
eager PyTorch (on one H100 the buffers cost a 4-layer h=4096 GPT ~10% of its step).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class GradBuckets:
    # subclasses that keep gradients elsewhere than ``param.grad`` (fp32 main grads) need
    # their buffers even when nothing is reduced
    always_flat = False

    def __init__(self, params: list, group=None, bucket_bytes: int = 25 * 2**20):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.reduce = group is not None and dist.get_world_size(group) > 1
        self.buckets: list[dict] = []
        cur, size = [], 0
        for p in reversed(self.params if self.reduce or self.always_flat else []):
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
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for p in self.params if p in self._owner]

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
        """Clear every ``param.grad``: the step's first gradient of each parameter is
        copied into its slot (``_absorb``), so the buffers need no zeroing."""
        for p in self.params:
            p.grad = None
        for b in self.buckets:
            b["pending"] = set(b["views"])
            b["unwritten"] = set(b["views"])
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

    def _absorb(self, p, b, view):
        """Move the gradient autograd left in ``p.grad`` into p's slot, unless it is
        already there (accumulated in place)."""
        if p.grad is None:   # a split backward's D half: the W half brings it later
            return
        if p.grad.data_ptr() != view.data_ptr():
            if p in b["unwritten"]:
                view.copy_(p.grad)
            else:   # the user replaced .grad mid-step: fold it into the slot
                view.add_(p.grad)
            p.grad = view
        b["unwritten"].discard(p)

    def _fill_unwritten(self, b):
        """Slots of parameters that got no gradient this step hold last step's: zero them
        (before the bucket is reduced; gradients are then zero, as DDP's are)."""
        for p in b["unwritten"]:
            b["views"][p].zero_()
            self._expose(p, b["views"][p])
        b["unwritten"] = set()

    def _expose(self, p, view):
        p.grad = view

    def _on_grad(self, p):
        b = self._bucket_of(p)
        self._absorb(p, b, b["views"][p])
        if not self.reduce or self._suspended:   # nothing to launch (yet)
            return
        if not self._final or (self._final is not True and p not in self._final):
            return
        b["pending"].discard(p)
        if not b["pending"]:
            self._fill_unwritten(b)
            self._launch(b)

    def _launch(self, b):
        if b["launched"]:
            return
        b["launched"] = True
        if self.reduce:
            self._handles.append(dist.all_reduce(b["buffer"], group=self.group, async_op=True))

    def finish(self):
        """Reduce buckets whose parameters got no gradient, then wait for every reduction.
        Afterwards every parameter has a gradient (zeros where the step produced none)."""
        for b in self.buckets:
            self._fill_unwritten(b)
            self._launch(b)
        for p in self.params:
            if p.grad is None and p not in self._owner:
                p.grad = torch.zeros_like(p)
        for h in self._handles:
            h.wait()
        self._handles = []

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    @property
    def nbytes(self) -> int:
        return sum(b["buffer"].numel() * b["buffer"].element_size() for b in self.buckets)

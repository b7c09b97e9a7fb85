"""Pipeline executor: runs this rank's chunks in the order a ``Schedule`` fixes.

The schedule (ptdp_compiler/schedules.py) is one global, deterministic list of compute and
send/recv groups per pipeline rank; this module only executes it:

- FORWARD (c, mb): the received boundary tensors become leaves that require grad, the
  compiled chunk runs under the (step, microbatch, chunk) RNG stream, its outputs are
  kept until the matching BACKWARD (the last chunk keeps its weighted loss instead).
- BACKWARD (c, mb): autograd from the kept outputs with the received output gradients
  (the last chunk: from its weighted loss); the inputs' gradients are what is sent back.
  With ``split_backward`` (chunks that send an input gradient to another rank:
  ``schedules.sends_input_grad``) the compiled backward computes only the input
  gradients and queues the weight gradients (codegen/split_backward.py), so the previous
  stage gets its gradient without waiting for them. Queued weight gradients run (event
  kind ``W``), oldest first, where ``schedules.weight_grad_slots`` puts them: where the
  rank would otherwise wait for its next input in a unit-cost replay of the schedule, or
  when more than ``schedules.MAX_DEFERRED_BACKWARDS`` are queued; all before the step ends. The
  placement depends only on the schedule, never on timing, so every tensor-parallel rank
  of a stage runs the same collectives in the same order.
- a communication group: one ``batch_isend_irecv`` posting every send and recv of the
  group; a receive is waited for (with a timeout) just before the compute that reads it,
  a send at the end of the step. Buffers are allocated from shapes known from the
  graph (``program.ChunkProgram.in_meta`` / ``out_meta``) — there is no shape handshake.

Scatter/gather (Narayanan et al. 2021 §4.1): a boundary tensor that is replicated over
the tp ranks of a stage (tp > 1, sequence parallelism off) is sent as 1/t slices, one
per tp rank, and all-gathered over tp by the receiver. With sequence parallelism the
boundary is already sequence-sharded and is sent as is.

Every step appends timed events (compute and comm) to ``events``; ``timeline.py`` turns
them into a Chrome trace and a picture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..codegen.split_backward import defer_weight_grads
from ..errors import PipelinePeerError
from .executor import weighted, weighted_sum_term
from .mesh import comm_device
from ..schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD,
                        WEIGHT_GRAD, Schedule, deferred_slots, sends_input_grad)

MAX_BOUNDARY_TENSORS = 64   # sub-tag space per transfer (tag * 64 + i)


@dataclasses.dataclass
class PipelineComm:
    """Where this rank's peers are and how to talk to them."""
    pp_rank: int
    global_rank_of: Callable[[int], int]    # pipeline rank -> global rank (same dp, tp)
    tp_group: Optional[object]
    tp: int
    tp_rank: int
    timeout_s: float
    bytes_sent: int = 0

    @property
    def device(self) -> torch.device:
        """Where p2p buffers live: the GPU under NCCL, the CPU under gloo."""
        return comm_device()


@dataclasses.dataclass
class _PendingRecv:
    """Receives posted by a communication group, waited for when first needed."""
    group: tuple
    works: list
    bufs: list
    metas: list


class PipelineRun:
    """The state of one training step on one pipeline rank. ``stages``: this rank's
    compiled chunks, chunk index -> ``program.ChunkProgram``."""

    def __init__(self, sched: Schedule, stages: dict, comm: PipelineComm,
                 graph_value: Callable, weights: list, rng, step: int,
                 on_last_backward: Callable[[int], None], loss_scale: float = 1.0,
                 split_backward: bool = False, not_final: Optional[Callable] = None):
        self.sched, self.stages, self.comm = sched, stages, comm
        self.graph_value = graph_value      # (mb, (kind, name)) -> tensor
        self.weights, self.rng, self.step = weights, rng, step
        self.on_last_backward = on_last_backward
        self.loss_scale = loss_scale
        self.nc = sched.num_chunks
        self.inbox: dict = {}      # ("act"/"grad", producing chunk, mb) -> list[Tensor]
        self.outbox: dict = {}     # same key -> list[Tensor] to send
        self.saved: dict = {}      # (chunk, mb) -> (input leaves, outputs or weighted loss)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=comm.device)
        self.events: list = []     # (kind, chunk, mb, start, end, detail)
        self.pending_sends: list = []  # (work, group, buffer) waited for at the end
        self.split_backward = split_backward
        # context in which gradient accumulation does not count as final for data-parallel
        # buckets: deferred weight gradients of a microbatch before the last can run after
        # the last microbatch's backward marked its chunk's parameters final
        self.not_final = not_final or contextlib.nullcontext
        self.weight_grads: list = []   # (chunk, mb, DeferredWeightGrads) not yet computed
        self.w_slots = deferred_slots(sched)[comm.pp_rank] if split_backward else None

    # ---- compute ------------------------------------------------------------------------
    def forward(self, c: int, mb: int, received: list):
        st = self.stages[c]
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in received]
        args = [self.graph_value(mb, ref) if kind == "graph" else leaves[ref]
                for kind, ref in st.inputs]
        key = mb if self.nc == 1 else (mb, c)
        with self.rng.fork(self.step, key):
            outs = st.fn(*args)
        if c == self.nc - 1:
            w = self.weights[mb]
            self.loss_sum += weighted_sum_term(outs[0], w, self.loss_sum.device)
            # fp16: the backward seed (not the reported loss) carries the dynamic loss scale;
            # one multiply by weight·scale, as the scale alone (2^16) is not a finite fp16
            # gradient
            seed = weighted(outs[0], w, self.loss_scale)
            self.saved[(c, mb)] = (leaves, [seed])
        else:
            outs = list(outs)
            self.saved[(c, mb)] = (leaves, outs)
            self.outbox[("act", c, mb)] = [o.detach() for o in outs]

    def backward(self, c: int, mb: int, grads: list):
        leaves, outs = self.saved.pop((c, mb))
        if mb == self.sched.m - 1:
            self.on_last_backward(c)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        if pairs and self.split_backward and sends_input_grad(self.sched, c):
            with defer_weight_grads() as queue:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self.weight_grads.append((c, mb, queue))
        elif pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if c > 0:
            self.outbox[("grad", c, mb)] = [
                x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]

    def run_weight_grads(self, keep: int = 0):
        """Compute queued weight gradients, oldest backward first, until at most ``keep``
        backwards' remain queued."""
        while len(self.weight_grads) > keep:
            c, mb, queue = self.weight_grads.pop(0)
            t0 = time.time()
            with self.not_final() if mb < self.sched.m - 1 else contextlib.nullcontext():
                queue.run()
            self.events.append((WEIGHT_GRAD, c, mb, t0, time.time(), ""))

    # ---- communication ------------------------------------------------------------------
    def _meta_for(self, a) -> list:
        """Boundary metadata of the tensors an action moves."""
        if a.kind in (SEND_ACT, RECV_ACT):
            # activations produced by chunk a.chunk = inputs of chunk a.chunk + 1
            if a.chunk + 1 in self.stages:
                return self.stages[a.chunk + 1].in_meta
            return self.stages[a.chunk].out_meta
        # input-gradients of chunk a.chunk = gradients of chunk a.chunk - 1's outputs
        if a.chunk - 1 in self.stages:
            return self.stages[a.chunk - 1].out_meta
        return self.stages[a.chunk].in_meta

    def communicate(self, group: tuple):
        cm = self.comm
        ops, gathers = [], []
        for a in group:
            peer = cm.global_rank_of(a.peer)
            metas = self._meta_for(a)
            key = ("act" if a.kind in (SEND_ACT, RECV_ACT) else "grad", a.chunk, a.mb)
            if a.kind in (SEND_ACT, SEND_GRAD):
                for i, (t, meta) in enumerate(zip(self.outbox.pop(key), metas)):
                    buf = t.contiguous().view(-1)
                    if meta.scatter:
                        part = meta.numel // cm.tp
                        buf = buf[cm.tp_rank * part:(cm.tp_rank + 1) * part].contiguous()
                    cm.bytes_sent += buf.numel() * buf.element_size()
                    ops.append(dist.P2POp(dist.isend, buf, peer, tag=a.tag * MAX_BOUNDARY_TENSORS + i))
            else:
                bufs, first = [], len(ops)
                for i, meta in enumerate(metas):
                    n = meta.numel // cm.tp if meta.scatter else meta.numel
                    buf = torch.empty(n, dtype=meta.dtype, device=cm.device)
                    ops.append(dist.P2POp(dist.irecv, buf, peer, tag=a.tag * MAX_BOUNDARY_TENSORS + i))
                    bufs.append(buf)
                gathers.append((key, bufs, metas, first))
        try:
            works = dist.batch_isend_irecv(ops) if ops else []
        except (RuntimeError, TimeoutError) as e:
            raise PipelinePeerError(self._timeout_message(group, e)) from e
        # nothing is waited for here: a send at the end of the step (its buffer stays alive
        # until then), a receive just before the compute that reads it (``_take``), so no
        # rank idles on a peer while it still has other work in the schedule
        self.pending_sends += [(w, group, op.tensor) for op, w in zip(ops, works)
                               if op.op is dist.isend]
        for key, bufs, metas, first in gathers:
            self.inbox[key] = _PendingRecv(group, works[first:first + len(bufs)], bufs, metas)

    def _take(self, key) -> list:
        """The tensors received under ``key``: wait for their receives (timed as a comm
        event, so waiting never counts as compute) and all-gather scattered slices over tp."""
        pending = self.inbox.pop(key)
        cm = self.comm
        t0 = time.time()
        for w in pending.works:
            self._wait(w, pending.group)
        tensors = []
        for buf, meta in zip(pending.bufs, pending.metas):
            if meta.scatter:
                parts = [torch.empty_like(buf) for _ in range(cm.tp)]
                dist.all_gather(parts, buf, group=cm.tp_group)
                buf = torch.cat(parts)
            tensors.append(buf.view(meta.shape))
        self.events.append(("comm", key[1], key[2], t0, time.time(), pending.group))
        return tensors

    def _wait(self, w, group: tuple):
        """Wait for one p2p of ``group``; a failure or timeout names the peer."""
        try:
            if w.wait(timedelta(seconds=self.comm.timeout_s)) is False:
                raise TimeoutError("wait returned False")
        except (RuntimeError, TimeoutError) as e:
            raise PipelinePeerError(self._timeout_message(group, e)) from e

    def _drain_sends(self):
        for w, group, _ in self.pending_sends:
            self._wait(w, group)
        self.pending_sends = []

    def _timeout_message(self, group, err) -> str:
        peers = sorted({self.comm.global_rank_of(a.peer) for a in group})
        what = ", ".join(f"{a.kind} chunk {a.chunk} microbatch {a.mb}" for a in group)
        return (f"pipeline p2p ({what}) with rank(s) {peers} failed or did not complete "
                f"within {self.comm.timeout_s:.0f} s — a peer stage died or is stuck "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    # ---- the step -----------------------------------------------------------------------
    def run(self):
        k = 0       # compute steps so far
        for step in self.sched.steps[self.comm.pp_rank]:
            a = step[0]
            if a.is_compute and self.w_slots:   # deferred weight gradients due here
                self.run_weight_grads(keep=max(len(self.weight_grads) - self.w_slots[k], 0))
                k += 1
            if a.kind == FORWARD:
                received = self._take(("act", a.chunk - 1, a.mb)) if a.chunk > 0 else []
                t0 = time.time()
                self.forward(a.chunk, a.mb, received)
            elif a.kind == BACKWARD:
                grads = self._take(("grad", a.chunk + 1, a.mb)) \
                    if a.chunk < self.nc - 1 else [None]
                t0 = time.time()
                self.backward(a.chunk, a.mb, grads)
            else:
                t0 = time.time()
                self.communicate(step)
            kind = a.kind if a.is_compute else "comm"
            # the step itself, formatted only when a timeline is drawn (event_detail)
            self.events.append((kind, a.chunk, a.mb, t0, time.time(),
                                "" if a.is_compute else step))
        self.run_weight_grads()
        t0 = time.time()
        self._drain_sends()
        self.events.append(("comm", -1, -1, t0, time.time(), "wait for outstanding sends"))
        assert not self.saved, f"activations left after the step: {list(self.saved)}"
        return self.loss_sum




def event_detail(detail) -> str:
    """The text of an event's detail (a communication step is kept as its actions)."""
    return detail if isinstance(detail, str) else " ".join(str(x) for x in detail)


def peak_inflight(events: list) -> int:
    """Most (chunk, microbatch) forwards whose backward had not yet run, from events."""
    live = peak = 0
    for kind, *_ in events:
        if kind == FORWARD:
            live += 1
            peak = max(peak, live)
        elif kind == BACKWARD:
            live -= 1
    return peak

"""Pipeline schedules as pure data: one global, deterministic order of compute and p2p actions.

The runtime executes these lists (``runtime/pipeline.py``) and the planner's simulator
plays the same lists with costs (``planner/play.py``), so there is exactly one source of
truth for what a schedule does. This module is plain data and sits below both.

Vocabulary
----------
A pipeline of ``p`` ranks runs ``p·v`` model chunks; chunk ``c`` lives on pipeline rank
``c % p`` (Megatron's interleaved assignment, Narayanan et al. 2021 §2.2.2), so rank ``r``
holds chunks ``r, r+p, …, r+(v-1)p``. Every microbatch ``mb`` flows forward through chunks
``0 … p·v-1`` and backward through them in reverse.

A schedule is, per rank, an ordered list of *steps*; a step is a tuple of actions:

- a compute step holds one ``FORWARD`` or ``BACKWARD`` action of ``(chunk, microbatch)``;
- a communication step holds one or more ``SEND_ACT`` / ``RECV_ACT`` / ``SEND_GRAD`` /
  ``RECV_GRAD`` actions that are issued together (one ``batch_isend_irecv``) and waited
  for together before the rank moves on.

Every send names its ``peer`` and a ``tag`` that is unique per (direction, chunk,
microbatch) and is matched by exactly one recv with the same tag on the peer.

Construction
------------
First each rank's compute order is fixed (GPipe, 1F1B or Megatron's interleaved 1F1B).
Then communication is placed globally: between a rank's consecutive compute steps
``c_i`` and ``c_{i+1}`` goes one batched group holding the sends of ``c_i``'s outputs and
the recvs of ``c_{i+1}``'s inputs (Megatron's ``send_forward_recv_backward`` pattern,
generalised). ``planner.play.validate`` proves, by simulation under the strictest semantics
(rendezvous: a send completes only when the peer has posted the matching recv, and a
group completes only when all its ops have), that the result cannot deadlock.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional

from .errors import ConfigError

FORWARD, BACKWARD = "F", "B"
WEIGHT_GRAD = "W"           # deferred weight gradients of a split backward (never in steps)
MAX_DEFERRED_BACKWARDS = 1  # backwards whose weight gradients may wait past a compute step
                            # (each holds its saved activations until its W runs)
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"
COMPUTE_KINDS = (FORWARD, BACKWARD)
SEND_KINDS = (SEND_ACT, SEND_GRAD)
RECV_KINDS = (RECV_ACT, RECV_GRAD)
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved")


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing a rank does. For p2p actions ``chunk`` is the chunk that PRODUCED the
    tensor (the activation output of chunk c, or the input-gradient of chunk c)."""
    kind: str
    chunk: int
    mb: int
    peer: Optional[int] = None
    tag: Optional[int] = None

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    def __str__(self):
        if self.is_compute:
            return f"{self.kind}{self.chunk}.{self.mb}"
        return f"{self.kind}(c{self.chunk},mb{self.mb},peer={self.peer},tag={self.tag})"


Step = tuple  # tuple[Action, ...]


def make_tag(direction: str, chunk: int, mb: int, num_chunks: int) -> int:
    """A tag unique per (direction, producing chunk, microbatch)."""
    return (mb * num_chunks + chunk) * 2 + (0 if direction == "act" else 1)


@dataclasses.dataclass
class Schedule:
    """Per-rank ordered steps for one training step of one pipeline."""
    name: str
    p: int
    v: int
    m: int
    steps: list  # steps[rank] = list[Step]

    @property
    def num_chunks(self) -> int:
        return self.p * self.v

    def rank_of(self, chunk: int) -> int:
        return chunk % self.p

    def chunks_of(self, rank: int) -> list:
        return [rank + j * self.p for j in range(self.v)]

    def compute_order(self, rank: int) -> list:
        return [s[0] for s in self.steps[rank] if s[0].is_compute]

    def __str__(self):
        lines = [f"{self.name} p={self.p} v={self.v} m={self.m}"]
        for r, st in enumerate(self.steps):
            lines.append(f"rank {r}: " + " ".join(
                str(s[0]) if s[0].is_compute else
                "[" + ",".join(f"{a.kind[0]}{'a' if 'ACT' in a.kind else 'g'}{a.chunk}.{a.mb}>"
                               f"{a.peer}" for a in s) + "]" for s in st))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# compute orders
# ------------------------------------------------------------------------------------------
def check_schedule_args(name: str, p: int, v: int, m: int) -> None:
    """Raise ConfigError for an impossible (schedule, p, v, m)."""
    for k, x in (("p", p), ("v", v), ("m", m)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 1:
            raise ConfigError(f"{k}={x!r}: must be a positive integer")
    if name not in SCHEDULE_NAMES:
        raise ConfigError(f"schedule={name!r}: choose one of {SCHEDULE_NAMES}")
    if v > 1 and p == 1:
        raise ConfigError(f"virtual_stages={v} needs pp > 1 (one pipeline rank has nothing to "
                          "interleave)")
    if name == "interleaved" and v > 1 and m % p:
        raise ConfigError(
            f"the interleaved schedule needs the number of microbatches ({m}) to be a multiple "
            f"of pp ({p}); use microbatches={max(p, (m // p) * p)} or "
            f"{(m // p + 1) * p}, or virtual_stages=1")
    if name == "1f1b" and v > 1:
        raise ConfigError("schedule='1f1b' runs one chunk per rank; use schedule='interleaved' "
                          "for virtual_stages > 1")


def _gpipe_order(p, v, m, r):
    chunks = [r + j * p for j in range(v)]
    fw = [(FORWARD, c, mb) for c in chunks for mb in range(m)]
    bw = [(BACKWARD, c, mb) for c in reversed(chunks) for mb in range(m)]
    return fw + bw


def _1f1b_order(p, m, r):
    warm = min(p - r - 1, m)
    out = [(FORWARD, r, mb) for mb in range(warm)]
    f, b = warm, 0
    while f < m:
        out.append((FORWARD, r, f))
        out.append((BACKWARD, r, b))
        f += 1
        b += 1
    out += [(BACKWARD, r, mb) for mb in range(b, m)]
    return out


def interleaved_warmup(p: int, v: int, m: int, r: int) -> int:
    """Forward chunk-microbatches rank r runs before its first backward (Megatron)."""
    return min((p - r - 1) * 2 + (v - 1) * p, m * v)


def _interleaved_order(p, v, m, r):
    total = m * v

    def fwd(k):  # k-th forward chunk-microbatch of this rank
        j = (k // p) % v
        mb = (k // (p * v)) * p + k % p
        return (FORWARD, r + j * p, mb)

    def bwd(k):
        j = v - 1 - (k // p) % v
        mb = (k // (p * v)) * p + k % p
        return (BACKWARD, r + j * p, mb)

    warm = interleaved_warmup(p, v, m, r)
    out = [fwd(k) for k in range(warm)]
    for k in range(total - warm):
        out.append(fwd(k + warm))
        out.append(bwd(k))
    out += [bwd(k) for k in range(total - warm, total)]
    return out


def compute_orders(name: str, p: int, v: int, m: int) -> list:
    check_schedule_args(name, p, v, m)
    if name == "gpipe":
        return [_gpipe_order(p, v, m, r) for r in range(p)]
    if name == "1f1b" or (name == "interleaved" and v == 1):
        return [_1f1b_order(p, m, r) for r in range(p)]
    return [_interleaved_order(p, v, m, r) for r in range(p)]


# ------------------------------------------------------------------------------------------
# global placement of communication
# ------------------------------------------------------------------------------------------
def _inputs_from_peers(kind, c, mb, p, nc):
    """Recv actions a compute action needs from OTHER ranks."""
    r = c % p
    if kind == FORWARD and c > 0 and (c - 1) % p != r:
        return [Action(RECV_ACT, c - 1, mb, (c - 1) % p, make_tag("act", c - 1, mb, nc))]
    if kind == BACKWARD and c < nc - 1 and (c + 1) % p != r:
        return [Action(RECV_GRAD, c + 1, mb, (c + 1) % p, make_tag("grad", c + 1, mb, nc))]
    return []


def _outputs_to_peers(kind, c, mb, p, nc):
    r = c % p
    if kind == FORWARD and c < nc - 1 and (c + 1) % p != r:
        return [Action(SEND_ACT, c, mb, (c + 1) % p, make_tag("act", c, mb, nc))]
    if kind == BACKWARD and c > 0 and (c - 1) % p != r:
        return [Action(SEND_GRAD, c, mb, (c - 1) % p, make_tag("grad", c, mb, nc))]
    return []


def _buffered_times(orders, p, nc, cost_f=1, cost_b=2):
    """Start/end time of every compute under buffered (eager) p2p, unit costs F=1, B=2.

    Used only to ORDER communication; raises DeadlockError if the compute orders
    themselves are cyclic."""
    ptr = [0] * p
    clock = [0] * p
    end: dict = {}      # (kind, chunk, mb) -> end time
    times: list = [[] for _ in range(p)]
    left = sum(len(o) for o in orders)
    while left:
        progressed = False
        for r in range(p):
            while ptr[r] < len(orders[r]):
                kind, c, mb = orders[r][ptr[r]]
                if kind == FORWARD:
                    deps = [(FORWARD, c - 1, mb)] if c > 0 else []
                else:
                    deps = [(FORWARD, c, mb)] + ([(BACKWARD, c + 1, mb)] if c < nc - 1 else [])
                if any(d not in end for d in deps):
                    break
                start = max([clock[r]] + [end[d] for d in deps])
                clock[r] = start + (cost_f if kind == FORWARD else cost_b)
                end[(kind, c, mb)] = clock[r]
                times[r].append((start, clock[r]))
                ptr[r] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise DeadlockError(f"compute orders are cyclic at {[orders[r][ptr[r]] for r in range(p) if ptr[r] < len(orders[r])]}")
    return times


def build_schedule(name: str, p: int, v: int = 1, m: int = 1) -> Schedule:
    """The global action lists of ``name`` in {'gpipe', '1f1b', 'interleaved'}.

    Communication is ordered by one global key so rendezvous p2p cannot deadlock: a
    reference timeline of the compute orders (unit costs, buffered sends) gives every
    transfer the time its producer finishes; a rank's list is its computes (keyed by start
    time) and its sends/recvs (keyed by that transfer time, then tag) merged in key order,
    and consecutive sends/recvs become one batched group. Executing in global key order
    always finds the smallest pending item ready on every rank involved, so no schedule
    built this way can deadlock; ``validate`` checks it anyway.
    """
    orders = compute_orders(name, p, v, m)
    nc = p * v
    times = _buffered_times(orders, p, nc)
    items: list = [[] for _ in range(p)]
    for r, order in enumerate(orders):
        for (kind, c, mb), (t0, t1) in zip(order, times[r]):
            items[r].append(((t0, 1, 0), Action(kind, c, mb)))
            for a in _outputs_to_peers(kind, c, mb, p, nc):
                items[r].append(((t1, 0, a.tag), a))
                recv_kind = RECV_ACT if a.kind == SEND_ACT else RECV_GRAD
                items[a.peer].append(((t1, 0, a.tag), Action(recv_kind, c, mb, r, a.tag)))
    steps = []
    for r in range(p):
        st: list = []
        group: list = []
        for _, a in sorted(items[r], key=lambda kv: kv[0]):
            if a.is_compute:
                if group:
                    st.append(tuple(group))
                    group = []
                st.append((a,))
            else:
                group.append(a)
        if group:
            st.append(tuple(group))
        steps.append(st)
    return Schedule(name, p, v, m, steps)


# ------------------------------------------------------------------------------------------
# deferred weight gradients (split backward)
# ------------------------------------------------------------------------------------------
def sends_input_grad(sched: Schedule, chunk: int) -> bool:
    """Whether ``chunk``'s backward sends its input gradient to another pipeline rank: the
    chunks whose backward is split (their weight gradients wait, the send does not)."""
    return bool(_outputs_to_peers(BACKWARD, chunk, 0, sched.p, sched.num_chunks))


def weight_grad_slots(sched: Schedule, max_pending: int = 1, cost_f: float = 1.0,
                      cost_d: float = 1.0, cost_w: float = 1.0) -> list:
    """Where each rank runs the weight gradients of its split backward passes.

    With a split backward, BACKWARD (c, mb) of a chunk that ``sends_input_grad`` computes
    only the input gradient (D) and leaves its weight gradients (W) queued. This replays
    the compute orders with unit costs (F, D, W; an unsplit backward is D + W) and runs a
    queued W, oldest first, whenever a rank would otherwise wait for its next input, or
    when more than ``max_pending`` backwards' W are queued — the zero-bubble idea of
    filling pipeline bubbles with weight gradients (Qi et al. 2023), decided from the
    schedule alone so every tensor-parallel rank of a stage agrees.

    Returns, per rank, one count per compute step of ``sched.compute_order(rank)``: how
    many queued W to run before that step; the rest run after the last step.
    """
    p, nc = sched.p, sched.num_chunks
    orders = [sched.compute_order(r) for r in range(p)]
    ptr, clock = [0] * p, [0.0] * p
    pending = [0] * p
    slots = [[0] * len(o) for o in orders]
    end: dict = {}     # (kind, chunk, mb) -> end time (BACKWARD: when D is done)

    def next_event(r):
        """(start time, is_w) of rank r's next event, or None while it can only wait."""
        if ptr[r] >= len(orders[r]):
            return None
        a = orders[r][ptr[r]]
        if a.kind == FORWARD:
            deps = [(FORWARD, a.chunk - 1, a.mb)] if a.chunk > 0 else []
        else:
            deps = [(FORWARD, a.chunk, a.mb)] + \
                ([(BACKWARD, a.chunk + 1, a.mb)] if a.chunk < nc - 1 else [])
        ready = max([end[d] for d in deps], default=0.0) \
            if all(d in end for d in deps) else float("inf")
        if pending[r] and (ready > clock[r] or pending[r] > max_pending):
            return clock[r], True            # fill the wait (or bound memory) with one W
        if ready == float("inf"):
            return None
        return max(clock[r], ready), False

    # discrete events in global time order (ties: lower rank first). A rank's next event
    # changes only when the rank itself moves or when the one action it waits for ends,
    # so a heap of each rank's current next event (stale entries skipped) replays the
    # same order as scanning every rank each time, in O(n log n)
    heap: list = []
    current: list = [None] * p

    def refresh(r):
        ev = next_event(r)
        current[r] = None if ev is None else (ev[0], r, ev[1])
        if ev is not None:
            heapq.heappush(heap, current[r])

    for r in range(p):
        refresh(r)
    while any(ptr[r] < len(orders[r]) for r in range(p)):
        while heap and heap[0] != current[heap[0][1]]:
            heapq.heappop(heap)
        if not heap:
            raise DeadlockError(f"{sched.name}: cannot place weight gradients")
        start, r, is_w = heapq.heappop(heap)
        current[r] = None
        if is_w:
            pending[r] -= 1
            slots[r][ptr[r]] += 1
            clock[r] = start + cost_w
            refresh(r)
            continue
        a = orders[r][ptr[r]]
        if a.kind == FORWARD:
            clock[r] = start + cost_f
        elif sends_input_grad(sched, a.chunk):
            clock[r] = start + cost_d
            pending[r] += 1
        else:
            clock[r] = start + cost_d + cost_w
        end[(a.kind, a.chunk, a.mb)] = clock[r]
        ptr[r] += 1
        refresh(r)
        # the one rank whose next action may wait for this one
        nxt = a.chunk + 1 if a.kind == FORWARD else a.chunk - 1
        if 0 <= nxt < nc and nxt % p != r:
            refresh(nxt % p)
    return slots


def deferred_slots(sched: Schedule) -> list:
    """``weight_grad_slots(sched, MAX_DEFERRED_BACKWARDS)``, computed once per schedule
    object: the placement the runtime uses and the simulator plays."""
    cached = sched.__dict__.get("_weight_grad_slots")
    if cached is None:
        cached = sched.__dict__["_weight_grad_slots"] = weight_grad_slots(
            sched, MAX_DEFERRED_BACKWARDS)
    return cached


def weight_grads_by_step(sched: Schedule, rank: int) -> dict:
    """{step index: [(chunk, mb), …]}: the deferred weight gradients rank ``rank`` runs
    when it reaches that step, oldest first, as the runtime does. They are due before a
    compute step; when communication steps precede it, they belong to the last of those,
    because the runtime only posts a group's p2p and waits for receives when the compute
    reads them, so the weight gradients run while the inputs are on their way. Index
    ``len(steps)``: the ones left for after the last step."""
    steps, slots = sched.steps[rank], deferred_slots(sched)[rank]
    queue: list = []
    out: dict = {}
    k = 0
    for i, step in enumerate(steps):
        a = step[0]
        if not a.is_compute:
            continue
        due, queue = queue[:slots[k]], queue[slots[k]:]
        k += 1
        at = i - 1 if i > 0 and not steps[i - 1][0].is_compute else i
        if due:
            out[at] = due
        if a.kind == BACKWARD and sends_input_grad(sched, a.chunk):
            queue.append((a.chunk, a.mb))
    if queue:
        out[len(steps)] = queue
    return out


class DeadlockError(RuntimeError):
    """The action lists cannot complete under rendezvous p2p semantics."""


class ScheduleError(AssertionError):
    """The action lists break a dependency or leave a send unmatched."""


def expected_peak_inflight(name: str, p: int, v: int, m: int, r: int) -> int:
    """Forward chunk-microbatches alive on rank r at the worst moment (Megatron's bound)."""
    if name == "gpipe":
        return m * v
    if v == 1:
        return min(p - r, m)
    return min(interleaved_warmup(p, v, m, r) + 1, m * v)


__all__ = ["Action", "Schedule", "build_schedule", "DeadlockError", "ScheduleError",
           "expected_peak_inflight", "interleaved_warmup", "compute_orders",
           "check_schedule_args", "weight_grad_slots", "deferred_slots", "weight_grads_by_step",
           "sends_input_grad", "FORWARD", "BACKWARD", "WEIGHT_GRAD", "SEND_ACT", "RECV_ACT",
           "SEND_GRAD", "RECV_GRAD", "SCHEDULE_NAMES", "make_tag"]

"""Pipeline schedules as pure data: one global, deterministic order of compute and p2p actions.

The runtime executes these lists and the planner's simulator plays the same lists with
costs, so there is exactly one source of truth for what a schedule does.

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
generalised). ``validate`` proves, by simulation under the strictest semantics
(rendezvous: a send completes only when the peer has posted the matching recv, and a
group completes only when all its ops have), that the result cannot deadlock.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict
from typing import Callable, Optional, Sequence

from ..errors import ConfigError

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


# ------------------------------------------------------------------------------------------
# playing a schedule (shared by the validator and the planner's simulator)
# ------------------------------------------------------------------------------------------
class DeadlockError(RuntimeError):
    """The action lists cannot complete under rendezvous p2p semantics."""


class ScheduleError(AssertionError):
    """The action lists break a dependency or leave a send unmatched."""


@dataclasses.dataclass
class Event:
    rank: int
    step: int
    actions: tuple
    start: float
    end: float


@dataclasses.dataclass
class PlayResult:
    events: list            # Event per step, in completion order
    end_time: list          # per rank
    peak_inflight: list     # per rank: max forward chunk-microbatches whose backward is pending
    busy: list              # per rank: total compute time

    @property
    def makespan(self) -> float:
        return max(self.end_time) if self.end_time else 0.0


def play(sched: Schedule, compute_cost: Callable[[Action], float] = lambda a: 1.0,
         comm_cost: Callable[[Action], float] = lambda a: 0.0, check: bool = True,
         eager_sends: bool = True,
         weight_grad_cost: Optional[Callable[[int], float]] = None,
         blocking_sends: bool = True) -> PlayResult:
    """Play the action lists with rendezvous semantics and return timed events.

    A rank runs its steps in order. A compute step starts when the rank reaches it and
    lasts ``compute_cost(action)``. A communication group is *posted* when the rank reaches
    it; each send/recv pair completes at max(post time of both groups) + ``comm_cost(send)``;
    the group completes when all its pairs have. With ``check`` every dependency is
    verified (a forward has its input activation, a backward its own forward and its
    output gradient, a send its tensor) and every send must be matched exactly once.

    ``weight_grad_cost`` (chunk -> seconds) plays the split backward of the runtime's
    ``split_backward=True``: the BACKWARD of a chunk that ``sends_input_grad`` lasts
    ``compute_cost(a) - weight_grad_cost(chunk)`` and its weight gradients run as
    ``WEIGHT_GRAD`` events where ``weight_grads_by_step`` places them — one attached to a
    communication step starts when the group is posted and overlaps its wait.

    ``blocking_sends=False`` plays what the executor does: a rank posts a group's sends
    and moves on (it waits for them only at the end of the step), and only its receives
    hold it — each arrives ``comm_cost`` after both sides have posted (``eager_sends``:
    after the sender posted). Validation keeps the default, the strictest semantics.
    """
    p, nc = sched.p, sched.num_chunks
    steps = sched.steps
    ptr = [0] * p
    clock = [0.0] * p
    posted_at: list = [None] * p          # post time of the group a rank is blocked on
    done_pairs: dict = {}                 # (src, dst, tag) -> completion time
    have = [set() for _ in range(p)]      # tensors present on a rank: ("act"/"grad", chunk, mb)
    fwd_done = [set() for _ in range(p)]
    bwd_done = [set() for _ in range(p)]
    inflight = [0] * p
    peak = [0] * p
    busy = [0.0] * p
    events: list = []
    n_left = sum(len(s) for s in steps)
    split = weight_grad_cost is not None
    w_at = [weight_grads_by_step(sched, r) if split else {} for r in range(p)]
    w_end = [0.0] * p                     # when the weight gradients run at a post end
    sent: dict = {}                       # (src, dst, tag) -> (post time, send action)

    def run_weight_grads(r, i, t) -> float:
        """Play rank r's weight gradients due at step i from time t; returns their end."""
        for c, mb in w_at[r].get(i, ()):
            cost = weight_grad_cost(c)
            events.append(Event(r, i, (Action(WEIGHT_GRAD, c, mb),), t, t + cost))
            t += cost
            busy[r] += cost
        return t

    def fail(msg):
        raise ScheduleError(f"{sched.name} p={p} v={sched.v} m={sched.m}: {msg}")

    def run_compute(r, a):
        c, mb = a.chunk, a.mb
        if a.kind == FORWARD:
            if check:
                if c % p != r:
                    fail(f"rank {r} runs chunk {c} that lives on rank {c % p}")
                if (c, mb) in fwd_done[r]:
                    fail(f"forward {c}.{mb} twice on rank {r}")
                if c > 0 and ("act", c - 1, mb) not in have[r]:
                    fail(f"rank {r}: forward {c}.{mb} before its input activation arrived")
            fwd_done[r].add((c, mb))
            have[r].add(("act", c, mb))
            inflight[r] += 1
            peak[r] = max(peak[r], inflight[r])
        else:
            if check:
                if (c, mb) not in fwd_done[r]:
                    fail(f"rank {r}: backward {c}.{mb} before its forward")
                if (c, mb) in bwd_done[r]:
                    fail(f"backward {c}.{mb} twice on rank {r}")
                if c < nc - 1 and ("grad", c + 1, mb) not in have[r]:
                    fail(f"rank {r}: backward {c}.{mb} before its output gradient arrived")
            bwd_done[r].add((c, mb))
            have[r].add(("grad", c, mb))
            inflight[r] -= 1

    def pair_key(r, a):
        return (r, a.peer, a.tag) if a.kind in SEND_KINDS else (a.peer, r, a.tag)

    def matching(r, a):
        want = RECV_ACT if a.kind == SEND_ACT else SEND_ACT if a.kind == RECV_ACT else \
            RECV_GRAD if a.kind == SEND_GRAD else SEND_GRAD
        q = a.peer
        if q is None or not 0 <= q < p or q == r:
            fail(f"rank {r}: {a} has an invalid peer")
        if posted_at[q] is None or ptr[q] >= len(steps[q]):
            return None
        for b in steps[q][ptr[q]]:
            if b.kind == want and b.peer == r and b.tag == a.tag:
                return b
        return None

    while n_left:
        progressed = False
        for r in range(p):
            while ptr[r] < len(steps[r]):
                step = steps[r][ptr[r]]
                if step[0].is_compute:
                    a = step[0]
                    run_compute(r, a)
                    clock[r] = run_weight_grads(r, ptr[r], clock[r])
                    cost = compute_cost(a)
                    if split and a.kind == BACKWARD and sends_input_grad(sched, a.chunk):
                        cost -= weight_grad_cost(a.chunk)
                    events.append(Event(r, ptr[r], step, clock[r], clock[r] + cost))
                    clock[r] += cost
                    busy[r] += cost
                    ptr[r] += 1
                    n_left -= 1
                    progressed = True
                    continue
                if posted_at[r] is None:
                    posted_at[r] = clock[r]
                    w_end[r] = run_weight_grads(r, ptr[r], clock[r])
                    for a in step:
                        if a.kind in SEND_KINDS:
                            sent[(r, a.peer, a.tag)] = (clock[r], a)
                    if check:
                        for a in step:
                            if a.kind in SEND_KINDS:
                                what = "act" if a.kind == SEND_ACT else "grad"
                                if (what, a.chunk, a.mb) not in have[r]:
                                    fail(f"rank {r} sends {a} before producing it")
                # try to complete every pair of the group
                complete = True
                for a in step:
                    k = pair_key(r, a)
                    if k in done_pairs:
                        continue
                    if not blocking_sends:
                        if a.kind in SEND_KINDS:
                            continue          # the receiver completes the pair
                        if k not in sent:
                            complete = False  # the sender has not posted yet
                            continue
                        s_post, snd = sent[k]
                        if check and (snd.chunk != a.chunk or snd.mb != a.mb):
                            fail(f"tag {a.tag} pairs {a} with {snd}")
                        arrive = (s_post if eager_sends else max(s_post, posted_at[r])) + \
                            comm_cost(snd)
                        done_pairs[k] = (arrive, arrive)
                        continue
                    b = matching(r, a)
                    if b is None:
                        complete = False
                        continue
                    snd = a if a.kind in SEND_KINDS else b
                    if check and (snd.chunk != a.chunk or snd.mb != a.mb):
                        fail(f"tag {a.tag} pairs {a} with {b}")
                    s_post = posted_at[r] if a is snd else posted_at[a.peer]
                    r_post = posted_at[a.peer] if a is snd else posted_at[r]
                    arrive = (s_post if eager_sends else max(s_post, r_post)) + comm_cost(snd)
                    done_pairs[k] = (arrive, max(arrive, r_post))  # (sender done, receiver done)
                if not complete:
                    break
                t_end = max([posted_at[r], w_end[r]] +
                            [done_pairs[pair_key(r, a)][a.kind in RECV_KINDS] for a in step
                             if blocking_sends or a.kind in RECV_KINDS])
                for a in step:
                    if a.kind in RECV_KINDS:
                        what = "act" if a.kind == RECV_ACT else "grad"
                        have[r].add((what, a.chunk, a.mb))
                events.append(Event(r, ptr[r], step, posted_at[r], t_end))
                clock[r] = t_end
                posted_at[r] = None
                ptr[r] += 1
                n_left -= 1
                progressed = True
        if not progressed:
            blocked = {r: [str(a) for a in steps[r][ptr[r]]] for r in range(p)
                       if ptr[r] < len(steps[r])}
            raise DeadlockError(f"{sched.name} p={p} v={sched.v} m={sched.m} deadlocks; "
                                f"blocked ranks and their pending groups: {blocked}")
    for r in range(p):      # weight gradients left for after the last step
        clock[r] = run_weight_grads(r, len(steps[r]), clock[r])
    if check:
        n_pairs = sum(1 for st in steps for s in st for a in s if a.kind in SEND_KINDS)
        n_recv = sum(1 for st in steps for s in st for a in s if a.kind in RECV_KINDS)
        if n_pairs != n_recv or len(done_pairs) != n_pairs:
            fail(f"{n_pairs} sends, {n_recv} recvs, {len(done_pairs)} matched pairs")
        for r in range(p):
            want = {(c, mb) for c in sched.chunks_of(r) for mb in range(sched.m)}
            if fwd_done[r] != want or bwd_done[r] != want:
                fail(f"rank {r} did not run forward and backward of every (chunk, microbatch)")
    return PlayResult(events, clock, peak, busy)


def expected_peak_inflight(name: str, p: int, v: int, m: int, r: int) -> int:
    """Forward chunk-microbatches alive on rank r at the worst moment (Megatron's bound)."""
    if name == "gpipe":
        return m * v
    if v == 1:
        return min(p - r, m)
    return min(interleaved_warmup(p, v, m, r) + 1, m * v)


def validate(sched: Schedule) -> PlayResult:
    """Prove the schedule is correct: dependencies, matching, no deadlock, memory bound.

    Raises ScheduleError / DeadlockError; returns the unit-cost play result.
    """
    res = play(sched, check=True)
    for r in range(sched.p):
        bound = expected_peak_inflight(sched.name, sched.p, sched.v, sched.m, r)
        if res.peak_inflight[r] > bound:
            raise ScheduleError(f"{sched.name} p={sched.p} v={sched.v} m={sched.m}: rank {r} "
                                f"holds {res.peak_inflight[r]} microbatches > bound {bound}")
    # tags unique per pair
    seen = defaultdict(int)
    for r, st in enumerate(sched.steps):
        for s in st:
            for a in s:
                if a.kind in SEND_KINDS:
                    seen[(r, a.peer, a.tag)] += 1
    if any(n != 1 for n in seen.values()):
        raise ScheduleError("a (src, dst, tag) is used by more than one send")
    return res


def bubble_fraction(res: PlayResult, ideal: float) -> float:
    """(makespan − ideal) / ideal, the paper's definition (ideal = m·(t_f + t_b))."""
    return (res.makespan - ideal) / ideal


def stage_counts(sched: Schedule) -> list:
    """Per rank: number of compute steps (sanity for callers)."""
    return [sum(1 for s in st if s[0].is_compute) for st in sched.steps]


__all__ = ["Action", "Schedule", "build_schedule", "validate", "play", "PlayResult", "Event",
           "DeadlockError", "ScheduleError", "expected_peak_inflight", "interleaved_warmup",
           "bubble_fraction", "compute_orders", "check_schedule_args", "weight_grad_slots",
           "sends_input_grad", "FORWARD", "BACKWARD",
           "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD", "SCHEDULE_NAMES", "make_tag"]

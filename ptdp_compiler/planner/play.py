"""Playing a schedule's action lists (``ptdp_compiler/schedules.py``) with costs: timed
events under rendezvous p2p semantics. The validator proves a schedule correct with it
(unit costs, every dependency checked) and the planner's simulator (``simulator.py``)
predicts step times with it; the runtime executes the same lists.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Optional

from ..schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, RECV_KINDS, SEND_ACT,
                         SEND_GRAD, SEND_KINDS, WEIGHT_GRAD, Action, DeadlockError, Schedule,
                         ScheduleError, expected_peak_inflight, sends_input_grad,
                         weight_grads_by_step)


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


__all__ = ["play", "validate", "PlayResult", "Event", "bubble_fraction", "stage_counts"]

"""Schedule simulator: plays the runtime's own action lists (ptdp_compiler/schedules.py) with
per-action costs and returns step time, bubble fraction and peak memory per rank; writes
Chrome-trace JSON and a Figure-4-style timeline PNG."""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable, Optional, Sequence

from ..schedules import BACKWARD, FORWARD, WEIGHT_GRAD, Action, Schedule, build_schedule
from .play import PlayResult, play

_COMPUTE = (FORWARD, BACKWARD, WEIGHT_GRAD)


@dataclasses.dataclass
class SimResult:
    schedule: Schedule
    step_time: float             # pipeline makespan (s)
    ideal_time: float            # busiest rank's compute time
    bubble: float                # (step_time - ideal) / ideal
    peak_inflight: list          # per rank, chunk-microbatches alive
    peak_memory: list            # per rank bytes (static + activations at peak), if given
    play: Optional[PlayResult]   # None when extrapolated
    extrapolated_from: tuple = ()

    def chrome_trace(self, path: str) -> None:
        write_chrome_trace(self, path)

    def timeline_png(self, path: str, title: str = "") -> None:
        write_timeline_png(self, path, title)


def simulate(sched: Schedule, fwd_cost: Callable[[int], float], bwd_cost: Callable[[int], float],
             p2p_cost: Callable[[Action], float] = lambda a: 0.0,
             act_bytes: Optional[Callable[[int], float]] = None,
             static_bytes: Optional[Sequence[float]] = None, check: bool = False,
             eager_sends: bool = True,
             wgrad_cost: Optional[Callable[[int], float]] = None,
             blocking_sends: bool = True) -> SimResult:
    """Play ``sched`` with forward/backward cost per chunk and p2p cost per send.

    ``wgrad_cost`` (chunk -> seconds, part of ``bwd_cost``): play the runtime's split
    backward, whose weight gradients wait in a queue (``play.play``); None plays
    every backward whole (``split_backward=False``).

    ``eager_sends=False``: a transfer starts only once the receiver has posted its recv
    (rendezvous, what gloo's TCP transport and NCCL p2p do). ``blocking_sends``: the
    sender waits for its send to complete before moving on; the executor does not (it
    waits for its sends at the end of the step), so predictions of the runtime pass
    ``blocking_sends=False``.

    Peak memory per rank = static bytes + the largest sum over alive (chunk, microbatch)
    forwards of ``act_bytes(chunk)``."""
    def cc(a: Action) -> float:
        return fwd_cost(a.chunk) if a.kind == FORWARD else bwd_cost(a.chunk)

    res = play(sched, cc, p2p_cost, check=check, eager_sends=eager_sends,
               weight_grad_cost=wgrad_cost, blocking_sends=blocking_sends)
    busy = max(res.busy) if res.busy else 0.0
    mem = _peak_memory(sched, res, act_bytes, static_bytes)
    return SimResult(sched, res.makespan, busy, (res.makespan - busy) / busy if busy else 0.0,
                     res.peak_inflight, mem, res)


def _peak_memory(sched, res, act_bytes, static_bytes):
    if act_bytes is None:
        return []
    p = sched.p
    cur = [0.0] * p
    peak = [0.0] * p
    for ev in sorted(res.events, key=lambda e: (e.end, e.rank)):
        a = ev.actions[0]
        if a.kind == FORWARD:
            cur[ev.rank] += act_bytes(a.chunk)
            peak[ev.rank] = max(peak[ev.rank], cur[ev.rank])
        elif a.kind == BACKWARD:
            cur[ev.rank] -= act_bytes(a.chunk)
    st = list(static_bytes) if static_bytes is not None else [0.0] * p
    return [s + x for s, x in zip(st, peak)]


@functools.lru_cache(maxsize=32)
def cached_schedule(name: str, p: int, v: int, m: int) -> Schedule:
    return build_schedule(name, p, v, m)


def simulate_config(name: str, p: int, v: int, m: int, fwd_cost, bwd_cost, p2p_cost=lambda a: 0.0,
                    act_bytes=None, static_bytes=None, max_m: int = 0,
                    eager_sends: bool = True, wgrad_cost=None,
                    blocking_sends: bool = True) -> SimResult:
    """Simulate (name, p, v, m); when m > max_m (> 0) play two shorter pipelines of the same
    shape and extrapolate linearly in m — exact once the schedule has a periodic steady
    state (equal microbatches), and it keeps p=64, m=512 to milliseconds."""
    step = p if v > 1 else 1
    if max_m and m > max_m and m >= 3 * p:
        m1 = max(p, ((max_m // 2) // step) * step)
        m2 = m1 + p
        r1 = simulate(cached_schedule(name, p, v, m1), fwd_cost, bwd_cost, p2p_cost,
                      act_bytes, static_bytes, eager_sends=eager_sends, wgrad_cost=wgrad_cost,
                      blocking_sends=blocking_sends)
        r2 = simulate(cached_schedule(name, p, v, m2), fwd_cost, bwd_cost, p2p_cost,
                      act_bytes, static_bytes, eager_sends=eager_sends, wgrad_cost=wgrad_cost,
                      blocking_sends=blocking_sends)
        slope = (r2.step_time - r1.step_time) / (m2 - m1)
        busy_slope = (r2.ideal_time - r1.ideal_time) / (m2 - m1)
        T = r2.step_time + slope * (m - m2)
        busy = r2.ideal_time + busy_slope * (m - m2)
        return SimResult(r2.schedule, T, busy, (T - busy) / busy if busy else 0.0,
                         r2.peak_inflight, r2.peak_memory, None, (m1, m2))
    return simulate(cached_schedule(name, p, v, m), fwd_cost, bwd_cost, p2p_cost, act_bytes,
                    static_bytes, eager_sends=eager_sends, wgrad_cost=wgrad_cost,
                    blocking_sends=blocking_sends)


# --------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------
def trace_events(res: SimResult, time_unit: float = 1e6) -> list:
    if res.play is None:
        raise ValueError("this result was extrapolated; simulate with max_m=0 for a timeline")
    out = []
    for ev in res.play.events:
        a = ev.actions[0]
        if a.kind in _COMPUTE:
            name, cat = f"{a.kind}{a.chunk}.{a.mb}", "compute"
        else:
            if ev.end <= ev.start:
                continue
            name, cat = "p2p " + ",".join(x.kind.lower() for x in ev.actions), "p2p"
        out.append({"name": name, "cat": cat, "ph": "X", "pid": 0, "tid": ev.rank,
                    "ts": ev.start * time_unit, "dur": (ev.end - ev.start) * time_unit,
                    "args": {"chunk": a.chunk, "mb": a.mb}})
    return out


def write_chrome_trace(res: SimResult, path: str) -> None:
    meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
             "args": {"name": f"pp rank {r}"}} for r in range(res.schedule.p)]
    with open(path, "w") as f:
        json.dump({"traceEvents": meta + trace_events(res), "displayTimeUnit": "ms"}, f)


def write_timeline_png(res: SimResult, path: str, title: str = "") -> None:
    """Ranks as rows, forwards light and backwards dark, deferred weight gradients
    hatched, microbatch numbers in the boxes (the picture of Figure 4 in Narayanan et al.
    2021)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("timeline PNGs need matplotlib (pip install matplotlib)") from e
    if res.play is None:
        raise ValueError("this result was extrapolated; simulate with max_m=0 for a timeline")
    sched = res.schedule
    fig, ax = plt.subplots(figsize=(max(8, res.step_time / max(res.ideal_time, 1e-12) * 10),
                                    0.5 * sched.p + 1))
    cmap = plt.get_cmap("tab10")
    for ev in res.play.events:
        a = ev.actions[0]
        if a.kind not in _COMPUTE:
            continue
        j = a.chunk // sched.p
        color = cmap(j % 10)
        alpha = 0.45 if a.kind == FORWARD else 1.0
        ax.barh(sched.p - 1 - ev.rank, ev.end - ev.start, left=ev.start, height=0.8,
                color=color, alpha=alpha, edgecolor="black", linewidth=0.3,
                hatch="//" if a.kind == WEIGHT_GRAD else None)
        ax.text(ev.start + (ev.end - ev.start) / 2, sched.p - 1 - ev.rank, str(a.mb + 1),
                ha="center", va="center", fontsize=6)
    ax.set_yticks(range(sched.p))
    ax.set_yticklabels([f"Device {r + 1}" for r in reversed(range(sched.p))])
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"{sched.name} p={sched.p} v={sched.v} m={sched.m}  "
                 f"bubble={res.bubble:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["SimResult", "simulate", "simulate_config", "write_chrome_trace",
           "write_timeline_png", "trace_events"]

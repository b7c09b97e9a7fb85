"""What the compiler is doing, while it does it: one line per finished phase on rank 0.

A first compile is long (capture, passes, then Inductor on every distinct layer region of
every chunk); without a word a user takes it for a hang. ``build_program`` and the
regional compiler wrap their steps in ``phase(name)``:

    ptdp | capture 2.1 s
    ptdp | passes 0.4 s
    ptdp | compile chunk 0 · region 1/3 9.8 s (cache miss)
    ptdp | compile chunk 0 · region 2/3 0.3 s (cache hit)
    ptdp | compile chunk 0 12.6 s

On a terminal (and with rich installed) a spinner names the phase in progress; in a plain
log only the finished-phase lines appear. Lines go to stderr, so a benchmark's stdout
stays a table. Only rank 0 reports (ranks run the same phases; a failing rank is named by
the launcher). ``PTDP_PROGRESS=0`` turns it off.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

PREFIX = "ptdp | "
_stack: list = []      # names of the phases in progress, outermost first
_status = None         # the rich spinner while a phase runs on a terminal


def enabled() -> bool:
    if os.environ.get("PTDP_PROGRESS", "1").lower() in ("0", "false", "off", "no"):
        return False
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def _console():
    if not sys.stderr.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True)


def say(text: str) -> None:
    """One progress line (rank 0 only)."""
    if not enabled():
        return
    if _status is not None:
        _status.console.print(PREFIX + text, markup=False, highlight=False)
    else:
        print(PREFIX + text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(name: str):
    """Time the body and report ``name <seconds> s (note)`` when it ends; nested phases
    are named after their parents. The body may set ``info["note"]`` (e.g. "cache hit")."""
    global _status
    info: dict = {}
    if not enabled():
        yield info
        return
    _stack.append(name)
    label = " · ".join(_stack)
    started_spinner = False
    if _status is None:
        con = _console()
        if con is not None:
            _status = con.status(label + " …")
            _status.start()
            started_spinner = True
    else:
        _status.update(label + " …")
    t0 = time.perf_counter()
    failed = True
    try:
        yield info
        failed = False
    finally:
        dt = time.perf_counter() - t0
        note = f" ({info['note']})" if info.get("note") else ""
        say(f"{label} failed after {dt:.1f} s" if failed else f"{label} {dt:.1f} s{note}")
        _stack.pop()
        if started_spinner:
            _status.stop()
            _status = None
        elif _status is not None and _stack:
            _status.update(" · ".join(_stack) + " …")


def cache_counts() -> tuple:
    """(hits, misses) of Inductor's FX-graph and AOTAutograd caches so far in this process."""
    from torch._dynamo.utils import counters
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    misses = counters["inductor"]["fxgraph_cache_miss"] + \
        counters["aot_autograd"]["autograd_cache_miss"]
    return hits, misses


def cache_note(before: tuple) -> str:
    """"cache hit" / "cache miss" for the compiles since ``before = cache_counts()``;
    "" when no cache was consulted (aot_eager)."""
    hits, misses = (a - b for a, b in zip(cache_counts(), before))
    return "cache miss" if misses else "cache hit" if hits else ""

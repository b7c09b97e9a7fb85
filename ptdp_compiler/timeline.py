"""The last pipelined step as every rank ran it: Chrome-trace JSON, a picture in the style
of Narayanan et al. 2021 Fig. 4, and the measured bubble and activation memory in flight.

Events come from ``runtime/pipeline.PipelineRun`` (wall-clock start/end per compute step
and per communication group). Clocks of local ranks agree; across hosts they are only as
good as the hosts' clock sync, so ``bubble`` is computed per pipeline from its own ranks.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from .runtime.pipeline import WEIGHT_GRAD, event_detail, peak_inflight
from .schedules import BACKWARD, FORWARD


def collect(pm) -> dict:
    """Gather every rank's events of the last step (collective over the world)."""
    progs = list(pm._programs.values())
    events = getattr(progs[-1], "events", []) if progs else []
    co = pm.coords
    mine = {"rank": co.rank, "dp": co.dp_rank, "pp": co.pp_rank, "tp": co.tp_rank,
            "events": events}
    if dist.is_initialized():
        allr = [None] * dist.get_world_size()
        dist.all_gather_object(allr, mine)
    else:
        allr = [mine]
    c = pm.config
    pipe = sorted((r for r in allr if r["dp"] == 0 and r["tp"] == 0), key=lambda r: r["pp"])
    return {"ranks": allr, "pipeline": pipe, "p": c.pp, "v": c.virtual_stages,
            "m": c.microbatches, "schedule": c.schedule, **measure(pipe)}


def measure(pipe: list) -> dict:
    """Bubble fraction (idle / busy time, the paper's t_pb / t_id) and peak activations."""
    evs = [e for r in pipe for e in r["events"]]
    if not evs:
        return {"bubble": None, "bubble_per_rank": [], "peak_inflight": []}
    t0 = min(e[3] for e in evs)
    t1 = max(e[4] for e in evs)
    per_rank = []
    for r in pipe:
        busy = sum(e[4] - e[3] for e in r["events"]
                   if e[0] in (FORWARD, BACKWARD, WEIGHT_GRAD))
        per_rank.append((t1 - t0 - busy) / busy if busy else float("nan"))
    return {"bubble": sum(per_rank) / len(per_rank), "bubble_per_rank": per_rank,
            "peak_inflight": [peak_inflight(r["events"]) for r in pipe],
            "step_s": t1 - t0}


def chrome_trace(tl: dict) -> dict:
    t0 = min((e[3] for r in tl["ranks"] for e in r["events"]), default=0.0)
    out = []
    for r in tl["ranks"]:
        pid = r["rank"]
        out.append({"name": "process_name", "ph": "M", "pid": pid,
                    "args": {"name": f"rank {pid} (dp={r['dp']} pp={r['pp']} tp={r['tp']})"}})
        for kind, chunk, mb, s, e, detail in r["events"]:
            name = f"{kind}{chunk}.{mb}" if kind in (FORWARD, BACKWARD, WEIGHT_GRAD) \
                else "p2p"
            out.append({"name": name, "ph": "X", "pid": pid, "tid": 0 if name != "p2p" else 1,
                        "ts": (s - t0) * 1e6, "dur": max(e - s, 0.0) * 1e6,
                        "cat": kind, "args": {"chunk": chunk, "microbatch": mb,
                                              "detail": event_detail(detail)}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def draw(tl: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pipe = tl["pipeline"]
    t0 = min((e[3] for r in pipe for e in r["events"]), default=0.0)
    nc = tl["p"] * tl["v"]
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(pipe) + 1.2))
    for r in pipe:
        y = len(pipe) - 1 - r["pp"]
        for kind, chunk, mb, s, e, _ in r["events"]:
            if kind not in (FORWARD, BACKWARD, WEIGHT_GRAD):
                continue
            color = cmap(mb % 10)
            ax.broken_barh([((s - t0) * 1e3, (e - s) * 1e3)], (y + 0.1, 0.8),
                           facecolors=color, alpha=0.45 if kind == FORWARD else 0.95,
                           edgecolor="black", linewidth=0.3,
                           hatch="//" if kind == WEIGHT_GRAD else None)
            if nc > 1 and (e - s) * 1e3 > 0:
                ax.text((s + e - 2 * t0) * 5e2, y + 0.5, f"{mb}" + (f"/{chunk}" if tl["v"] > 1
                                                                   else ""),
                        ha="center", va="center", fontsize=6)
    ax.set_yticks([len(pipe) - 1 - r["pp"] + 0.5 for r in pipe])
    ax.set_yticklabels([f"stage {r['pp']}" for r in pipe])
    ax.set_xlabel("ms (light: forward, dark: backward, hatched: deferred weight gradients; label microbatch[/chunk]; colour per microbatch)")
    bub = tl.get("bubble")
    ax.set_title(f"{tl['schedule']} p={tl['p']} v={tl['v']} m={tl['m']}" +
                 (f" — measured bubble {bub:.3f}, formula (p-1)/(v·m) = "
                  f"{(tl['p'] - 1) / (tl['v'] * tl['m']):.3f}" if bub is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(tl: dict, path: str):
    """``path`` gets the Chrome trace (open in chrome://tracing or ui.perfetto.dev);
    the same name with .png gets the picture."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(chrome_trace(tl), f)
    draw(tl, os.path.splitext(path)[0] + ".png")

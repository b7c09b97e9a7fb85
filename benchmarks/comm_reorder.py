"""Does Inductor's compute/communication reordering help? (``comm_reorder=True``)

GPT at tp=2 with sequence parallelism on a 2-rank gloo world, compiled by Inductor twice
in the same ranks: reordering off and on (cold compiles, caches off, so every graph is
scheduled here and reported). Step time is measured alternating off/on steps, median of
each, and reported as the ratio off/on (> 1: reordering is faster). "What moved" comes
from ``ptdp.codegen.reorder_report``: per collective op, how many changed position, and
how many compute nodes sit between each collective and its wait before → after (the
compute that can hide it). Counts are per compiled graph: identical layers share one
compiled region, so a 4-layer model reports the embedding, one layer and the head.

Reordering only pays where a collective really runs while compute proceeds: async NCCL
on a GPU stream. On CPU with gloo each rank computes on one thread and the collective on
gloo's thread, sharing the machine's cores, so expect ≈ 1.0 here; the GPU numbers come
from running this file on a device (tp=2 needs two GPUs: NCCL gives each rank its own).

    python benchmarks/comm_reorder.py [--json out.json] [--widths 128,512] [--steps 20]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402
from examples.models.gpt import GPT, GPTConfig  # noqa: E402

MODES = ("off", "on")


def make(layers: int, width: int, seq: int, batch: int, device: str):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=seq, n_layer=layers, n_head=4,
                          n_embd=width)).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, seq), generator=g).to(device)
    y = torch.randint(0, 256, (batch, seq), generator=g).to(device)
    return model, x, y


def summarize(report: list) -> dict:
    """Counts over one compile's ``reorder_report`` entries."""
    rows = [(e["graph"], c) for e in report for c in e["collectives"]]
    short = {"forward": "fwd", "backward": "bwd"}
    moved = collections.Counter(f"{short[g]} {c['op']}" for g, c in rows if c["moved"])
    return {"collectives": len(rows),
            "moved": sum(moved.values()),
            "moved_ops": ", ".join(f"{k}×{v}" for k, v in sorted(moved.items())) or "none",
            "overlap_nodes_off": sum(c["overlap"][0] for _, c in rows),
            "overlap_nodes_on": sum(c["overlap"][1] for _, c in rows)}


def job(layers: int, width: int, seq: int, batch: int, steps: int) -> dict:
    """One rank: compile off and on, then alternate timed steps."""
    import torch._functorch.config as fconf
    import torch._inductor.config as iconf
    from ptdp_compiler.codegen import inductor_options
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pms, compile_s, reports, losses = {}, {}, {}, {}
    # cold compiles: a graph loaded from a cache is not re-scheduled, so not re-reported
    with iconf.patch(fx_graph_cache=False), fconf.patch(enable_autograd_cache=False):
        for mode in MODES:
            model, x, y = make(layers, width, seq, batch, device)
            before = len(inductor_options.reorder_report)
            pm = ptdp.parallelize(model, tp=2, sequence_parallel=True, codegen="inductor",
                                  comm_reorder=mode == "on")
            t0 = time.perf_counter()
            losses[mode] = pm.train_step(x, targets=y).item()
            compile_s[mode] = time.perf_counter() - t0
            pm.train_step(x, targets=y)   # warm-up
            reports[mode] = inductor_options.reorder_report[before:]
            pms[mode] = pm
    times = {m: [] for m in MODES}
    for _ in range(steps):
        for mode in MODES:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            pms[mode].train_step(x, targets=y)
            if device == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)
    assert not reports["off"], "reordering ran with comm_reorder=False"
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "step_ms_off": med["off"] * 1e3, "step_ms_on": med["on"] * 1e3,
            "compile_s_off": compile_s["off"], "compile_s_on": compile_s["on"],
            "loss_diff": abs(losses["on"] - losses["off"]), "report": reports["on"],
            **summarize(reports["on"])}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--widths", default="128,512")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    rows, device = [], "cpu"
    world = ptdp.LocalWorld(2, timeout_s=600)
    print(f"{'width':>6} {'off_ms':>9} {'on_ms':>9} {'off/on':>7} {'moved':>9} "
          f"{'overlap nodes':>14}  moved ops")
    try:
        for w in [int(v) for v in a.widths.split(",")]:
            r = world.run(job, a.layers, w, a.seq, a.batch, a.steps, timeout=1200)[0]
            device = r.pop("device")
            detail = r.pop("report")
            row = {"config": "tp2 sp", "layers": a.layers, "width": w, "seq": a.seq,
                   "batch": a.batch, **{k: round(v, 3) if isinstance(v, float) else v
                                        for k, v in r.items()},
                   "speedup_on": round(r["step_ms_off"] / r["step_ms_on"], 3),
                   "graphs": detail}
            rows.append(row)
            print(f"{w:>6} {r['step_ms_off']:>9.2f} {r['step_ms_on']:>9.2f} "
                  f"{row['speedup_on']:>7.3f} {r['moved']:>4}/{r['collectives']:<4} "
                  f"{r['overlap_nodes_off']:>6} → {r['overlap_nodes_on']:<5}  {r['moved_ops']}",
                  flush=True)
    finally:
        world.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "comm_reorder", "device": device,
                       "torch": torch.__version__, "rows": rows,
                       "command": "python benchmarks/comm_reorder.py --json "
                                  "benchmarks/results/comm_reorder.json"}, f, indent=1)


if __name__ == "__main__":
    main()

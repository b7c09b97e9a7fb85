"""Pipeline schedules measured: bubble vs (p−1)/(v·m), step time between schedules, and
p2p bytes with and without scatter/gather.

Part 1 runs ``examples/models/sleepy.py`` (every layer sleeps a fixed time in forward and
twice that in backward), so chunks cost the same and the numbers show the schedule, not
the shared CPU. For each (p, v, m) GPipe, 1F1B (v = 1) and interleaved 1F1B (v > 1) train
the same model; the bubble is idle / busy time per stage from the executor's recorded
events (the least-disturbed of a few steps), and step time is reported as a ratio to
1F1B / interleaved's in the same run.

Part 2 trains the project GPT at tp=2, pp=2 and counts the bytes each rank sends through
pipeline p2p per step, with scatter/gather (each tp rank sends 1/t of a boundary tensor
and the receiver all-gathers it over tp) and without.

    python benchmarks/pipeline.py [--json PATH] [--png DIR] [--ms 40]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402

CONFIGS = [(2, 1, 8), (4, 1, 8), (4, 2, 8), (4, 1, 16), (4, 2, 16)]


def sleepy_job(schedule, p, v, m, layers, ms, png):
    from examples.models.sleepy import SleepyStack
    torch.manual_seed(0)
    pm = ptdp.parallelize(SleepyStack(layers, ms), pp=p, virtual_stages=v, microbatches=m,
                          schedule=schedule, codegen="aot_eager")
    ids = torch.randint(0, 8, (m, 5), generator=torch.Generator().manual_seed(0))
    pm.train_step(ids[:, :-1], targets=ids[:, 1:])          # compile + warm-up
    best = None
    for _ in range(3):
        pm.train_step(ids[:, :-1], targets=ids[:, 1:])
        tl = pm.timeline()
        if best is None or tl["bubble"] < best["bubble"]:
            best = tl
    if png and pm.coords.rank == 0:
        from ptdp_compiler.timeline import write
        write(best, os.path.join(png, f"timeline_{schedule}_p{p}_v{v}_m{m}.json"))  # + .png
    return {"bubble": best["bubble"], "step_s": best["step_s"],
            "peak_inflight": best["peak_inflight"]}


def bytes_job(scatter_gather):
    from examples.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64))
    pm = ptdp.parallelize(model, tp=2, pp=2, microbatches=4, codegen="aot_eager",
                          scatter_gather=scatter_gather)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (8, 64), generator=g)
    pm.train_step(ids, targets=ids.roll(-1, 1))
    prog = list(pm._programs.values())[0]
    prog.comm.bytes_sent = 0
    loss = pm.train_step(ids, targets=ids.roll(-1, 1))
    return prog.comm.bytes_sent, float(loss)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="directory for the timeline pictures")
    ap.add_argument("--ms", type=float, default=40.0, help="forward sleep per stage and "
                    "microbatch (split over the stage's v chunks)")
    a = ap.parse_args(argv)
    if a.png:
        os.makedirs(a.png, exist_ok=True)
    rows = []
    worlds = {}
    try:
        for p, v, m in CONFIGS:
            w = worlds.get(p) or worlds.setdefault(p, ptdp.LocalWorld(p))
            layers = p * v
            per_layer = a.ms / v     # the same work per stage whatever v is
            group = []
            for schedule in ("gpipe", "interleaved" if v > 1 else "1f1b"):
                r = w.run(sleepy_job, schedule, p, v, m, layers, per_layer, a.png,
                          timeout=900)[0]
                group.append({"schedule": schedule, "p": p, "v": v, "m": m,
                              "bubble_measured": round(r["bubble"], 4),
                              "bubble_formula": round((p - 1) / (v * m), 4),
                              "step_s": round(r["step_s"], 4),
                              "peak_inflight_stage0": r["peak_inflight"][0],
                              "p2p_bytes": None, "scatter_gather": None})
            base = group[-1]["step_s"]
            for row in group:
                row["step_ratio_vs_1f1b"] = round(row["step_s"] / base, 3)
            rows += group
        w = worlds.get(4) or worlds.setdefault(4, ptdp.LocalWorld(4))
        for sg in (False, True):
            res = w.run(bytes_job, sg, timeout=900)
            rows.append({"schedule": "1f1b", "p": 2, "v": 1, "m": 4, "tp": 2,
                         "bubble_measured": None, "bubble_formula": None, "step_s": None,
                         "p2p_bytes": int(res[0][0]), "scatter_gather": sg,
                         "loss": res[0][1]})
    finally:
        for w in worlds.values():
            w.close()
    print(f"{'schedule':>12} {'p':>2} {'v':>2} {'m':>3} {'bubble':>8} {'formula':>8} "
          f"{'step s':>7} {'ratio':>6} {'peak mb st0':>11}")
    for r in rows:
        if r["bubble_measured"] is None:
            continue
        print(f"{r['schedule']:>12} {r['p']:>2} {r['v']:>2} {r['m']:>3} "
              f"{r['bubble_measured']:>8.3f} {r['bubble_formula']:>8.3f} {r['step_s']:>7.3f} "
              f"{r['step_ratio_vs_1f1b']:>6.2f} {r['peak_inflight_stage0']:>11}")
    sg = [r for r in rows if r["p2p_bytes"] is not None]
    print("\np2p bytes per step and rank, GPT h=64 s=64 b=2/microbatch, tp=2 pp=2 m=4 (fp32):")
    for r in sg:
        print(f"  scatter/gather {'on ' if r['scatter_gather'] else 'off'}: "
              f"{r['p2p_bytes']:>9} bytes (loss {r['loss']:.6f})")
    if len(sg) == 2:
        print(f"  ratio on/off = {sg[1]['p2p_bytes'] / sg[0]['p2p_bytes']:.3f} (1/t = 0.5)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "pipeline", "device": "cpu (gloo)",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

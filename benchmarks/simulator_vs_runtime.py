"""The planner's schedule simulator against the pipeline runtime on this machine.

For each (model, p, v, m) two schedules train the same model in the same world
(schedule_a = 1F1B with one chunk per rank, schedule_b = interleaved 1F1B with v chunks
per rank, or GPipe vs 1F1B): the *measured* ratio is the median step time of a over b
(the schedule's makespan from the executor's recorded events, steps of a and b
alternated so a busy neighbour slows both alike); the *predicted* ratio comes from the
planner alone — the runtime's chunk cuts over the captured graph, each chunk costed by
the cost model with this machine's calibration (GEMM FLOP/s, elementwise rate, op
overhead, opaque custom ops timed on their shapes, gloo p2p α–β measured between the
ranks), played through the runtime's action lists by the simulator. No step time of the
run being predicted enters the prediction.

Models: the project GPT (real compute; p = 2 only — this machine has 2 cores, so more
ranks would time-share them) and examples/models/sleepy.py (layers that sleep: exact
chunk costs and no CPU contention, so p = 4 is meaningful too).

    python benchmarks/simulator_vs_runtime.py [--json PATH] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402

GPT = dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256)
GPT_MICROBATCH = 2
SLEEPY_LAYERS, SLEEPY_MS = 8, 6.0
# (model, p, v, m, schedule_a, schedule_b)
PAIRS = [
    ("gpt", 2, 2, 2, "1f1b", "interleaved"),
    ("gpt", 2, 2, 4, "1f1b", "interleaved"),
    ("gpt", 2, 2, 8, "1f1b", "interleaved"),
    ("gpt", 2, 1, 4, "gpipe", "1f1b"),
    ("sleepy", 2, 2, 4, "1f1b", "interleaved"),
    ("sleepy", 2, 4, 4, "1f1b", "interleaved"),
    ("sleepy", 4, 2, 4, "1f1b", "interleaved"),
    ("sleepy", 4, 2, 8, "1f1b", "interleaved"),
]
QUICK = [r for r in PAIRS if r[0] == "sleepy" and r[1] == 2]


def build_model(name: str):
    torch.manual_seed(0)
    if name == "gpt":
        from examples.models.gpt import GPT as Model, GPTConfig
        return Model(GPTConfig(**GPT))
    from examples.models.sleepy import SleepyStack
    return SleepyStack(SLEEPY_LAYERS, SLEEPY_MS)


def microbatch(name: str, m: int = 1):
    """(ids, targets) of m microbatches."""
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        ids = torch.randint(0, GPT["vocab_size"], (m * GPT_MICROBATCH, GPT["block_size"] + 1),
                            generator=g)
    else:
        ids = torch.randint(0, 8, (m * 2, 5), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


# --------------------------------------------------------------------------------------------
# prediction: planner only
# --------------------------------------------------------------------------------------------
def predict(name: str, cluster, configs: list, overheads) -> dict:
    """{(schedule, p, v, m): predicted makespan (s)} from the captured graph of one
    microbatch, the calibrated cluster and the simulator."""
    from ptdp_compiler.calibrate import time_opaque_ops
    from ptdp_compiler.config import ParallelConfig
    from ptdp_compiler.program import build_program
    from ptdp_compiler.planner.cost_model import CostOptions
    from ptdp_compiler.planner.predict import chunk_costs, predict_pipeline
    ids, tgt = microbatch(name)
    cap = build_program(build_model(name), ParallelConfig(), ((ids,), {"targets": tgt}, None),
                        until="capture")
    measured = time_opaque_ops(cap.gm)
    opts = CostOptions(attention="flash")   # CPU SDPA is a fused kernel
    out = {}
    for sched, p, v, m in configs:
        cc = chunk_costs(cap.gm, p * v, cluster, opts, measured)
        out[(sched, p, v, m)] = predict_pipeline(cc, cluster, sched, p, v, m, overheads).step_time
    return out


def calibrate_in_world(threads: int):
    """Rank 0 measures the device while the others wait (no contention); ranks 0 and 1
    measure the p2p link as the executor uses it. Returns the Cluster on every rank."""
    import torch.distributed as dist
    from ptdp_compiler.calibrate import device_spec, measure_p2p
    from ptdp_compiler.planner.cluster import Cluster
    link = measure_p2p(0, 1)
    gpu = device_spec(threads) if dist.get_rank() == 0 else None
    obj = [(gpu, link)]
    dist.broadcast_object_list(obj, src=0)
    gpu, link = obj[0]
    return Cluster(nodes=1, gpus_per_node=dist.get_world_size(), gpu=gpu, intra=link,
                   inter=link, name="this machine (calibrated)")


# --------------------------------------------------------------------------------------------
# measurement: the runtime
# --------------------------------------------------------------------------------------------
def pair_job(name: str, p: int, v: int, m: int, sched_a: str, sched_b: str, steps: int,
             threads: int = 1):
    """Calibrate, predict (rank 0), then train with both schedules, steps alternated.
    Returns (prediction, measured median makespans, calibration summary) on rank 0."""
    import torch.distributed as dist
    from ptdp_compiler.planner.predict import Overheads
    torch.set_num_threads(threads)
    cluster = calibrate_in_world(threads)
    cfgs = [(sched_a, p, v if sched_a == "interleaved" else 1, m),
            (sched_b, p, v if sched_b == "interleaved" else 1, m)]
    from ptdp_compiler.calibrate import measure_executor_overhead
    overheads = Overheads(*measure_executor_overhead(p))
    pred = None
    if dist.get_rank() == 0:
        pred = predict(name, cluster, cfgs, overheads)
    dist.barrier()
    pms = [ptdp.parallelize(build_model(name), pp=pp, virtual_stages=vv, microbatches=mm,
                            schedule=s, codegen="aot_eager") for s, pp, vv, mm in cfgs]
    ids, tgt = microbatch(name, m)
    for pm in pms:   # compile and warm up
        pm.train_step(ids, targets=tgt)
        pm.train_step(ids, targets=tgt)
    times = [[], []]
    for _ in range(steps):
        for i, pm in enumerate(pms):
            pm.train_step(ids, targets=tgt)
            times[i].append(pm.timeline()["step_s"])
    if dist.get_rank() != 0:
        return None
    meas = [statistics.median(t) for t in times]
    gpu, link = cluster.gpu, cluster.intra
    cal = {"gflops": gpu.peak_flops / 1e9, "op_overhead_us": gpu.kernel_overhead * 1e6,
           "call_overhead_us": [overheads.forward_s * 1e6, overheads.backward_s * 1e6],
           "p2p_alpha_us": link.latency * 1e6, "p2p_GBps": link.bandwidth / 1e9}
    return [pred[c] for c in cfgs], meas, cal, times


def run_pairs(run_world, pairs, steps: int = 5, log=print) -> list:
    """One row per pair; ``run_world(n, fn, *args, timeout=...)`` runs fn on n ranks."""
    rows = []
    for name, p, v, m, a, b in pairs:
        t0 = time.time()
        res = run_world(p, pair_job, name, p, v, m, a, b, steps, timeout=300)[0]
        (pa, pb), (ma, mb), cal, _ = res
        pr, mr = pa / pb, ma / mb
        row = {"model": name, "p": p, "v": v, "m": m, "schedule_a": a, "schedule_b": b,
               "predicted_ratio": pr, "measured_ratio": mr, "error": pr / mr - 1,
               "predicted_step_s_a": pa, "predicted_step_s_b": pb,
               "measured_step_s_a": ma, "measured_step_s_b": mb, "calibration": cal}
        rows.append(row)
        log(f"{name:6s} p={p} v={v} m={m:2d} {a:>11s}/{b:<11s} predicted {pr:5.3f} measured "
            f"{mr:5.3f} error {row['error']:+6.1%}   steps a {ma * 1e3:7.1f} ms (pred "
            f"{pa * 1e3:7.1f})  b {mb * 1e3:7.1f} ms (pred {pb * 1e3:7.1f})   "
            f"[{time.time() - t0:.0f} s]")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="only the sleepy p=2 pairs")
    ap.add_argument("--steps", type=int, default=9)
    a = ap.parse_args(argv)
    worlds: dict = {}

    def run_world(n, fn, *args, timeout=300):
        if n not in worlds:
            worlds[n] = ptdp.LocalWorld(n)
        return worlds[n].run(fn, *args, timeout=timeout)
    try:
        rows = run_pairs(run_world, QUICK if a.quick else PAIRS, a.steps)
    finally:
        for w in worlds.values():
            w.close()
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.1%} over {len(rows)} pairs (acceptance: <= 20%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "simulator_vs_runtime", "device": f"cpu ({os.cpu_count()} "
                       "cores, shared)", "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""ptdp_compiler against PyTorch's own tensor-parallel and pipelining stack, eager and
compiled, same run.

For the project's GPT (examples/models/gpt.py) and Hugging Face Llama (GQA), at
(tp=2), (tp=2, SP), (pp=2, 1F1B), (pp=2, v=2 interleaved) and (tp=2, pp=2), three
programs train the same model from the same seed on the same inputs with the same
number of microbatches, on the same gloo CPU ranks, in interleaved rounds (each round
steps all three, the order rotating) so that machine noise hits them alike:

- ptdp: ``ptdp.parallelize(model, tp=..., pp=..., ...)`` on the unmodified model.
- native eager: what PyTorch's documentation shows — DTensor ``parallelize_module`` with
  ColwiseParallel / RowwiseParallel / SequenceParallel / PrepareModuleInput plans and
  ``loss_parallel``, and ``torch.distributed.pipelining`` (manual ``PipelineStage``
  split, Schedule1F1B / ScheduleInterleaved1F1B). The model edits the native stack
  needs live in ``native_model_edits`` below and are counted (changed source lines).
- native compiled: the same, plus torchtitan's compile recipe — after the TP plan, each
  transformer block wrapped in its own ``torch.compile(block, fullgraph=True)``
  (Inductor), embeddings / head / loss left eager. Its loss must equal the eager
  native loss (printed as a sanity check, ``compiled_loss_diff``).

A step is forward + backward of one global batch (no optimizer: every side would run
the same torch.optim code). Reported per configuration: median seconds per step after
warm-up (the slowest rank's time) per side, ``ratio_eager`` = native eager / ptdp and
``ratio_compiled`` = native compiled / ptdp (> 1: ptdp faster), bytes sent per step
summed over ranks, read from the torch profiler's c10d / gloo events of one more step per
side (``benchmarks/pg_traffic.py``: ``*_bytes`` counts each collective as NCCL's ring
would send it, ``*_gloo_bytes`` what gloo sent — a reduce-scatter runs as a full-size
all-reduce there), the loss differences, and — where ptdp is slower — the top ops of
one profiled step per side.

    python benchmarks/vs_torch_native.py [--models gpt,llama] [--configs tp2,pp2_1f1b]
        [--steps 5] [--repeats 3] [--size hidden,seq,batch,layers]
        [--codegen inductor|aot_eager] [--json PATH]

A ptdp configuration this version refuses (ConfigError) is reported as "pending".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import ptdp_compiler as ptdp  # noqa: E402
from benchmarks.pg_traffic import ProcessGroupTraffic  # noqa: E402

from benchmarks import vs_native_setup as S  # noqa: E402
from benchmarks.vs_native_setup import (CONFIGS, DEFAULT_SIZE, SIZE_ENV,  # noqa: E402
                                        build_model, make_batch, ptdp_inputs)
from benchmarks.native_side import NativeRunner, native_model_edits  # noqa: E402

# ---- byte counting, identical for every side ----------------------------------------------
def _group_size(kw: dict) -> int:
    """The size of every process group a layout uses (the profiler's events do not say
    which group an op ran on, so the configurations keep them all one size)."""
    sizes = {kw.get("tp", 1), kw.get("pp", 1)} - {1}
    if len(sizes) > 1:
        raise ValueError(f"{kw}: groups of different sizes; bytes per op need one group size")
    return sizes.pop() if sizes else 1


# ---- one configuration, run on every rank -----------------------------------------------
def _timed(fn):
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dt = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)      # the step takes as long as its slowest rank
    return out, dt.item()


def _top_ops(fn, k=6) -> list:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    evs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in evs) or 1
    return [f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in evs[:k]]


SIDES = ("ptdp", "native_eager", "native_compiled")


def job(model_name: str, cfg_name: str, steps: int, warmup: int, codegen: str) -> dict:
    """Three programs of one model and layout on this rank — ptdp, the native stack in eager
    and the native stack with torchtitan's per-block ``torch.compile`` — stepped in
    interleaved rounds (the order rotates each round) so machine noise hits all three."""
    kw = CONFIGS[cfg_name]
    ids, tgt = make_batch(model_name)
    row = {"model": model_name, "config": cfg_name}
    try:
        pm = ptdp.parallelize(build_model(model_name), codegen=codegen, **kw)
    except ptdp.ConfigError as e:
        pm, row["ptdp_pending"] = None, str(e)
    eager = NativeRunner(model_name, kw)
    compiled = NativeRunner(model_name, kw, compiled=True)
    p_args, p_kwargs = ptdp_inputs(model_name, ids, tgt)
    fns = {"native_eager": lambda: eager.step(ids, tgt),
           "native_compiled": lambda: compiled.step(ids, tgt)}
    if pm is not None:
        fns["ptdp"] = lambda: pm.train_step(*p_args, **p_kwargs).item()
    sides = [s for s in SIDES if s in fns]
    times = {s: [] for s in sides}
    losses = dict.fromkeys(SIDES)
    for i in range(warmup + steps):      # interleaved rounds; the first ones compile
        k = i % len(sides)
        for side in sides[k:] + sides[:k]:
            losses[side], dt = _timed(fns[side])
            if i >= warmup:
                times[side].append(dt)
    for side in SIDES:
        row[f"{side}_s"] = statistics.median(times[side]) if side in times else None
        row[f"{side}_loss"] = losses[side]
        if side not in fns:
            row[f"{side}_bytes"] = row[f"{side}_gloo_bytes"] = None
            row[f"{side}_ops"] = {}
            continue
        with ProcessGroupTraffic(_group_size(kw)) as traffic:   # one more step, profiled
            fns[side]()
        row[f"{side}_bytes"] = traffic.total("nccl_bytes")
        row[f"{side}_gloo_bytes"] = traffic.total("gloo_bytes")
        row[f"{side}_ops"] = traffic.totals("nccl_bytes", by=("kind",))
    for side in ("native_eager", "native_compiled"):   # profile where ptdp is the slower one
        if pm is None or row["ptdp_s"] <= row[f"{side}_s"]:
            continue
        for who in ("ptdp", side):
            if who == "ptdp" and "ptdp_top_ops" in row:
                continue
            if dist.get_rank() == 0:
                row[f"{who}_top_ops"] = _top_ops(fns[who])
            else:
                fns[who]()
    return row


def _merge(rank_rows: list) -> dict:
    """Rank 0's timings; bytes summed over ranks; the loss from a rank that has it."""
    row = dict(rank_rows[0])
    for side in SIDES:
        if row.get(f"{side}_bytes") is not None:
            for k in ("bytes", "gloo_bytes"):
                row[f"{side}_{k}"] = int(sum(r[f"{side}_{k}"] for r in rank_rows))
            ops = {}
            for r in rank_rows:
                for k, v in r[f"{side}_ops"].items():
                    ops[k] = ops.get(k, 0) + v
            row[f"{side}_ops"] = {k: int(v) for k, v in sorted(ops.items())}
        row[f"{side}_loss"] = next((r[f"{side}_loss"] for r in rank_rows
                                    if r[f"{side}_loss"] is not None), None)
    return row


def _diff(a, b):
    return abs(a - b) if a is not None and b is not None else None


def run(models, configs, steps=5, warmup=2, codegen="aot_eager", timeout=900,
        repeats=1) -> list:
    """One row per (config, model): each repeat is a fresh set of three programs measured in
    the same world; the row keeps the repeat with the median ratio against the compiled
    native side and lists every repeat's ratios."""
    rows = []
    for cfg_name in configs:
        kw = CONFIGS[cfg_name]
        world = kw.get("tp", 1) * kw.get("pp", 1)
        with ptdp.LocalWorld(world) as w:
            for model_name in models:
                runs = []
                for _ in range(repeats):
                    try:
                        runs.append(_merge(w.run(job, model_name, cfg_name, steps, warmup,
                                                 codegen, timeout=timeout)))
                    except ptdp.RankError as e:
                        runs = [{"model": model_name, "config": cfg_name,
                                 "error": str(e)[:400]}]
                        break
                if "error" in runs[0]:
                    rows.append(runs[0])
                    print(f"[{time.strftime('%H:%M:%S')}] {model_name} {cfg_name}: error "
                          f"{runs[0]['error'][:300]}", file=sys.stderr, flush=True)
                    continue
                for row in runs:
                    for side in ("eager", "compiled"):
                        row[f"ratio_{side}"] = (row[f"native_{side}_s"] / row["ptdp_s"]) \
                            if row.get("ptdp_s") else None
                row = sorted(runs, key=lambda r: r["ratio_compiled"] or 0.0)[len(runs) // 2]
                for side in ("eager", "compiled"):
                    row[f"ratio_{side}_runs"] = " / ".join(
                        f"{r[f'ratio_{side}']:.2f}" for r in runs if r[f"ratio_{side}"] is not None)
                row["loss_diff"] = _diff(row["ptdp_loss"], row["native_eager_loss"])
                # the sanity check of the compiled native side: its loss is the eager one's
                row["compiled_loss_diff"] = _diff(row["native_compiled_loss"],
                                                  row["native_eager_loss"])
                row["status"] = "pending" if "ptdp_pending" in row else "measured"
                row["native_model_lines"] = native_model_edits(model_name, kw)
                row["ptdp_model_lines"] = 0
                row["ptdp_codegen"] = codegen
                rows.append(row)
                print(f"[{time.strftime('%H:%M:%S')}] {model_name} {cfg_name}: ratio_eager "
                      f"{_fmt(row['ratio_eager'], '.2f')}, ratio_compiled "
                      f"{_fmt(row['ratio_compiled'], '.2f')}", file=sys.stderr, flush=True)
    return rows


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else str(x if x is not None else "-")


def print_table(rows):
    print(f"{'model':6} {'config':19} {'ptdp s':>8} {'eager s':>8} {'comp. s':>8} "
          f"{'r eager':>7} {'r comp.':>7} {'ptdp KB':>9} {'native KB':>9} {'loss diff':>9} "
          f"{'comp diff':>9} {'lines n/p':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['config']:19} error: {r['error'][:200]}")
            continue
        kb = lambda b: b / 1024 if b is not None else None  # noqa: E731
        print(f"{r['model']:6} {r['config']:19} {_fmt(r['ptdp_s'], '8.4f'):>8} "
              f"{_fmt(r['native_eager_s'], '8.4f'):>8} {_fmt(r['native_compiled_s'], '8.4f'):>8} "
              f"{_fmt(r['ratio_eager'], '7.2f'):>7} {_fmt(r['ratio_compiled'], '7.2f'):>7} "
              f"{_fmt(kb(r['ptdp_bytes']), '9.1f'):>9} "
              f"{_fmt(kb(r['native_eager_bytes']), '9.1f'):>9} "
              f"{_fmt(r['loss_diff'], '9.2e'):>9} {_fmt(r['compiled_loss_diff'], '9.2e'):>9} "
              f"{r['native_model_lines']:>5}/{r['ptdp_model_lines']}"
              + ("  (ptdp pending)" if r["status"] == "pending" else ""))
    for r in rows:
        if "error" in r:
            continue
        ok = r["compiled_loss_diff"] is not None and r["compiled_loss_diff"] <= 1e-4
        print(f"sanity {r['model']} {r['config']}: native compiled loss "
              f"{_fmt(r['native_compiled_loss'], '.6f')} vs native eager "
              f"{_fmt(r['native_eager_loss'], '.6f')} vs ptdp {_fmt(r['ptdp_loss'], '.6f')}: "
              + ("ok" if ok else "MISMATCH"))
    for r in rows:
        if r.get("ptdp_top_ops"):
            print(f"\n{r['model']} {r['config']}: ptdp slower; one profiled step (rank 0, self CPU)")
            for who in SIDES:
                if r.get(f"{who}_top_ops"):
                    print(f"  {who}: " + "; ".join(r[f"{who}_top_ops"]))


NOTE = ("ptdp: parallelize(codegen={codegen}) of the unmodified model (tp2_sp with "
        "sp_regather=False: it keeps the all-gathered linear inputs for backward, as the native "
        "DTensor plan does, instead of Megatron's re-gather; pp rows with ptdp's default "
        "split_backward=True: each chunk sends its input gradient before computing weight "
        "gradients, which fill the schedule's waits — the native schedules compute the whole "
        "backward before sending); native eager: DTensor "
        "parallelize_module (+ SequenceParallel, loss_parallel) and torch.distributed.pipelining "
        "(static-shape PipelineStage, Schedule1F1B / ScheduleInterleaved1F1B); native compiled: "
        "the same with torchtitan's recipe, torch.compile(block, fullgraph=True) (Inductor) of "
        "each transformer block after the TP plan. GPT {layers} layers "
        "h={hidden} s={seq} batch {batch}, Llama the same with GQA 4/2 heads, vocab {vocab}; "
        "microbatches 4 with pp; step = forward+backward with every gradient final (native: "
        "Partial DTensor gradients redistributed, tied embedding summed over pp; all return the "
        "loss on every rank), median of {steps} interleaved rounds after {warmup} warm-up, "
        "slowest rank; ratio_eager = native_eager_s / ptdp_s, ratio_compiled = "
        "native_compiled_s / ptdp_s (> 1: ptdp faster); the row is the repeat with the median "
        "ratio_compiled of {repeats} (ratio_*_runs list all); compiled_loss_diff = |native "
        "compiled loss − native eager loss|; bytes = sent per step summed over ranks, from the "
        "profiler's c10d/gloo events (*_bytes: as NCCL's ring would send them; *_gloo_bytes: "
        "what gloo sent); *_model_lines = model source lines the side needed changed.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,llama")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--codegen", default="inductor", choices=("aot_eager", "inductor"),
                    help="ptdp's code generator (its default: inductor)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh program pairs per row; the row reports the median ratio")
    ap.add_argument("--size", default=None, help='"hidden,seq,batch,layers" '
                    f"(default {DEFAULT_SIZE}; also the {SIZE_ENV} environment variable)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.size:   # the rank processes read the size from the environment when they import us
        os.environ[SIZE_ENV] = a.size
        S.HIDDEN, S.SEQ, S.BATCH, S.LAYERS = (int(x) for x in a.size.split(","))
    load_before = os.getloadavg()[0]
    rows = run(a.models.split(","), a.configs.split(","), a.steps, a.warmup, a.codegen,
               repeats=a.repeats)
    load_after = os.getloadavg()[0]
    print_table(rows)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"benchmark": "vs_torch_native", "device": "cpu (gloo)",
                       "torch": torch.__version__,
                       "command": "python benchmarks/vs_torch_native.py " + " ".join(
                           sys.argv[1:] if argv is None else argv),
                       # the machine's 1-minute load average before / after the run
                       # (other jobs on the same cores make the ratios noisier)
                       "load_average": [round(load_before, 1), round(load_after, 1)],
                       "cpus": os.cpu_count(),
                       "size": {"hidden": S.HIDDEN, "seq": S.SEQ, "batch": S.BATCH,
                                "layers": S.LAYERS, "vocab": S.VOCAB},
                       "note": NOTE.format(codegen=a.codegen, steps=a.steps, warmup=a.warmup,
                                           repeats=a.repeats, layers=S.LAYERS, hidden=S.HIDDEN,
                                           seq=S.SEQ, batch=S.BATCH, vocab=S.VOCAB),
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""ptdp's dp_shard (FSDP in the compiled graph) against PyTorch's own FSDP2
(``torch.distributed.fsdp.fully_shard``), eager and compiled, in one run.

The project's GPT (examples/models/gpt.py: tied embedding / LM head, no dropout), fp32,
the same seed and the same global batch, on the same gloo CPU ranks (world = dp_shard = 2,
then 4). Four programs per world, stepped in interleaved rounds (each round steps all of
them, the order rotating) so that the shared machine's noise hits them alike:

- ``ptdp_inductor`` / ``ptdp_aot_eager``: ``ptdp.parallelize(model, dp_shard=n,
  codegen=...)`` (defaults: reshard_after_forward=True, next bucket prefetched), AdamW
  through ``pm.optimizer`` / ``pm.step()``;
- ``fsdp2_eager``: torchtitan's recipe — ``fully_shard`` on every transformer block
  (reshard_after_forward for every block but the last), then on the root (which FSDP2
  never reshards after forward); ``torch.optim.AdamW`` over the DTensor parameters;
- ``fsdp2_compiled``: the same with torchtitan's compile recipe applied first — each
  transformer block replaced by ``torch.compile(block, fullgraph=True)`` (Inductor), the
  embeddings, final norm, head and loss left eager, FSDP2's hooks eager around the blocks.

A step is zero grad + forward + loss + backward + AdamW step of this rank's slice
(global batch / n). Columns:

- ``step_ms``: median step time after warm-up, the slowest rank's (barrier, then
  all-reduce max); ``vs_fsdp2_eager`` / ``vs_fsdp2_compiled`` = that FSDP2 variant's step
  time / this one's (> 1: faster than FSDP2), same run;
  ``*_min``: the same ratios of the fastest step of each (the least disturbed by other
  jobs), ``*_cpu``: of the median process CPU time per step (slowest rank; the work a
  step does, less sensitive to the machine's load than wall time);
- ``peak_bytes``: peak bytes a rank held during a step (median of 3 steps, max over
  ranks), measured the same way from outside for every variant: a malloc interposer
  (``MEMCOUNT_C`` below, compiled with cc and preloaded: the script re-executes itself
  with LD_PRELOAD) counts the bytes in use over every thread — tensors, Inductor's
  buffers (which a TorchDispatchMode such as benchmarks/memory_model.py's
  AllocationTracker does not see), gloo's buffers; peak = the variant's training state at
  the step's start (storages of its parameters, the gradients it keeps between steps,
  optimizer state) + the largest rise of the bytes in use during the step.
  ``peak_fwd_bwd_bytes`` / ``peak_opt_bytes``: the same over forward + backward only /
  the optimizer step only (AdamW's foreach temporaries are a few shard-sized tensors);
  ``peak_vs_fsdp2`` = peak / fsdp2_eager's (< 1: less memory). The torch profiler's
  memory events were tried first: frees on gloo's work threads (a collective's buffers,
  dropped when the work completes) are not reported, so the live total drifted;
- ``state_bytes``: parameters + gradients + optimizer state per rank (storages, padding
  included), taken after the backward of the measured step (ptdp's gradients exist only
  then), ``state_share`` = that / the whole model's (P + P + 2P for AdamW, fp32): ≈
  1/n; ``act_peak_bytes`` = peak − state: the step's transient memory (gathered weights,
  activations, gradients in flight);
- ``ag_fwd_bytes`` / ``ag_bwd_bytes`` / ``rs_bytes``: bytes one rank sent per step by
  all-gathers in forward / backward and by reduce-scatters, read from the profiler's c10d /
  gloo events of one more step (benchmarks/pg_traffic.py; NCCL ring bytes, mean over
  ranks; gloo runs a reduce-scatter as a full-size all-reduce: ``gloo_bytes`` is what gloo
  sent); ``formula_bytes`` = (n−1)/n·P·(2 all-gathers + 1 reduce-scatter) per microbatch
  (P = the model's parameter bytes, the tied embedding / head counted once); ``bytes_ratio``
  = (ag + rs bytes) / formula. FSDP2 re-gathers in backward neither the root (embeddings,
  head) nor, under torchtitan's policy, the last block, so it sends less than the formula;
  ptdp gathers and reduce-scatters the tied embedding / head once (in the embedding's
  bucket, the full weight serving the head too), and re-gathers in backward only the
  buckets whose backward reads a weight;
- ``loss_diff``: the largest |loss − fsdp2_eager's loss| over every step run (same model,
  data and optimizer: ≈ 0).

    python benchmarks/fsdp.py [--worlds 2,4] [--steps 12] [--warmup 3] [--quick]
        [--variants ptdp_inductor,fsdp2_eager,...] [--json benchmarks/results/fsdp.json]

About 2.5 minutes on 2 shared cores with a warm Inductor cache; a cold cache adds ~2
minutes per world (ptdp compiles the whole graph: regional compilation is off for graphs
with functional collectives). ``--quick``: a tiny model at world 2, about 1 minute.
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

import ptdp_compiler as ptdp  # noqa: E402

VARIANTS = ("ptdp_inductor", "ptdp_aot_eager", "fsdp2_eager", "fsdp2_compiled")
DEFAULT = dict(layers=4, hidden=256, heads=4, vocab=1024, seq=128, batch=8)
QUICK = dict(layers=2, hidden=64, heads=4, vocab=256, seq=32, batch=4)
LR = 1e-3


def _gpt(a):
    from examples.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=a.vocab, block_size=a.seq, n_layer=a.layers,
                         n_head=a.heads, n_embd=a.hidden, dropout=0.0)).train()


def _batch(a, n, rank):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    tgt = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    per = a.batch // n
    return ids[rank * per:(rank + 1) * per], tgt[rank * per:(rank + 1) * per]


# ---- the four programs -------------------------------------------------------------------
class PtdpRunner:
    def __init__(self, a, n, codegen):
        self.pm = ptdp.parallelize(_gpt(a), dp_shard=n, codegen=codegen)
        self.pm.optimizer(torch.optim.AdamW, lr=LR)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
        tgt = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
        self.x, self.y = self.pm.dp_shard(ids), self.pm.dp_shard(tgt)

    def fwd_bwd(self):
        return self.pm.train_step(self.x, targets=self.y)

    def opt_step(self, loss) -> float:
        self.pm.step()
        return float(loss)

    def step(self) -> float:
        return self.opt_step(self.fwd_bwd())

    def state(self) -> list:
        from benchmarks.memory_model import training_state
        return training_state(self.pm)


class Fsdp2Runner:
    def __init__(self, a, n, compiled):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        model = _gpt(a)
        if compiled:   # torchtitan's apply_compile: each block on its own, before FSDP
            for i, block in enumerate(model.blocks):
                model.blocks[i] = torch.compile(block, fullgraph=True)
        mesh = init_device_mesh("cpu", (n,))
        for i, block in enumerate(model.blocks):   # torchtitan's apply_fsdp, policy "default"
            fully_shard(block, mesh=mesh, reshard_after_forward=i < len(model.blocks) - 1)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR)
        self.x, self.y = _batch(a, n, dist.get_rank())
        self.n = n

    def fwd_bwd(self):
        self.opt.zero_grad()
        loss = self.model(self.x, self.y)
        loss.backward()
        return loss

    def step(self) -> float:
        return self.opt_step(self.fwd_bwd())

    def opt_step(self, loss) -> float:
        import torch.distributed as dist
        self.opt.step()
        out = loss.detach().clone()
        # the global mean loss, as ptdp's train_step returns it: outside the profiled bytes
        # it is a 4-byte all-reduce either way (ptdp's train_step does the same)
        dist.all_reduce(out)
        return float(out) / self.n

    def state(self) -> list:
        out = []

        def local(t):
            return getattr(t, "_local_tensor", t)
        for p in self.model.parameters():
            out += [local(p), local(p.grad) if p.grad is not None else None]
        for st in self.opt.state.values():
            out += [local(v) for v in st.values() if isinstance(v, torch.Tensor)]
        return [t for t in out if isinstance(t, torch.Tensor)]


def _build(name, a, n):
    if name.startswith("ptdp_"):
        return PtdpRunner(a, n, name[len("ptdp_"):])
    return Fsdp2Runner(a, n, compiled=name == "fsdp2_compiled")


# ---- measurements, the same for every variant -------------------------------------------
def _timed(fn):
    import torch.distributed as dist
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0])
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return out, dt[0].item(), dt[1].item()


def _storages(tensors) -> dict:
    """{data_ptr: nbytes} of the tensors' storages (each storage once)."""
    out = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.nbytes():
            out[st.data_ptr()] = st.nbytes()
    return out


# Peak memory from outside, every thread: a malloc interposer (LD_PRELOAD) counting the
# bytes in use (malloc_usable_size) and their peak. The torch profiler's allocator events
# (profile_memory=True) were tried first and are not usable here: frees on a thread the
# profiler does not follow (gloo's work threads drop a collective's buffers when the work
# completes) are never reported, so the live total drifts up by whole gathered buckets.
MEMCOUNT_C = r"""
#define _GNU_SOURCE
#include <malloc.h>
#include <stddef.h>
#include <errno.h>
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
static long cur_b = 0, peak_b = 0;
static void add(void *p) {
  if (!p) return;
  long c = __atomic_add_fetch(&cur_b, (long)malloc_usable_size(p), __ATOMIC_RELAXED);
  long pk = __atomic_load_n(&peak_b, __ATOMIC_RELAXED);
  while (c > pk && !__atomic_compare_exchange_n(&peak_b, &pk, c, 1, __ATOMIC_RELAXED,
                                                __ATOMIC_RELAXED)) {}
}
static void sub(void *p) {
  if (p) __atomic_sub_fetch(&cur_b, (long)malloc_usable_size(p), __ATOMIC_RELAXED);
}
void *malloc(size_t n) { void *p = __libc_malloc(n); add(p); return p; }
void free(void *p) { sub(p); __libc_free(p); }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); add(p); return p; }
void *realloc(void *q, size_t n) {
  sub(q); void *p = __libc_realloc(q, n);
  if (p) add(p); else if (q && n) add(q);
  return p;
}
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); add(p); return p; }
void *aligned_alloc(size_t a, size_t n) { void *p = __libc_memalign(a, n); add(p); return p; }
int posix_memalign(void **out, size_t a, size_t n) {
  void *p = __libc_memalign(a, n); if (!p) return ENOMEM; add(p); *out = p; return 0;
}
long memcount_current(void) { return __atomic_load_n(&cur_b, __ATOMIC_RELAXED); }
long memcount_peak(void) { return __atomic_load_n(&peak_b, __ATOMIC_RELAXED); }
void memcount_reset_peak(void) {
  __atomic_store_n(&peak_b, __atomic_load_n(&cur_b, __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}
"""


def memcount_library() -> str | None:
    """The interposer, compiled once (cc) into the temp dir; None without a C compiler."""
    import hashlib
    import shutil
    import subprocess
    import tempfile
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tag = hashlib.sha1(MEMCOUNT_C.encode()).hexdigest()[:12]
    so = os.path.join(tempfile.gettempdir(), f"ptdp_memcount_{tag}.so")
    if not os.path.exists(so):
        src = so[:-3] + ".c"
        with open(src, "w") as f:
            f.write(MEMCOUNT_C)
        tmp = f"{so}.{os.getpid()}"
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, src],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"memcount: {cc} failed; peak memory not measured\n{r.stderr}",
                  file=sys.stderr)
            return None
        os.replace(tmp, so)
    return so


def _memcount():
    """(current, peak, reset_peak) of the preloaded interposer, or None."""
    import ctypes
    lib = ctypes.CDLL(None)
    if not hasattr(lib, "memcount_current"):
        return None
    for f in (lib.memcount_current, lib.memcount_peak):
        f.restype = ctypes.c_long
    return lib.memcount_current, lib.memcount_peak, lib.memcount_reset_peak


def _peak_bytes(runner, measured: int = 3) -> tuple:
    """([peak bytes of each of ``measured`` steps], losses, state bytes with the gradients
    alive). A step's peak: the training state alive at its start (parameters, gradients
    that persist, optimizer state: storages) plus the largest increase of the bytes in
    use (every thread's mallocs: tensors, Inductor's buffers, gloo's) over the step."""
    import gc
    import torch.distributed as dist
    mc = _memcount()
    losses, peaks, grads_alive = [], [], 0
    gc.collect()
    for k in range(measured):
        dist.barrier()
        start_state = sum(_storages(runner.state()).values())
        if mc is not None:
            c0 = mc[0]()
            mc[2]()
        loss = runner.fwd_bwd()
        if mc is not None:
            fb = mc[1]() - c0
            mc[2]()
        if k == 0:
            grads_alive = sum(_storages(runner.state()).values())   # with this step's grads
        losses.append(runner.opt_step(loss))
        if mc is not None:   # (step, forward + backward, optimizer step)
            opt = mc[1]() - c0
            peaks.append((start_state + max(fb, opt), start_state + fb, start_state + opt))
    return peaks, losses, grads_alive


def _traffic(runner, n) -> tuple:
    from benchmarks.pg_traffic import ProcessGroupTraffic
    with ProcessGroupTraffic(n) as tr:
        loss = runner.step()
    t = tr.totals("nccl_bytes", by=("kind", "phase"))
    ag_f = t.get(("all_gather", "forward"), 0)
    ag_b = t.get(("all_gather", "backward"), 0)
    rs = sum(v for (k, _), v in t.items() if k == "reduce_scatter")
    counts = {}
    for o in tr.ops:
        key = f"{o['kind']}/{o['phase']}"
        counts[key] = counts.get(key, 0) + 1
    return {"ag_fwd_bytes": ag_f, "ag_bwd_bytes": ag_b, "rs_bytes": rs,
            "other_bytes": tr.total("nccl_bytes") - ag_f - ag_b - rs,
            "gloo_bytes": tr.total("gloo_bytes"), "collectives": counts}, loss


def _graph_facts(runner) -> dict:
    """What ptdp's compiled program does: buckets, gathers per graph, and in the
    forward graph how many compute nodes sit between each all-gather and its wait."""
    pm = runner.pm
    prog = pm._programs[next(iter(pm._programs))].program
    out = {"buckets": len(pm.plan.fsdp_buckets),
           "gathered_bytes_per_microbatch": sum(b for _, _, b in pm.plan.fsdp_buckets),
           "largest_bucket_bytes": max(b for _, _, b in pm.plan.fsdp_buckets)}
    ags = 0
    for ch in prog.chunks.values():
        ags += sum(1 for nd in ch.gm.graph.nodes if "all_gather_into_tensor" in str(nd.target))
    out["all_gathers_in_graph"] = ags
    return out


def _job(a):
    import torch.distributed as dist
    n = dist.get_world_size()
    rank = dist.get_rank()
    runners, build_s = {}, {}
    for name in a.variants:
        t0 = time.perf_counter()
        runners[name] = _build(name, a, n)
        build_s[name] = time.perf_counter() - t0
    losses = {v: [] for v in a.variants}
    times = {v: [] for v in a.variants}
    cpus = {v: [] for v in a.variants}
    first_s = {}
    names = list(a.variants)
    for r in range(a.warmup + a.steps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            loss, dt, cpu = _timed(runners[name].step)
            losses[name].append(loss)
            if r == 0:
                first_s[name] = dt
            if r >= a.warmup:
                times[name].append(dt)
                cpus[name].append(cpu)
    res = {}
    for name in names:   # one variant at a time, the same order of steps for each
        run = runners[name]
        peaks, ls, state_bytes = _peak_bytes(run)
        traffic, loss = _traffic(run, n)
        losses[name] += ls + [loss]
        res[name] = {"step_s": statistics.median(times[name]), "times": times[name],
                     "cpu_s": statistics.median(cpus[name]), "step_min_s": min(times[name]),
                     "first_step_s": first_s[name], "build_s": build_s[name],
                     "peak_bytes": statistics.median(p[0] for p in peaks) if peaks else None,
                     "peak_fwd_bwd_bytes": statistics.median(p[1] for p in peaks)
                     if peaks else None,
                     "peak_opt_bytes": statistics.median(p[2] for p in peaks) if peaks else None,
                     "peaks": peaks,
                     "state_bytes": state_bytes,
                     "losses": losses[name], **traffic}
        if name.startswith("ptdp_"):
            res[name].update(_graph_facts(run))
    full = sum(p.numel() * p.element_size() for p in _gpt(a).parameters())   # tied: once
    return {"rank": rank, "variants": res, "param_bytes": full}


def _summarise(a, n, res) -> list:
    P = res[0]["param_bytes"]
    formula = (n - 1) / n * P * 3
    rows = []
    ref_losses = res[0]["variants"]["fsdp2_eager"]["losses"] \
        if "fsdp2_eager" in a.variants else None
    for name in a.variants:
        per = [r["variants"][name] for r in res]
        row = {"world": n, "dp_shard": n, "variant": name,
               "step_ms": 1e3 * per[0]["step_s"],   # already the max over ranks
               "step_ms_min": 1e3 * per[0]["step_min_s"],
               "cpu_ms": 1e3 * per[0]["cpu_s"],
               "peak_bytes": None if per[0]["peak_bytes"] is None else
               max(p["peak_bytes"] for p in per),
               "state_bytes": max(p["state_bytes"] for p in per),
               "state_share": max(p["state_bytes"] for p in per) / (4 * P),
               "first_step_s": per[0]["first_step_s"],
               "build_s": max(p["build_s"] for p in per)}
        row["act_peak_bytes"] = None if row["peak_bytes"] is None else \
            max(p["peak_bytes"] - p["state_bytes"] for p in per)
        for k in ("peak_fwd_bwd_bytes", "peak_opt_bytes"):
            row[k] = None if row["peak_bytes"] is None else max(p[k] for p in per)
        row["peak_bytes_per_rank_step"] = [[x[0] for x in p["peaks"]] for p in per]
        for k in ("ag_fwd_bytes", "ag_bwd_bytes", "rs_bytes", "other_bytes", "gloo_bytes"):
            row[k] = round(statistics.mean(p[k] for p in per))
        row["formula_bytes"] = round(formula)
        row["bytes_ratio"] = (row["ag_fwd_bytes"] + row["ag_bwd_bytes"] + row["rs_bytes"]) \
            / formula
        if ref_losses is not None:
            row["loss_diff"] = max(abs(x - y) for x, y in
                                   zip(per[0]["losses"], ref_losses))
        row["loss_last"] = per[0]["losses"][-1]
        row["collectives"] = per[0]["collectives"]
        row["step_ms_all"] = [1e3 * t for t in per[0]["times"]]
        for k in ("buckets", "all_gathers_in_graph", "gathered_bytes_per_microbatch",
                  "largest_bucket_bytes"):
            if k in per[0]:
                row[k] = per[0][k]
        rows.append(row)
    for row in rows:   # kept in the JSON, left out of the README table (not scalars)
        row["detail"] = {k: row.pop(k) for k in DETAIL if k in row}
    by = {r["variant"]: r for r in rows}
    for row in rows:
        for ref in ("fsdp2_eager", "fsdp2_compiled"):
            if ref in by:
                row[f"vs_{ref}"] = by[ref]["step_ms"] / row["step_ms"]
                row[f"vs_{ref}_min"] = by[ref]["step_ms_min"] / row["step_ms_min"]
                row[f"vs_{ref}_cpu"] = by[ref]["cpu_ms"] / row["cpu_ms"]
        if row["peak_bytes"] is None:
            continue
        if "fsdp2_eager" in by:
            row["peak_vs_fsdp2"] = row["peak_bytes"] / by["fsdp2_eager"]["peak_bytes"]
        if "fsdp2_compiled" in by:
            row["detail"]["peak_vs_fsdp2_compiled"] = \
                row["peak_bytes"] / by["fsdp2_compiled"]["peak_bytes"]
    return rows


DETAIL = ("dp_shard", "build_s", "other_bytes", "gloo_bytes", "loss_last", "buckets",
          "all_gathers_in_graph", "gathered_bytes_per_microbatch", "largest_bucket_bytes")
COLS = ["world", "variant", "step_ms", "vs_fsdp2_eager", "vs_fsdp2_compiled",
        "vs_fsdp2_eager_min", "vs_fsdp2_compiled_min", "vs_fsdp2_eager_cpu",
        "vs_fsdp2_compiled_cpu", "peak_bytes", "peak_vs_fsdp2", "peak_fwd_bwd_bytes",
        "peak_opt_bytes", "state_bytes", "state_share", "act_peak_bytes", "ag_fwd_bytes",
        "ag_bwd_bytes", "rs_bytes", "formula_bytes", "bytes_ratio", "loss_diff"]


def _print(rows):
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "–" if v is None else str(v)
    cells = [[cell(r.get(c)) for c in COLS] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLS)]
    print("  ".join(c.rjust(w[i]) for i, c in enumerate(COLS)))
    for x in cells:
        print("  ".join(v.rjust(w[i]) for i, v in enumerate(x)), flush=True)


def _reexec_with_memcount():
    """Run this script again with the malloc interposer preloaded (once; a script run
    only: the ranks are forked from this process, so they inherit it)."""
    if _memcount() is not None or os.environ.get("PTDP_MEMCOUNT_TRIED"):
        return
    so = memcount_library()
    if so is None:
        return
    env = dict(os.environ, PTDP_MEMCOUNT_TRIED="1",
               LD_PRELOAD=" ".join(x for x in (so, os.environ.get("LD_PRELOAD")) if x))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--steps", type=int, default=12, help="timed rounds after warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny model, world 2, 2 warm-up + 2 timed rounds")
    for k, v in DEFAULT.items():
        ap.add_argument(f"--{k}", type=int, default=None, help=f"default {v}")
    a = ap.parse_args(argv)
    size = QUICK if a.quick else DEFAULT
    for k, v in size.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.worlds, a.steps, a.warmup = "2", 2, 2
    a.variants = [v for v in a.variants.split(",") if v]
    unknown = set(a.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    t_all = time.time()
    load = os.getloadavg()[0]
    rows, param_bytes = [], None
    print(f"GPT layers={a.layers} h={a.hidden} vocab={a.vocab} seq={a.seq} global batch "
          f"{a.batch}, fp32, AdamW; gloo CPU ranks; steps {a.warmup} warm-up + {a.steps}",
          flush=True)
    for n in (int(x) for x in a.worlds.split(",")):
        t0 = time.time()
        res = ptdp.launch(_job, a, world_size=n, timeout=900)
        rows += _summarise(a, n, res)
        param_bytes = res[0]["param_bytes"]
        _print([r for r in rows if r["world"] == n])
        print(f"(world {n}: {time.time() - t0:.0f} s)", flush=True)
    print(f"total {time.time() - t_all:.0f} s")
    if a.json:
        cmd = "python benchmarks/fsdp.py" + (" --quick" if a.quick else "") + \
            f" --json {os.path.relpath(os.path.abspath(a.json))}"
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"benchmark": "fsdp", "device": f"cpu (gloo, {os.cpu_count()} cores)",
                       "torch": torch.__version__, "command": cmd,
                       "model": {k: getattr(a, k) for k in DEFAULT},
                       "param_bytes": param_bytes,
                       "warmup": a.warmup, "steps": a.steps,
                       "load_average": [load, os.getloadavg()[0]],
                       "fsdp2_compile": "per block (torch.compile(block, fullgraph=True)), "
                                        "embeddings / head / loss eager",
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    _reexec_with_memcount()
    main()

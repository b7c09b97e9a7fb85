"""Predicted vs measured peak memory per rank (planner/memory.py), on configurations
mixing tp / pp / v / dp / recompute / ZeRO-1 / precision.

Prediction: ``pm.predict_memory()`` after ``pm.compile(batch)`` — this rank's transformed
chunk graphs, a trial partition of each (fake tensors), parameter shapes from the plan;
no step has run and no gradient, optimizer state or activation exists yet.

Measurement (CPU): an allocation tracker over one training step (``train_step`` +
``pm.step()``, the second step, so AdamW's states exist): a TorchDispatchMode that counts
every storage an ATen op returns until it is freed (a weakref finalizer), started with the
training state already alive (parameters, gradients, main grads, gradient buckets,
masters, optimizer states) adopted the same way. The peak of that live total is the
measured peak. Codegen is ``aot_eager``: Inductor's CPU wrapper allocates its buffers
outside the dispatcher, where a dispatch mode cannot see them. On a GPU,
``torch.cuda.max_memory_allocated`` over the same step would be the measurement.

    python benchmarks/memory_model.py --json benchmarks/results/memory_model.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# model: the project GPT (SDPA attention, dropout 0.1), 4 layers
MODEL = dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.1)
SEQ, GLOBAL_BATCH = 128, 8

CONFIGS = [  # name -> parallelize keywords (world = tp·pp·dp)
    ("fp32 none", dict()),
    ("bf16 full", dict(precision="bf16", recompute="full")),
    ("fp32 m4 selective", dict(microbatches=4, recompute="selective")),
    ("tp2 sp fp32 selective", dict(tp=2, sequence_parallel=True, recompute="selective")),
    ("dp2 zero1 fp32", dict(dp=2, distributed_optimizer=True)),
    ("dp2 bf16 full", dict(dp=2, precision="bf16", recompute="full")),
    ("pp2 1f1b m4 fp32", dict(pp=2, microbatches=4)),
    ("pp2 v2 interleaved m4 bf16 selective", dict(pp=2, virtual_stages=2, microbatches=4,
                                                  precision="bf16", recompute="selective")),
    ("tp2 pp2 m2 fp32 full", dict(tp=2, pp=2, microbatches=2, recompute="full")),
    ("tp2 dp2 sp bf16 zero1", dict(tp=2, dp=2, sequence_parallel=True, precision="bf16",
                                   distributed_optimizer=True)),
]


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the storages ATen ops return (and of adopted tensors), and their peak."""

    # higher-order ops (the partitioner's run_and_save_rng_state) run as one call: their
    # outputs are counted like an op's
    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def _drop(self, key):
        self.current -= self.live.pop(key, 0)

    def adopt(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._drop, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.adopt(t)
        return out


def training_state(pm) -> list:
    """Every tensor of the training state alive between steps on this rank."""
    out = []
    for p in pm.parameters():
        out += [p, p.grad, getattr(p, "main_grad", None)]
    for b in getattr(pm._buckets, "buckets", []):
        out += [b.get("buffer"), b.get("shard")]
    for sub in ("dense", "experts"):
        inner = getattr(pm._buckets, sub, None)
        for b in getattr(inner, "buckets", []) or []:
            out += [b.get("buffer"), b.get("shard")]
    opt = pm._optimizer
    if opt is not None and opt.inner is not None:
        for pc in opt.pieces:
            out.append(pc.master)
        for st in opt.inner.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _batch(dp_rank: int, dp: int, vocab: int, seq: int, global_batch: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (global_batch, seq), generator=g)
    tgt = torch.randint(0, vocab, (global_batch, seq), generator=g)
    per = global_batch // dp
    return ids[dp_rank * per:(dp_rank + 1) * per], tgt[dp_rank * per:(dp_rank + 1) * per]


def measure_job(kw: dict, model: dict = None, seq: int = SEQ,
                global_batch: int = GLOBAL_BATCH) -> dict:
    """On one rank: prediction after compile, then the measured peak of step 2."""
    import ptdp_compiler as ptdp
    from examples.models.gpt import GPT, GPTConfig
    cfg = model or MODEL
    torch.manual_seed(0)
    pm = ptdp.parallelize(GPT(GPTConfig(**cfg)).train(), codegen="aot_eager", **kw)
    ids, tgt = _batch(pm.coords.dp_rank, pm.config.dp, cfg["vocab_size"], seq, global_batch)
    pm.compile(ids, targets=tgt)
    pred = pm.predict_memory()
    pm.optimizer(torch.optim.AdamW, lr=1e-4)
    pm.train_step(ids, targets=tgt)
    pm.step()
    tr = AllocationTracker()
    for t in training_state(pm):
        tr.adopt(t)
    start = tr.current
    with tr:
        pm.train_step(ids, targets=tgt)
        pm.step()
    return {"rank": pm.coords.rank, "pp_rank": pm.coords.pp_rank,
            "predicted_peak_bytes": pred.peak, "measured_peak_bytes": tr.peak,
            "measured_state_bytes": start, "predicted": pred.rows()[0]}


def run_config(name: str, kw: dict) -> dict:
    import ptdp_compiler as ptdp
    world = kw.get("tp", 1) * kw.get("pp", 1) * kw.get("dp", 1)
    res = [measure_job(kw)] if world == 1 else \
        ptdp.launch(measure_job, kw, world_size=world, timeout=900)
    worst = max(res, key=lambda r: r["measured_peak_bytes"])
    pred = max(r["predicted_peak_bytes"] for r in res)
    return {"config": name, "layout": kw, "world": world,
            "predicted_peak_bytes": pred, "measured_peak_bytes": worst["measured_peak_bytes"],
            "error": pred / worst["measured_peak_bytes"] - 1,
            "per_rank": [{k: r[k] for k in ("rank", "pp_rank", "predicted_peak_bytes",
                                            "measured_peak_bytes", "measured_state_bytes")}
                         for r in res],
            "breakdown_worst_rank": max(res, key=lambda r: r["predicted_peak_bytes"])
            ["predicted"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write rows to this path")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all)")
    args = ap.parse_args(argv)
    rows = []
    print(f"GPT {MODEL}, seq {SEQ}, global batch {GLOBAL_BATCH}, aot_eager, AdamW; peak bytes "
          "per rank: predicted before the first step vs measured over step 2")
    print(f"{'config':<40}{'world':>6}{'predicted':>14}{'measured':>14}{'error':>8}")
    for name, kw in CONFIGS:
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        r = run_config(name, kw)
        rows.append(r)
        print(f"{name:<40}{r['world']:>6}{r['predicted_peak_bytes']:>14,.0f}"
              f"{r['measured_peak_bytes']:>14,}{r['error']:>+8.1%}   ({time.time() - t0:.0f} s)",
              flush=True)
    if rows:
        worst = max(abs(r["error"]) for r in rows)
        print(f"\nworst |error| {worst:.1%} over {len(rows)} configurations")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "memory_model", "device": "cpu", "torch": torch.__version__,
                       "model": MODEL, "seq": SEQ, "global_batch": GLOBAL_BATCH,
                       "codegen": "aot_eager", "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""Context parallelism (cp): activation bytes per rank, K/V traffic per layer, step time
and the longest sequence a fixed activation budget holds, at cp = 1, 2, 4.

All measured from outside the compiler on gloo ranks (CPU), with the project's GPT
(``examples/models/gpt.py``: learned positions, causal SDPA, fp32), batch 2, h=64, 4 heads:

- ``act_bytes``: bytes autograd keeps for backward during one public ``pm.train_step``,
  counted by ``saved_tensors_hooks`` once per storage, parameters left out, on rank 0
  (ranks hold equal shares). ``act_ratio`` = this / cp=1's; expected ≈ 1/cp (the K/V
  all-gather is re-done in backward, not stored).
- ``kv_bytes_per_layer``: bytes one rank sends in the cp all-gathers and reduce-scatters of
  one decoder layer in one step (the 2-layer step minus the 1-layer step; torch profiler
  c10d / gloo events, ``benchmarks/pg_traffic.py``; NCCL ring bytes) vs
  ``kv_formula`` = 3 · 2 · (cp−1)/cp · B·T·h_kv·d · 4 bytes: K and V all-gathered forward,
  re-gathered backward, their gradients reduce-scattered.
- ``step_ratio``: step time / cp=1's at the same sequence (median of 5 steps after a warm-up;
  ranks share 2 CPU cores here, so this says little about a real cluster).
- ``longest_seq``: the longest sequence (a multiple of 64: doubling from 256, then
  bisection) whose ``act_bytes`` stay within the budget cp=1 needs at 512 tokens; expected
  to grow ≈ linearly with cp (a few kB per rank do not shrink with cp: position indices).

    python benchmarks/context_parallel.py [--json benchmarks/results/context_parallel.json]
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

B, H, HEADS, VOCAB, S = 2, 64, 4, 256, 512
BUDGET_SEQ = 512
CPS = (1, 2, 4)


def _setup(cp: int, s: int, layers: int = 2):
    from examples.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=max(s, 8), n_layer=layers,
                          n_head=HEADS, n_embd=H))
    pm = ptdp.parallelize(model, cp=cp, codegen="aot_eager") if cp > 1 else \
        ptdp.parallelize(model, codegen="aot_eager")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, s), generator=g)
    tgt = torch.randint(0, VOCAB, (B, s), generator=g)
    return pm, ids, tgt


def saved_bytes(pm, ids, tgt) -> int:
    """Bytes autograd saves during one train_step (after a warm-up that compiles)."""
    pm.train_step(ids, targets=tgt)
    skip = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    seen: dict = {}

    def pack(x):
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            st = x.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        pm.train_step(ids, targets=tgt)
    return sum(seen.values())


def act_job(cp: int, s: int) -> int:
    pm, ids, tgt = _setup(cp, s)
    return saved_bytes(pm, ids, tgt)


def kv_job(cp: int, s: int) -> dict:
    """K/V traffic of one decoder layer (2-layer minus 1-layer step) and step times."""
    from benchmarks.pg_traffic import ProcessGroupTraffic
    per = []
    times = []
    for layers in (1, 2):
        pm, ids, tgt = _setup(cp, s, layers)
        pm.train_step(ids, targets=tgt)
        with ProcessGroupTraffic(max(cp, 2)) as tr:
            pm.train_step(ids, targets=tgt)
        per.append(sum(o["nccl_bytes"] for o in tr.ops
                       if o["kind"] in ("all_gather", "reduce_scatter")))
        if layers == 2:
            for _ in range(5):
                t0 = time.perf_counter()
                pm.train_step(ids, targets=tgt)
                times.append(time.perf_counter() - t0)
    return {"kv_bytes_per_layer": int(per[1] - per[0]), "step_s": statistics.median(times)}


def longest_job(cp: int, budget: int, step: int = 64) -> dict:
    """The longest sequence (a multiple of ``step``) whose saved bytes fit ``budget``:
    doubling from 256 to bracket it, then bisection."""
    tried = {}

    def fits(s):
        if s not in tried:
            tried[s] = act_job(cp, s)
        return tried[s] <= budget
    lo, hi = None, 256
    while hi <= 16384 and fits(hi):
        lo, hi = hi, hi * 2
    if lo is None:
        return {"longest_seq": None, "tried": sorted(tried.items())}
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"longest_seq": lo, "tried": sorted(tried.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--seq", type=int, default=S)
    a = ap.parse_args(argv)
    rows = []
    base = {}
    budget = None
    for cp in CPS:
        with ptdp.LocalWorld(cp) as w:
            act = w.run(act_job, cp, a.seq, timeout=900)[0]
            kv = w.run(kv_job, cp, a.seq, timeout=900)[0]
            if budget is None:
                budget = w.run(act_job, cp, BUDGET_SEQ, timeout=900)[0]
            longest = w.run(longest_job, cp, budget, timeout=1800)[0]
        if cp == 1:
            base = {"act": act, "step": kv["step_s"]}
        d = H // HEADS
        formula = 3 * 2 * (cp - 1) / cp * B * a.seq * H * 4   # h_kv·d = H (MHA)
        rows.append({
            "cp": cp, "seq": a.seq, "act_bytes": act,
            "act_ratio": round(act / base["act"], 4), "ideal_ratio": round(1 / cp, 4),
            "kv_bytes_per_layer": kv["kv_bytes_per_layer"], "kv_formula": int(formula),
            "kv_ratio": round(kv["kv_bytes_per_layer"] / formula, 4) if formula else None,
            "step_ms": round(kv["step_s"] * 1e3, 2),
            "step_ratio": round(kv["step_s"] / base["step"], 3),
            "budget_bytes": budget, "longest_seq": longest["longest_seq"],
            "longest_vs_cp1": None, "head_dim": d,
            "tried": longest["tried"]})
    for r in rows:
        r["longest_vs_cp1"] = round(r["longest_seq"] / rows[0]["longest_seq"], 3)
    print(f"{'cp':>3} {'act bytes':>11} {'ratio':>6} {'1/cp':>5} {'KV B/layer':>11} "
          f"{'formula':>9} {'kv/f':>5} {'step ms':>8} {'vs cp1':>6} {'longest T':>9}")
    for r in rows:
        print(f"{r['cp']:>3} {r['act_bytes']:>11} {r['act_ratio']:>6.3f} {r['ideal_ratio']:>5.2f} "
              f"{r['kv_bytes_per_layer']:>11} {r['kv_formula']:>9} "
              f"{(r['kv_ratio'] or 0):>5.2f} {r['step_ms']:>8.1f} {r['step_ratio']:>6.2f} "
              f"{r['longest_seq']:>9}")
    print(f"GPT h={H} heads={HEADS} B={B} fp32, seq {a.seq}; budget = cp=1's saved bytes at "
          f"{BUDGET_SEQ} tokens ({budget} B)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "context_parallel", "device": "cpu (gloo)",
                       "torch": torch.__version__,
                       "command": "python benchmarks/context_parallel.py --json " + a.json,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

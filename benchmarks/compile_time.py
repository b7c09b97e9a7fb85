"""Compile time vs depth (regional compilation) and step time of the codegens.

Part 1 — passes + codegen wall time of the project's GPT at depths 2, 8, 24, 48
(capture, pass pipeline, AOTAutograd + Inductor, regional), each in a fresh process
with an empty Inductor cache, so nothing is reused across depths except what regional
compilation reuses inside one model. ``kernels`` counts Inductor-generated kernels. Contract:
compile_s(48) / compile_s(2) ≤ 2.

Part 2 — one training step (forward + backward) on one rank: Inductor vs aot_eager vs
plain eager PyTorch, as ratios measured in the same run.

    python benchmarks/compile_time.py [--json out.json] [--depths 2,8,24,48]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402
from examples.models.gpt import GPT, GPTConfig  # noqa: E402


def make(layers: int, width: int, seq: int, batch: int):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=seq, n_layer=layers, n_head=4,
                          n_embd=width))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, seq), generator=g)
    y = torch.randint(0, 256, (batch, seq), generator=g)
    return model, x, y


def compile_row(layers: int, width: int, seq: int, batch: int) -> dict:
    """Time the first train_step (capture + passes + compile + one step) minus a step."""
    import torch._functorch.config as fconf
    import torch._inductor.config as iconf
    from torch._inductor import metrics
    from ptdp_compiler.codegen import regional_stats
    model, x, y = make(layers, width, seq, batch)
    regional_stats.clear()
    metrics.generated_kernel_count = 0
    # a cold compile per depth: no cross-run cache hits, only in-model region reuse
    with tempfile.TemporaryDirectory() as cache, iconf.patch(fx_graph_cache=False), \
            fconf.patch(enable_autograd_cache=False):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        pm = ptdp.parallelize(model, codegen="inductor")
        t0 = time.perf_counter()
        pm.train_step(x, targets=y)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        pm.train_step(x, targets=y)
        step = time.perf_counter() - t0
    return {"layers": layers, "compile_s": round(first - step, 3),
            "kernels": metrics.generated_kernel_count,
            "regions": regional_stats["regions"],
            "distinct_regions": regional_stats["distinct_regions"]}


def step_times(layers: int, width: int, seq: int, batch: int, steps: int) -> dict:
    out = {}
    for mode in ("eager", "aot_eager", "inductor"):
        model, x, y = make(layers, width, seq, batch)
        if mode == "eager":
            def run():
                for p in model.parameters():
                    p.grad = None
                model(x, targets=y).backward()
        else:
            pm = ptdp.parallelize(model, codegen=mode)
            def run(pm=pm):
                pm.train_step(x, targets=y)
        run()
        run()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        out[mode] = (time.perf_counter() - t0) / steps
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--depths", default="2,8,24,48")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--step-layers", type=int, default=4)
    ap.add_argument("--step-width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--one-depth", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    rows = []
    print(f"{'layers':>6} {'compile_s':>10} {'kernels':>8} {'regions':>8} {'distinct':>9}")
    for d in [int(x) for x in a.depths.split(",")]:
        if a.one_depth:
            print(json.dumps(compile_row(d, a.width, a.seq, a.batch)))
            return
        # a fresh process per depth: in-memory code caches would otherwise favour later depths
        cmd = [sys.executable, __file__, "--one-depth", "--depths", str(d), "--width",
               str(a.width), "--seq", str(a.seq), "--batch", str(a.batch)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['layers']:>6} {r['compile_s']:>10.2f} {r['kernels']:>8} {r['regions']:>8} "
              f"{r['distinct_regions']:>9}", flush=True)
    ratio = rows[-1]["compile_s"] / rows[0]["compile_s"]
    print(f"compile time ratio {rows[-1]['layers']}/{rows[0]['layers']} layers: {ratio:.2f} "
          f"(contract: <= 2)")
    st = step_times(a.step_layers, a.step_width, a.seq, a.batch, a.steps)
    print(f"\nstep time, {a.step_layers}-layer GPT h={a.step_width}, one rank "
          f"(ratios in this run):")
    for mode, t in st.items():
        print(f"  {mode:<10} {t * 1e3:8.1f} ms   {st['eager'] / t:5.2f}x eager")
    rows.append({"step_layers": a.step_layers, "step_width": a.step_width,
                 **{f"step_ms_{m}": round(t * 1e3, 2) for m, t in st.items()},
                 "inductor_vs_eager": round(st["eager"] / st["inductor"], 3),
                 "aot_eager_vs_eager": round(st["eager"] / st["aot_eager"], 3)})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "compile_time", "device": "cpu", "torch": torch.__version__,
                       "rows": rows, "compile_ratio_last_over_first": round(ratio, 3)}, f,
                      indent=1)


if __name__ == "__main__":
    main()

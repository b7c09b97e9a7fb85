"""Training throughput on one GPU: ptdp (Inductor, regional, selective recompute) vs
eager PyTorch vs plain ``torch.compile`` of the same model, in the same run.

GPT of hidden 4096, 32 heads, s = 2048, bf16, tp = pp = 1. Every mode times the same
step: zero the gradients, forward, loss, backward (no optimizer: it is the same
elementwise update in every mode and would only dilute the difference).

FLOPs. ``mfu`` counts model FLOPs only, Korthikanti et al. 2022's
72·B·s·l·h²·(1 + s/6h + V/12lh), so recomputation is never counted as useful work (the
standard MFU). ``tflops_paper`` uses Narayanan et al. 2021's 96·B·s·l·h²·(1 + s/6h +
V/16lh), which counts a full recomputed forward (their Table 1 accounting): it is the
number to hold against that paper's, and it overstates work done under selective
recompute. Peak is the device's dense bf16 figure (``--peak-tflops`` overrides it).

Every mode's first-step loss is reported; ptdp's must equal eager's within bf16
tolerance, or the row says so (a fast wrong program is not a result). All modes are set
up first and then timed in alternating rounds (the median round counts), so a slow spell
of the machine falls on every mode alike. ``step_gib``: the memory one step needs beyond
the weights already allocated (activations, gradients, workspace), on CUDA.

    python benchmarks/gpu_throughput.py [--layers 4] [--json out.json]
    python benchmarks/gpu_throughput.py --device cpu --hidden 64 --heads 4 --seq 32 \\
        --layers 2 --vocab 128 --codegen aot_eager        # smoke run, no GPU

Without CUDA and without ``--device cpu`` it says so and exits 0.
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

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s; the first name found in the
# device name wins, so the more specific names come first
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
                    ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)]


def peak_tflops(name: str) -> float:
    for k, v in PEAK_BF16_TFLOPS:
        if k in name:
            return v
    return float("nan")


def model_flops(b, s, l, h, V) -> float:
    """Forward + backward FLOPs of one step, no recomputation (Korthikanti et al. 2022)."""
    return 72 * b * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h))


def paper_flops(b, s, l, h, V) -> float:
    """Narayanan et al. 2021's count, which includes a full recomputed forward."""
    return 96 * b * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def build(a, device):
    from examples.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=a.vocab, block_size=a.seq, n_layer=a.layers, n_head=a.heads,
                         n_embd=a.hidden, dropout=0.0)).to(device=device, dtype=getattr(torch, a.dtype))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, iters, device) -> float:
    """Mean seconds per step over ``iters`` steps."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def make_step(mode: str, model, a, x, y):
    """``mode``: eager | torch.compile | ptdp | ptdp:<recompute> (e.g. ptdp:none) |
    ptdp:<recompute>:table2 (``recompute_pointwise=False``: save exactly the paper's set)."""
    if mode.startswith("ptdp"):
        import ptdp_compiler as ptdp
        parts = mode.split(":")
        recompute = parts[1] if len(parts) > 1 else a.recompute
        pm = ptdp.parallelize(model, codegen=a.codegen, recompute=recompute,
                              recompute_pointwise=parts[2:] != ["table2"])
        return lambda: pm.train_step(x, targets=y)
    if mode not in ("eager", "torch.compile"):
        raise SystemExit(f"unknown mode {mode!r}; use eager, torch.compile, ptdp or ptdp:<recompute>")
    fwd = torch.compile(model) if mode == "torch.compile" else model

    def step():
        for p in model.parameters():
            p.grad = None
        loss = fwd(x, targets=y)
        loss.backward()
        return loss.detach()
    return step


def set_up(mode, a, x, y, device) -> dict:
    """Build and compile ``mode``'s model; run its warm-up steps (the first one's loss is
    kept) and measure the memory one step needs beyond what is already allocated."""
    model = build(a, device)
    t0 = time.perf_counter()
    step = make_step(mode, model, a, x, y)
    loss = float(step())
    for _ in range(a.warmup - 1):
        step()
    mem = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        mem = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    return {"mode": mode, "step": step, "model": model, "loss": loss, "step_gib": mem,
            "setup_s": time.perf_counter() - t0, "times": []}


def profile_modes(runs, out_dir, device):
    """Two profiled steps per mode; writes the op table sorted by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile
    os.makedirs(out_dir, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for r in runs:
        with profile(activities=acts) as prof:
            for _ in range(2):
                r["step"]()
            _sync(device)
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        with open(os.path.join(out_dir, r["mode"].replace(":", "_") + ".txt"), "w") as f:
            f.write(table)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=51200)
    ap.add_argument("--recompute", default="selective")
    ap.add_argument("--codegen", default="inductor", help="ptdp's codegen (aot_eager: smoke runs)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed rounds, modes alternated; a mode's time is its median round")
    ap.add_argument("--modes", default="eager,torch.compile,ptdp")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the model's dtype (float32: a CPU without fast bf16 GEMMs)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    ap.add_argument("--json")
    ap.add_argument("--profile", metavar="DIR",
                    help="also profile two steps of every mode: DIR/<mode>.txt holds the ops "
                         "by device time (where a slower mode loses its time)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU on this machine; nothing measured (run it on an "
              "H100/H200, or pass --device cpu for a smoke run)")
        return 0
    device = torch.device(a.device)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    # the table holds 16-bit tensor-core peaks; fp32 has no meaningful MFU without --peak-tflops
    peak = a.peak_tflops or (peak_tflops(dev) if a.dtype != "float32" else float("nan"))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    y = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
    flops = model_flops(a.batch, a.seq, a.layers, a.hidden, a.vocab)
    flops96 = paper_flops(a.batch, a.seq, a.layers, a.hidden, a.vocab)
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[a.dtype]
    name = f"GPT h={a.hidden} a={a.heads} l={a.layers} s={a.seq} b={a.batch} {short}"
    rows = []
    print(f"{name} on {dev} (peak {peak:.0f} TFLOP/s {short}), torch {torch.__version__}")
    print(f"{'mode':<16} {'step ms':>9} {'TFLOP/s':>9} {'MFU':>7} {'paper96':>8} {'GiB':>6} "
          f"{'loss':>9}   (GiB: memory a step needs beyond weights)")
    # every mode set up first, then timed in alternating rounds, so a slow spell of a
    # shared machine falls on all of them alike
    runs = [set_up(mode, a, x, y, device) for mode in a.modes.split(",")]
    for _ in range(a.rounds):
        for r in runs:
            r["times"].append(timed(r["step"], a.iters, device))
    if a.profile:
        profile_modes(runs, a.profile, device)
    for r in runs:
        t = statistics.median(r["times"])
        tf, mem = flops / t / 1e12, r["step_gib"]
        rows.append({"model": name, "mode": r["mode"], "tflops": round(tf, 1),
                     "mfu": round(tf / peak, 4) if peak == peak else None,
                     "tflops_paper": round(flops96 / t / 1e12, 1),
                     "step_ms": round(t * 1e3, 2), "step_gib": mem and round(mem, 2),
                     "loss": round(r["loss"], 5), "setup_s": round(r["setup_s"], 1),
                     "device": dev})
        print(f"{r['mode']:<16} {t * 1e3:9.1f} {tf:9.1f} {tf / peak:7.1%} "
              f"{flops96 / t / 1e12:8.1f} {mem or float('nan'):6.1f} {r['loss']:9.5f}", flush=True)
    base = {r["mode"]: r for r in rows}
    for r in rows:
        if "torch.compile" in base:
            r["vs_torch_compile"] = round(base["torch.compile"]["step_ms"] / r["step_ms"], 3)
        if "eager" in base and r["mode"] != "eager":
            # bf16 logits over V classes: first-step losses agree to a few 1e-3 relative
            r["loss_ok"] = abs(r["loss"] - base["eager"]["loss"]) <= 2e-2 * abs(base["eager"]["loss"])
    for r in rows:
        extra = [f"{r['vs_torch_compile']:.3f}x vs torch.compile"] if "vs_torch_compile" in r else []
        if r.get("loss_ok") is False:
            extra.append("LOSS DIFFERS FROM EAGER")
        if extra:
            print(f"  {r['mode']}: " + ", ".join(extra))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "gpu_throughput", "device": dev, "torch": torch.__version__,
                       "command": "python benchmarks/gpu_throughput.py " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=1)
    return 0 if all(r.get("loss_ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

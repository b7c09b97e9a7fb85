"""Training throughput on one GPU: ptdp (Inductor, regional, selective recompute) vs
eager PyTorch vs plain ``torch.compile`` of the same model, in the same run.

GPT of hidden 4096, 32 heads, s = 2048, bf16, tp = pp = 1. Model FLOPs per step use
Narayanan et al. 2021's formula 96·B·s·l·h²·(1 + s/6h + V/16lh) (it counts the
recomputed forward too, as the paper does for full recompute; with selective recompute
that is a slight overcount of useful work, as in the paper's Table 1 accounting we
report it as-is). MFU = achieved TFLOP/s / the device's dense bf16 peak.

    python benchmarks/gpu_throughput.py [--layers 4] [--json out.json]

Needs CUDA: on a machine without a GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(name: str) -> float:
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return float("nan")


def model_flops(b, s, l, h, V) -> float:
    return 96 * b * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def build(layers, hidden, heads, seq, vocab):
    from examples.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=layers, n_head=heads,
                         n_embd=hidden, dropout=0.0)).cuda().to(torch.bfloat16)


def time_steps(step, warmup, iters) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def run_mode(mode, a, x, y):
    model = build(a.layers, a.hidden, a.heads, a.seq, a.vocab)
    if mode == "ptdp":
        import ptdp_compiler as ptdp
        pm = ptdp.parallelize(model, codegen="inductor", recompute=a.recompute)

        def step():
            pm.train_step(x, targets=y)
    else:
        fwd = torch.compile(model) if mode == "torch.compile" else model

        def step():
            for p in model.parameters():
                p.grad = None
            fwd(x, targets=y).backward()
    t = time_steps(step, a.warmup, a.iters)
    del model
    torch.cuda.empty_cache()
    return t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=51200)
    ap.add_argument("--recompute", default="selective")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--modes", default="eager,torch.compile,ptdp")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU on this machine; nothing measured (run it on an "
              "H100/H200)")
        return 0
    dev = torch.cuda.get_device_name()
    peak = peak_tflops(dev)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).cuda()
    y = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).cuda()
    flops = model_flops(a.batch, a.seq, a.layers, a.hidden, a.vocab)
    name = f"GPT h={a.hidden} a={a.heads} l={a.layers} s={a.seq} b={a.batch} bf16"
    rows = []
    print(f"{name} on {dev} (peak {peak:.0f} TFLOP/s bf16)")
    print(f"{'mode':<14} {'step ms':>9} {'TFLOP/s':>9} {'MFU':>7}")
    for mode in a.modes.split(","):
        t = run_mode(mode, a, x, y)
        tf = flops / t / 1e12
        rows.append({"model": name, "mode": mode, "tflops": round(tf, 1),
                     "mfu": round(tf / peak, 4), "device": dev, "step_ms": round(t * 1e3, 2)})
        print(f"{mode:<14} {t * 1e3:9.1f} {tf:9.1f} {tf / peak:7.1%}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "gpu_throughput", "device": dev, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

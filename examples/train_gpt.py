"""Train a small GPT on local CPU ranks with ptdp_compiler (the README's main job).

    python examples/train_gpt.py                  # dp=2 × pp=2 × tp=2 on 8 local ranks
    python examples/train_gpt.py --dp 1 --pp 2 --virtual-stages 2 --codegen aot_eager
    python examples/train_gpt.py --dp 1 --tp 4 --pp 2 --sequence-parallel

The model (examples/models/gpt.py) is ordinary single-device code; ptdp_compiler
captures it, compiles it and trains it with tensor (+ sequence), interleaved pipeline and
data parallelism on gloo ranks. The corpus is
byte-level text (the Zen of Python and this package's own docstrings), so nothing
is downloaded.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402
from ptdp_compiler.runtime.checkpoint import complete_checkpoint  # noqa: E402
from examples.models.gpt import GPT, GPTConfig  # noqa: E402


def corpus() -> torch.Tensor:
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this
    text = codecs.decode(this.s, "rot13")
    for mod in (ptdp.api, ptdp.capture, ptdp.runtime.launch):
        text += "\n" + (mod.__doc__ or "")
    return torch.tensor(list(text.encode()), dtype=torch.long)


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        yield x, y


def gpt_flops(args) -> float:
    """FLOPs of one training step, Narayanan et al. 2021 (eq. 3): 96·B·s·l·h²·(1 + s/6h +
    V/16lh) counts a recomputed forward; without recomputation 3/4 of the layer term:
    72·B·s·l·h²·(1 + s/6h) + 6·B·s·h·V."""
    B, s, l, h, V = args.batch, args.seq, args.layers, args.width, 256
    return 72 * B * s * l * h * h * (1 + s / (6 * h)) + 6 * B * s * h * V


def measured_peak_flops(n: int = 512, seconds: float = 0.3) -> float:
    """This process's matmul throughput (FLOP/s): the MFU denominator on a CPU, where no
    datasheet peak applies; pass --peak-tflops for a GPU's."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def restart_count() -> int:
    """How many times torchrun (--max-restarts) has restarted this worker group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def train(args) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # every rank builds the same model
    cfg = GPTConfig(vocab_size=256, block_size=args.seq, n_layer=args.layers, n_head=4,
                    n_embd=args.width, dropout=0.0)
    model = GPT(cfg)
    pm = ptdp.parallelize(model, dp=args.dp, tp=args.tp, pp=args.pp,
                          virtual_stages=args.virtual_stages, microbatches=args.microbatches,
                          sequence_parallel=args.sequence_parallel, codegen=args.codegen,
                          precision=args.precision,
                          distributed_optimizer=args.distributed_optimizer)
    pm.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0,
                 max_grad_norm=args.max_grad_norm)
    data = batches(corpus(), args.batch, args.seq, seed=1)
    first = 0
    if args.resume and complete_checkpoint(args.ckpt_dir):
        x, y = next(batches(corpus(), args.batch, args.seq, seed=1))
        pm.compile(pm.dp_shard(x), targets=pm.dp_shard(y))  # fix the layout, then load into it
        first = pm.load(args.ckpt_dir)["next_step"]
        for _ in range(first):  # the data position: batches are a seeded stream
            next(data)
        if rank == 0:
            print(f"resumed from {args.ckpt_dir} at step {first}", flush=True)
    flops_per_step = gpt_flops(args)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops()
    world = args.dp * args.tp * args.pp
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=first, file=sys.stdout, dynamic_ncols=True,
                   desc=f"dp={args.dp} tp={args.tp} pp={args.pp} {args.precision}")
    losses, t_start, tokens = [], None, 0
    skipped = 0
    for step in range(first, args.steps):
        x, y = next(data)
        t0 = time.perf_counter()
        loss = pm.train_step(pm.dp_shard(x), targets=pm.dp_shard(y))
        skipped += pm.step().skipped  # inf/NaN gradients: no update, reported
        losses.append(float(loss))
        if step == first:  # the first step includes capture and compile
            t_start, compile_s = time.perf_counter(), time.perf_counter() - t0
        else:
            tokens += x.numel()
        if args.fail_at_step == step and restart_count() == 0 and rank == world - 1:
            os._exit(17)  # fault injection: the last rank dies, once; the others block in
            # their next p2p/collective until torchrun stops them
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            pm.save(args.ckpt_dir, extra={"next_step": step + 1})
        if bar is not None:
            dt = time.perf_counter() - t_start
            tps = tokens / dt if tokens else 0.0
            mfu = flops_per_step * (step - first) / dt / (peak * world) if tokens else 0.0
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}",
                            mem=f"{memory_mb():,.0f}MB", skipped=skipped)
            bar.update()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    return {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "first_step": first,
            "mfu": flops_per_step * (len(losses) - 1) / elapsed / (peak * world)
            if elapsed > 0 else 0.0, "peak_memory_mb": memory_mb(), "skipped_steps": skipped,
            "first_step_s": compile_s, "restart_count": restart_count(),
            "explain": pm.explain() if rank == 0 else ""}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--virtual-stages", type=int, default=1, help="interleaved chunks per stage")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="shard optimizer state and fp32 masters over dp (ZeRO-1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ckpt-dir", default="checkpoints/train_gpt")
    p.add_argument("--ckpt-every", type=int, default=0, help="save every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir if present")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak for MFU (default: measured matmul rate)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a hang fails")
    # fault injection (reliability benchmark, tests): the last rank exits after this step in
    # torchrun's first attempt; in a restarted attempt ranks > 0 start --restart-skew
    # seconds late, the start-up skew that exposed stale store keys (runtime/launch.py)
    p.add_argument("--fail-at-step", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--restart-skew", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--explain", action="store_true", help="print what the compiler did")
    p.add_argument("--json", help="write the run's numbers here")
    return p.parse_args(argv)


def main():
    args = parse_args()
    world = args.dp * args.tp * args.pp
    if restart_count() > 0 and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(args.restart_skew)
    results = ptdp.launch(train, args, world_size=world, timeout=args.timeout)
    r0 = results[0]
    if dist.is_initialized() and dist.get_rank() != 0:  # under torchrun: rank 0 reports
        return
    if args.explain:
        print(r0["explain"])
    print(f"loss {r0['first_loss']:.3f} -> {r0['last_loss']:.3f} over {args.steps} steps on "
          f"{world} CPU ranks (dp={args.dp}, tp={args.tp}, pp={args.pp}); "
          f"{r0['tokens_per_s']:,.0f} tokens/s after a {r0['first_step_s']:.1f} s first step "
          f"(capture + compile); MFU {r0['mfu']:.1%} of the measured matmul peak; "
          f"peak memory {r0['peak_memory_mb']:,.0f} MB per rank; {r0['skipped_steps']} skipped "
          "steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in r0.items() if k != "explain"}, f, indent=1)
    if not r0["last_loss"] < r0["first_loss"]:
        sys.exit("training did not reduce the loss")


if __name__ == "__main__":
    main()

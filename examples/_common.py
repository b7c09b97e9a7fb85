"""What the example training jobs share: the byte corpus, the command-line layout flags,
the training loop (progress bar, checkpoints, fault injection) and the final summary.

A job script (train_gpt.py, train_hf.py) supplies one function, ``make_job(args) -> Job``:
the model every rank builds, how a batch of tokens becomes its inputs, and the FLOPs of a
step. ``run(args, make_job)`` launches the ranks and trains.
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

import ptdp_compiler as ptdp
from ptdp_compiler import progress
from ptdp_compiler.runtime.checkpoint import complete_checkpoint

VOCAB = 256   # byte-level tokens


@dataclasses.dataclass
class Job:
    model: torch.nn.Module
    inputs: Callable          # (x, y) -> (args, kwargs) of one train_step, global batch
    flops_per_step: float     # model FLOPs of one global step (the MFU numerator)
    name: str = "model"


def corpus() -> torch.Tensor:
    """Byte-level text: the Zen of Python and this package's own docstrings (nothing is
    downloaded)."""
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


def add_layout_args(p: argparse.ArgumentParser, steps: int = 200, lr: float = 3e-3):
    """The flags every job takes: layout, schedule, precision, loop, checkpoints."""
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--dp-shard", type=int, default=1,
                   help="fully sharded data-parallel ranks (FSDP / ZeRO-3; HSDP beside --dp)")
    p.add_argument("--cp", type=int, default=1,
                   help="context-parallel ranks (each holds 1/cp of every sequence)")
    p.add_argument("--virtual-stages", type=int, default=1, help="interleaved chunks per stage")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="shard optimizer state and fp32 masters over dp (ZeRO-1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--no-split-backward", action="store_true",
                   help="pp > 1: compile each backward whole (split_backward=False)")
    p.add_argument("--ckpt-dir", default="checkpoints/train")
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
    p.add_argument("--explain", action="store_true", help="print what the compiler did")
    p.add_argument("--timeline", help="pp > 1: write the last step's pipeline as it ran here "
                   "(Chrome trace JSON, and a .png picture beside it)")
    p.add_argument("--json", help="write the run's numbers here")


def layout_str(args, sep: str = ", ") -> str:
    parts = [f"{k}={getattr(args, k)}" for k in ("dp", "tp", "pp")]
    parts += [f"{k}={getattr(args, k)}" for k in ("dp_shard", "cp") if getattr(args, k, 1) > 1]
    return sep.join(parts)


def train(args, make_job) -> dict:
    """One rank's training run (called on every rank by ``run``)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # every rank builds the same model
    job = make_job(args)
    pm = ptdp.parallelize(job.model, dp=args.dp, tp=args.tp, pp=args.pp,
                          dp_shard=args.dp_shard, cp=args.cp,
                          virtual_stages=args.virtual_stages, microbatches=args.microbatches,
                          sequence_parallel=args.sequence_parallel, codegen=args.codegen,
                          precision=args.precision, split_backward=not args.no_split_backward,
                          distributed_optimizer=args.distributed_optimizer)
    pm.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0,
                 max_grad_norm=args.max_grad_norm)

    def step_inputs(x, y):
        a, kw = job.inputs(x, y)
        return [pm.dp_shard(t) for t in a], {k: pm.dp_shard(v) for k, v in kw.items()}

    data = batches(corpus(), args.batch, args.seq, seed=1)
    t_compile = time.perf_counter()
    x, y = next(batches(corpus(), args.batch, args.seq, seed=1))
    a, kw = step_inputs(x, y)
    pm.compile(*a, **kw)   # capture + passes + compile now, reported phase by phase, so the
    compile_s = time.perf_counter() - t_compile   # bar below moves from its first step
    first = 0
    if args.resume and complete_checkpoint(args.ckpt_dir):
        first = pm.load(args.ckpt_dir)["next_step"]
        for _ in range(first):  # the data position: batches are a seeded stream
            next(data)
        if rank == 0:
            print(f"resumed from {args.ckpt_dir} at step {first}", flush=True)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops()
    world = args.dp * args.tp * args.pp * args.dp_shard * args.cp
    bar = None
    progress.say(f"set up in {compile_s:.1f} s (the phases above, then this rank's stages "
                 f"and process groups, joined with the other ranks); training {job.name}")
    losses, t_start, tokens, skipped, first_step_s = [], None, 0, 0, 0.0
    for step in range(first, args.steps):
        x, y = next(data)
        t0 = time.perf_counter()
        a, kw = step_inputs(x, y)
        loss = pm.train_step(*a, **kw)
        skipped += pm.step().skipped  # inf/NaN gradients: no update, reported
        losses.append(float(loss))
        if step == first:  # the first step's timing includes warm-up; tokens/s starts after
            t_start, first_step_s = time.perf_counter(), time.perf_counter() - t0
            if rank == 0:   # the bar appears once steps take their steady time
                from tqdm import tqdm
                progress.say(f"first step {first_step_s:.1f} s" + (
                    " (Inductor compiles the backward graphs when they first run)"
                    if args.codegen == "inductor" else ""))
                bar = tqdm(total=args.steps, initial=first, file=sys.stdout,
                           dynamic_ncols=True,
                           desc=f"{layout_str(args, ' ')} {args.precision}")
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
            mfu = job.flops_per_step * (step - first) / dt / (peak * world) if tokens else 0.0
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}",
                            mem=f"{memory_mb():,.0f}MB", skipped=skipped)
            bar.update()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    bubble = None
    if args.timeline and args.pp > 1:   # collective: every rank takes part, rank 0 writes
        bubble = pm.timeline(args.timeline)["bubble"]
    return {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "first_step": first,
            "mfu": job.flops_per_step * (len(losses) - 1) / elapsed / (peak * world)
            if elapsed > 0 else 0.0, "peak_memory_mb": memory_mb(), "skipped_steps": skipped,
            "compile_s": compile_s, "first_step_s": compile_s + first_step_s,
            "restart_count": restart_count(), "model": job.name, "bubble": bubble,
            "explain": pm.explain() if rank == 0 else ""}


def run(args, make_job) -> dict:
    """Launch ``world`` local ranks (or join torchrun's), train, print the summary; returns
    rank 0's numbers (None on the other torchrun ranks)."""
    world = args.dp * args.tp * args.pp * args.dp_shard * args.cp
    if restart_count() > 0 and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(args.restart_skew)
    if not dist.is_initialized() and int(os.environ.get("RANK", "0")) == 0:
        progress.say(f"starting {world} CPU ranks ({layout_str(args, ' ')})")
    results = ptdp.launch(train, args, make_job, world_size=world, timeout=args.timeout)
    r0 = results[0]
    if dist.is_initialized() and dist.get_rank() != 0:  # under torchrun: rank 0 reports
        return None
    if args.explain:
        print(r0["explain"])
    print(f"{r0['model']}: loss {r0['first_loss']:.3f} -> {r0['last_loss']:.3f} over "
          f"{args.steps} steps on {world} CPU ranks ({layout_str(args)}); "
          f"{r0['tokens_per_s']:,.0f} tokens/s after {r0['first_step_s']:.1f} s to the end of "
          f"the first step (capture + compile {r0['compile_s']:.1f} s); MFU {r0['mfu']:.1%} of "
          f"the measured matmul peak; peak memory {r0['peak_memory_mb']:,.0f} MB per rank; "
          f"{r0['skipped_steps']} skipped steps")
    if r0["bubble"] is not None:
        print(f"timeline of the last step: {args.timeline} and "
              f"{os.path.splitext(args.timeline)[0]}.png (measured bubble {r0['bubble']:.3f})")
    elif args.timeline:
        print("--timeline: no pipeline (pp=1), nothing written")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in r0.items() if k != "explain"}, f, indent=1)
    if not r0["last_loss"] < r0["first_loss"]:
        sys.exit("training did not reduce the loss")
    return r0

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


def train(args) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # every rank builds the same model
    cfg = GPTConfig(vocab_size=256, block_size=args.seq, n_layer=args.layers, n_head=4,
                    n_embd=args.width, dropout=0.0)
    model = GPT(cfg)
    pm = ptdp.parallelize(model, dp=args.dp, tp=args.tp, pp=args.pp,
                          virtual_stages=args.virtual_stages, microbatches=args.microbatches,
                          sequence_parallel=args.sequence_parallel, codegen=args.codegen)
    opt = torch.optim.AdamW(pm.parameters(), lr=args.lr, weight_decay=0.0)
    data = batches(corpus(), args.batch, args.seq, seed=1)
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc=f"dp={args.dp} tp={args.tp} pp={args.pp}",
                   file=sys.stdout, dynamic_ncols=True)
    losses, t_start, tokens = [], None, 0
    for step in range(args.steps):
        x, y = next(data)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = pm.train_step(pm.dp_shard(x), targets=pm.dp_shard(y))
        opt.step()
        losses.append(float(loss))
        if step == 0:  # the first step includes capture and compile
            t_start, compile_s = time.perf_counter(), time.perf_counter() - t0
        else:
            tokens += x.numel()
        if bar is not None:
            tps = tokens / (time.perf_counter() - t_start) if tokens else 0.0
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}")
            bar.update()
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    return {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "first_step_s": compile_s, "explain": pm.explain() if rank == 0 else ""}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--virtual-stages", type=int, default=1, help="interleaved chunks per stage")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--codegen", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--explain", action="store_true", help="print what the compiler did")
    p.add_argument("--json", help="write the run's numbers here")
    args = p.parse_args()
    world = args.dp * args.tp * args.pp
    results = ptdp.launch(train, args, world_size=world, timeout=3600)
    r0 = results[0]
    if dist.is_initialized() and dist.get_rank() != 0:  # under torchrun: rank 0 reports
        return
    if args.explain:
        print(r0["explain"])
    print(f"loss {r0['first_loss']:.3f} -> {r0['last_loss']:.3f} over {args.steps} steps on "
          f"{world} CPU ranks (dp={args.dp}, tp={args.tp}, pp={args.pp}); "
          f"{r0['tokens_per_s']:,.0f} tokens/s after a {r0['first_step_s']:.1f} s first step "
          "(capture + compile)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in r0.items() if k != "explain"}, f, indent=1)
    if not r0["last_loss"] < r0["first_loss"]:
        sys.exit("training did not reduce the loss")


if __name__ == "__main__":
    main()

"""Train a small mixture-of-experts model with expert parallelism on local CPU ranks.

    python examples/train_moe.py                         # Mixtral-style, dp=2 x ep=2
    python examples/train_moe.py --family qwen3_moe --dp 4 --ep 2 --distributed-optimizer
    python examples/train_moe.py --dp 2 --ep 2 --tp 2 --steps 30

The model is a Hugging Face MoE family as transformers ships it (``--family``: mixtral,
qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, granitemoe, ...), a tiny config of its
own config class (the model zoo's shrinking rule: hidden 64, 2 layers, 4 experts, top-2),
random weights, nothing downloaded; the byte corpus of train_gpt. ``--ep`` splits the
routed experts over ep of the dp ranks (ep divides dp); tokens reach their experts by
all-to-all (passes/expert_parallel.py). The summary says how many bytes of expert weights
each rank holds against the whole model's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402
from examples import _common  # noqa: E402


def build(family: str):
    import transformers as T
    from benchmarks import zoo_models
    T.logging.set_verbosity_error()
    cfg = zoo_models.tiny_config(zoo_models.ALIASES.get(family, family))
    cfg.vocab_size = _common.VOCAB
    torch.manual_seed(0)   # every rank builds the same model
    model = T.AutoModelForCausalLM.from_config(cfg).float().train()
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def train(args) -> dict:
    pm = ptdp.parallelize(build(args.family), dp=args.dp, ep=args.ep, tp=args.tp, pp=args.pp,
                          microbatches=args.microbatches, codegen=args.codegen,
                          distributed_optimizer=args.distributed_optimizer)
    pm.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0, max_grad_norm=1.0)
    data = _common.batches(_common.corpus(), args.batch, args.seq, seed=1)
    losses, t0 = [], None
    for step in range(args.steps):
        x, _ = next(data)
        x = pm.dp_shard(x)
        losses.append(float(pm.train_step(input_ids=x, labels=x)))
        pm.step()
        if step == 0:
            t0 = time.perf_counter()   # after compiling
        if dist.get_rank() == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.3f}", flush=True)
    experts = pm._expert_names or set()
    local = sum(p.numel() * p.element_size() for n, p in pm.named_parameters() if n in experts)
    whole = sum(torch.Size(s).numel() * 4 for n, s in pm._full_shapes.items() if n in experts)
    return {"losses": losses, "expert_bytes": local, "expert_bytes_whole": whole,
            "s_per_step": (time.perf_counter() - t0) / max(1, args.steps - 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", default="mixtral")
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--distributed-optimizer", action="store_true", help="ZeRO-1 over dp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--codegen", default="aot_eager", choices=["inductor", "aot_eager"])
    args = p.parse_args(argv)
    world = args.dp * args.tp * args.pp
    r0 = ptdp.launch(train, args, world_size=world, timeout=900)[0]
    print(f"{args.family}: loss {r0['losses'][0]:.3f} -> {r0['losses'][-1]:.3f} over "
          f"{args.steps} steps on {world} CPU ranks (dp={args.dp} ep={args.ep} tp={args.tp} "
          f"pp={args.pp}); expert weights per rank {r0['expert_bytes'] / 1e3:.0f} kB of "
          f"{r0['expert_bytes_whole'] / 1e3:.0f} kB; {r0['s_per_step']:.2f} s/step")
    if not r0["losses"][-1] < r0["losses"][0]:
        sys.exit("training did not reduce the loss")
    return r0


if __name__ == "__main__":
    main()

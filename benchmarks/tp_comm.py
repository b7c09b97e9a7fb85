"""Bytes moved per step by the tensor-parallel collectives vs Megatron's formula.

For each t in {2, 4}, with and without sequence parallelism, the project GPT is compiled
with 1 and with 2 decoder layers and trained one step; the activation collectives' bytes
(sent by one rank, ring model, fp32) of the 2-layer step minus those of the 1-layer step
are one decoder layer's forward + backward traffic per microbatch. Megatron's analysis
gives 8·b·s·h·(t−1)/t elements per layer per microbatch (4 all-reduces of b·s·h, or
4 all-gathers + 4 reduce-scatters with SP); the ratio must be 1.00.

Measurement: every ``ptdp::`` collective op (collectives.py) adds the bytes its ring
algorithm sends from this rank to ``collectives.STATS`` when it runs; parameter-gradient
reductions under SP (norm weights, biases) are tallied apart, as Megatron does them apart.

    python benchmarks/tp_comm.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402

B, S, H, V, HEADS = 4, 32, 64, 256, 4


def job(t, sp):
    from examples.models.gpt import GPT, GPTConfig
    from ptdp_compiler import collectives as C
    acts = []
    params = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=V, block_size=S, n_layer=layers, n_head=HEADS, n_embd=H))
        pm = ptdp.parallelize(model, tp=t, sequence_parallel=sp, codegen="aot_eager")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, V, (B, S), generator=g)
        tgt = torch.randint(0, V, (B, S), generator=g)
        pm.train_step(ids, targets=tgt)          # compile
        C.reset_stats()
        pm.train_step(ids, targets=tgt)          # measured step
        acts.append(sum(v for (kind, tag), v in C.STATS.items() if tag == "act"))
        params.append(sum(v for (kind, tag), v in C.STATS.items() if tag == "param"))
    return acts[1] - acts[0], params[1] - params[0]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for t in (2, 4):
        with ptdp.LocalWorld(t) as w:
            for sp in (False, True):
                measured, param_bytes = w.run(job, t, sp, timeout=600)[0]
                formula = 8 * B * S * H * (t - 1) / t * 4    # elements × 4 bytes (fp32)
                rows.append({"config": f"gpt b={B} s={S} h={H} fp32, one decoder layer",
                             "t": t, "sequence_parallel": sp, "measured_bytes": int(measured),
                             "formula_bytes": int(formula),
                             "ratio": round(measured / formula, 4),
                             "param_grad_bytes": int(param_bytes)})
    print(f"{'t':>2} {'SP':>5} {'measured B':>12} {'formula B':>12} {'ratio':>6} "
          f"{'norm/bias grad B':>16}")
    for r in rows:
        print(f"{r['t']:>2} {str(r['sequence_parallel']):>5} {r['measured_bytes']:>12} "
              f"{r['formula_bytes']:>12} {r['ratio']:>6.2f} {r['param_grad_bytes']:>16}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "tp_comm", "device": "cpu (gloo)", "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

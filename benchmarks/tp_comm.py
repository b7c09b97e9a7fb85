"""Bytes the tensor-parallel collectives moved per step vs Megatron's formula.

For each t in {2, 4}, with and without sequence parallelism, the project GPT is compiled
with 1 and with 2 decoder layers and trained one step (one microbatch) on t gloo ranks.
The bytes are read from what the process group ran during the measured step: the torch
profiler's ``c10d::*`` events (the collective the group was handed, with its tensors'
shapes) paired with the ``gloo:*`` events (the work gloo ran for it, with its buffer's
shape and dtype) — ``benchmarks/pg_traffic.py``. Nothing is computed from the model's
sizes except the formula it is compared with. Each op is counted twice, as the bytes one
rank sends under a ring of t ranks:

- ``gloo_bytes``: the work gloo actually ran. gloo has no reduce-scatter: it runs an
  all-reduce of the full-size input (2(t−1)/t·n sent instead of (t−1)/t·n);
- ``measured_bytes``: the collective asked for, as NCCL's ring runs it (all-reduce
  2(t−1)/t·n, all-gather (t−1)·n_local, reduce-scatter (t−1)/t·n_full).

One decoder layer's forward + backward traffic is the 2-layer step minus the 1-layer
step. Megatron's analysis gives 8·b·s·h·(t−1)/t elements per layer per microbatch:

- tensor parallel: 4 all-reduces of b·s·h (2 forward g, 2 backward f);
- with sequence parallelism: 4 all-gathers + 4 reduce-scatters of b·s·h.

``measured_bytes`` / ``gloo_bytes`` are that per-layer difference for those activation
collectives (all-reduces without SP; all-gathers + reduce-scatters with SP); ``ratio``
(NCCL's count / the formula) must be 1.00; ``gloo_ratio`` is what this CPU run moved
(1.50 with SP: its reduce-scatters are all-reduces). A collective's phase is "backward"
when it ran inside an autograd engine function. Reported apart, as Megatron's formula
leaves them out:

- ``regather_bytes`` (SP): Megatron-SP stores only the sequence shard of a column-parallel
  linear's input and all-gathers it again in backward for the weight gradient (the
  recompute pass does the same). Backward all-gathers are the mirrors of the forward
  reduce-scatters (same bytes) plus these re-gathers, so re-gathers = backward
  all-gather bytes − forward reduce-scatter bytes (NCCL count);
- ``param_grad_bytes``: the per-layer growth of the one bucketed all-reduce that sums the
  gradients of the replicated parameters acting on the sequence shard under SP (two
  LayerNorms' weights and biases: 4·h per layer; the row-parallel biases need none, their
  gradient is summed from the all-gathered output gradient, ``ptdp::sp_scatter_bias``);
- ``outside_layers_bytes``: everything else in the step (NCCL count) — the vocab-parallel
  embedding's all-reduce / reduce-scatter, the LM head's input gather, the vocab-parallel
  cross-entropy's max / sum-exp / target-logit all-reduces, the position embedding's
  gradient, and the bucket's non-layer part.

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
from benchmarks.pg_traffic import ProcessGroupTraffic  # noqa: E402

B, S, H, V, HEADS = 4, 32, 64, 256, 4


def job(t, sp, b=B, s=S, h=H, v=V, heads=HEADS, sp_regather=True):
    """On every rank: the tp traffic of one step, for 1 and 2 decoder layers."""
    from examples.models.gpt import GPT, GPTConfig
    steps = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=v, block_size=s, n_layer=layers, n_head=heads,
                              n_embd=h))
        pm = ptdp.parallelize(model, tp=t, sequence_parallel=sp, sp_regather=sp_regather,
                              codegen="aot_eager")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, v, (b, s), generator=g)
        tgt = torch.randint(0, v, (b, s), generator=g)
        pm.train_step(ids, targets=tgt)          # capture + compile (not measured)
        with ProcessGroupTraffic(t) as traffic:
            pm.train_step(ids, targets=tgt)      # the measured step
        steps.append(traffic)
    keys = {(o["kind"], o["phase"]) for st in steps for o in st.ops}

    def per_layer(field):
        one, two = steps[0].totals(field), steps[1].totals(field)
        return {k: two.get(k, 0) - one.get(k, 0) for k in keys}
    layer = {f: per_layer(f) for f in ("nccl_bytes", "gloo_bytes", "payload_bytes")}
    count = {k: sum(1 for o in steps[1].ops if (o["kind"], o["phase"]) == k)
             - sum(1 for o in steps[0].ops if (o["kind"], o["phase"]) == k) for k in keys}

    def kind(k, phase=None, field="nccl_bytes"):
        return sum(n for (kk, ph), n in layer[field].items() if kk == k and phase in (None, ph))
    regather = kind("all_gather", "backward") - kind("reduce_scatter", "forward") if sp else 0
    param = kind("all_reduce") if sp else 0

    def act(field):
        if not sp:
            return kind("all_reduce", field=field)
        return kind("all_gather", field=field) + kind("reduce_scatter", field=field) - regather
    nccl, gloo = act("nccl_bytes"), act("gloo_bytes")
    outside = steps[0].total("nccl_bytes") - nccl - param - regather
    formula = 8 * b * s * h * (t - 1) / t * 4    # elements × 4 bytes (fp32)
    return {"config": f"gpt b={b} s={s} h={h} fp32, one decoder layer, one microbatch",
            "t": t, "sequence_parallel": sp, "formula_bytes": int(formula),
            "measured_bytes": int(nccl), "ratio": round(nccl / formula, 4),
            "gloo_bytes": int(gloo), "gloo_ratio": round(gloo / formula, 4),
            "regather_bytes": int(regather), "param_grad_bytes": int(param),
            "outside_layers_bytes": int(outside),
            "step_gloo_bytes": int(steps[1].total("gloo_bytes")),
            "step_nccl_bytes": int(steps[1].total("nccl_bytes")),
            "per_layer_by_kind": {
                f"{k} {ph}": f"{count[(k, ph)]} ops, payload {int(layer['payload_bytes'][(k, ph)])}"
                             f" B, gloo sent {int(layer['gloo_bytes'][(k, ph)])} B, nccl "
                             f"{int(layer['nccl_bytes'][(k, ph)])} B"
                for k, ph in sorted(keys)},
            "source": "torch.profiler c10d::* + gloo:* events of the measured step, rank 0"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for t in (2, 4):
        with ptdp.LocalWorld(t) as w:
            for sp in (False, True):
                rows.append(w.run(job, t, sp, timeout=600)[0])
    print(f"{'t':>2} {'SP':>5} {'formula B':>10} {'NCCL B':>10} {'ratio':>6} {'gloo B':>10} "
          f"{'gloo/f':>6} {'re-gather B':>11} {'norm/bias grad B':>16} {'outside layers B':>16}")
    for r in rows:
        print(f"{r['t']:>2} {str(r['sequence_parallel']):>5} {r['formula_bytes']:>10} "
              f"{r['measured_bytes']:>10} {r['ratio']:>6.2f} {r['gloo_bytes']:>10} "
              f"{r['gloo_ratio']:>6.2f} {r['regather_bytes']:>11} {r['param_grad_bytes']:>16} "
              f"{r['outside_layers_bytes']:>16}")
    print("bytes one rank sends per decoder layer per microbatch, from the profiler's events; "
          "gloo runs each reduce-scatter as a full-size all-reduce")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "tp_comm", "device": "cpu (gloo)", "torch": torch.__version__,
                       "command": "python benchmarks/tp_comm.py --json " + a.json,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

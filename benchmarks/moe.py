"""Expert parallelism: expert bytes per rank, all-to-all bytes per MoE layer vs the formula,
and step time of ep against replicated and tp-sharded experts, in one run.

A Mixtral-style model as transformers ships it (``MixtralForCausalLM``, random init, a small
config: ``--experts`` experts, top-2) is compiled three ways on the same 2 gloo ranks:

- ``replicated``: dp=2, every rank holds every expert (what ptdp did before ep);
- ``ep``: dp=2, ep=2, each rank holds E/2 experts, tokens travel by all-to-all;
- ``tp_experts``: tp=2, every expert's matrices split over the 2 ranks (expert tensor
  parallelism; attention and the dense part are tp-sharded too).

Columns:

- ``expert_bytes_per_rank`` / ``expert_share``: bytes of the routed experts' tensors this
  rank holds, and that over the whole (ep must give 1/ep);
- ``a2a_bytes_per_layer``: bytes one rank sent to the other ranks by the token all-to-alls
  of one MoE layer in one step (forward dispatch + combine and their backward mirrors),
  recorded inside the ops (``expert_dispatch.TRAFFIC``; an uneven all-to-all's splits are
  not visible from outside), mean over ranks and layers; ``formula_bytes``: 2·tokens·top_k·
  h·(ep−1)/ep forward, the same backward (uniform routing: a row leaves its rank with
  probability (ep−1)/ep); ``a2a_ratio`` = measured / formula (≈ 1 up to routing imbalance);
- ``step_ms``: median step (train_step + SGD) over interleaved rounds of the three programs
  in one run (these CPUs are shared and noisy: ratios, not absolute times); ``vs_ep``:
  step_ms / ep's step_ms.

    python benchmarks/moe.py [--json benchmarks/results/moe.json] [--rounds N]
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

LAYOUTS = {"replicated": dict(dp=2), "ep": dict(dp=2, ep=2), "tp_experts": dict(tp=2)}
VOCAB = 256


def _model(a):
    import transformers as T
    T.logging.set_verbosity_error()
    cfg = T.MixtralConfig(vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=a.ffn,
                          num_hidden_layers=a.layers, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=a.experts,
                          num_experts_per_tok=2, max_position_embeddings=a.seq,
                          use_cache=False, attention_dropout=0.0)
    torch.manual_seed(0)
    m = T.MixtralForCausalLM(cfg).float().train()
    m.loss_type = "ForCausalLM"
    return m


def _job(a):
    import torch.distributed as dist
    from ptdp_compiler import expert_dispatch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (a.batch, a.seq), generator=g)
    pms, opts, data = {}, {}, {}
    for name, lay in LAYOUTS.items():
        pm = ptdp.parallelize(_model(a), codegen=a.codegen, **lay)
        x = pm.dp_shard(ids)
        data[name] = x
        opts[name] = torch.optim.SGD(pm.parameters(), lr=1e-3)
        pm.train_step(input_ids=x, labels=x)   # compile
        pms[name] = pm
    experts = pms["ep"]._expert_names
    full = {n: s for n, s in pms["ep"]._full_shapes.items() if n in experts}
    full_bytes = sum(torch.Size(s).numel() * 4 for s in full.values())
    moe_layers = len(pms["ep"].plan.expert_regions)

    def step(name):
        pm = pms[name]
        t0 = time.perf_counter()
        opts[name].zero_grad()
        pm.train_step(input_ids=data[name], labels=data[name])
        opts[name].step()
        return time.perf_counter() - t0

    times = {n: [] for n in LAYOUTS}
    for r in range(a.rounds + 1):
        order = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
        for name in order:
            dt = step(name)
            if r:   # round 0 warms up
                times[name].append(dt)
    expert_dispatch.TRAFFIC = []
    step("ep")
    sent, expert_dispatch.TRAFFIC = sum(expert_dispatch.TRAFFIC), None
    rows = []
    for name, lay in LAYOUTS.items():
        local = sum(p.numel() * p.element_size() for n, p in pms[name].named_parameters()
                    if n in experts)
        rows.append({"layout": name, **{k: lay.get(k, 1) for k in ("dp", "ep", "tp")},
                     "expert_bytes_per_rank": local, "expert_share": local / full_bytes,
                     "step_ms": 1e3 * statistics.median(times[name])})
    return {"rank": dist.get_rank(), "rows": rows, "a2a_bytes": sent,
            "moe_layers": moe_layers, "tokens": data["ep"].numel()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--codegen", default="aot_eager", choices=("aot_eager", "inductor"))
    a = ap.parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    res = ptdp.launch(_job, a, world_size=2)
    top_k, ep = 2, 2
    sent = statistics.mean(r["a2a_bytes"] for r in res) / res[0]["moe_layers"]
    tokens = res[0]["tokens"]
    formula = 2 * (2 * tokens * top_k * a.hidden * (ep - 1) / ep) * 4   # fwd + bwd, fp32
    rows = []
    for i, row in enumerate(res[0]["rows"]):
        row = dict(row)
        row["step_ms"] = statistics.mean(r["rows"][i]["step_ms"] for r in res)
        row["vs_ep"] = row["step_ms"] / statistics.mean(r["rows"][1]["step_ms"] for r in res)
        if row["layout"] == "ep":
            row.update(a2a_bytes_per_layer=round(sent), formula_bytes=round(formula),
                       a2a_ratio=sent / formula, tokens_per_rank=tokens)
        rows.append(row)
    cols = ["layout", "dp", "ep", "tp", "expert_bytes_per_rank", "expert_share", "step_ms",
            "vs_ep", "a2a_bytes_per_layer", "formula_bytes", "a2a_ratio"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                         for c in cols))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"benchmark": "moe", "device": "cpu (gloo, 2 ranks)",
                       "torch": torch.__version__,
                       "model": {k: getattr(a, k) for k in ("hidden", "ffn", "experts",
                                                            "layers", "seq", "batch")},
                       "codegen": a.codegen, "rounds": a.rounds, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

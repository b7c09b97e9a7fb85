"""``python -m ptdp_compiler plan|calibrate|inspect``.

    python -m ptdp_compiler plan --gpt 175B --gpus 1024 --gpu A100-80GB --global-batch 1536
    python -m ptdp_compiler plan --model my_model.py --gpus 16 --global-batch 64
    python -m ptdp_compiler calibrate --out cluster.json
    python -m ptdp_compiler inspect examples/models/gpt.py --tp 2 --pp 2 --out ptdp_inspect
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def _load_model_file(path: str):
    """A Python file defining ``model`` (an nn.Module) and ``example_inputs`` (tuple), and
    optionally ``example_kwargs`` (dict)."""
    spec = importlib.util.spec_from_file_location("_ptdp_user_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = getattr(mod, "model", None)
    if model is None and hasattr(mod, "build"):
        model = mod.build()
    if model is None:
        raise SystemExit(f"{path} must define `model` (or `build()`) and `example_inputs`")
    return model, tuple(getattr(mod, "example_inputs", ())), dict(getattr(mod, "example_kwargs", {}))


def _gpt_shape(name: str):
    from .planner import GPT_SHAPES
    if name in GPT_SHAPES:
        return GPT_SHAPES[name]
    parts = name.split(",")
    if len(parts) == 3:   # "h,a,l"
        return tuple(int(x) for x in parts)
    raise SystemExit(f"--gpt {name!r}: use one of {sorted(GPT_SHAPES)} or 'hidden,heads,layers'")


def cmd_plan(a) -> int:
    from .planner import Cluster, CostOptions, gpt_model_cost, model_cost, plan
    if a.cluster:
        cl = Cluster.load(a.cluster)
    else:
        per = min(a.gpus, a.gpus_per_node)
        cl = Cluster(nodes=max(1, a.gpus // per), gpus_per_node=per, gpu=a.gpu)
    if a.gpt:
        h, heads, layers = _gpt_shape(a.gpt)
        mc = gpt_model_cost(h, heads, layers, a.seq, a.vocab)
    elif a.model:
        model, args, kwargs = _load_model_file(a.model)
        mc = model_cost(model, args, kwargs)
    else:
        raise SystemExit("give --gpt SIZE or --model FILE.py")
    opts = CostOptions(distributed_optimizer=a.distributed_optimizer,
                       attention="flash" if a.flash else "unfused", dp_overlap=a.dp_overlap)
    r = plan(mc, cluster=cl, global_batch=a.global_batch, options=opts, progress=True,
             memory_limit=a.memory_limit)
    _print_table(r, mc)
    return 0


def _print_table(r, mc):
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(r.explain())
        return
    con = Console(width=max(150, Console().width))
    con.print(f"[bold]{mc.name}[/bold] ({mc.total_params / 1e9:.1f}B params) on "
              f"{r.cluster.name}: {r.num_candidates} legal configurations")
    tab = Table(title="top configurations (simulated)")
    for col in ("#", "t", "p", "d", "v", "b", "m", "SP", "recompute", "step (s)", "samples/s",
                "TFLOP/s/GPU", "MFU", "bubble", "memory GiB"):
        tab.add_column(col, justify="right")
    for i, e in enumerate(r.top):
        c = e.cand
        tab.add_row(str(i + 1), str(c.t), str(c.p), str(c.d), str(c.v), str(c.b), str(c.m),
                    "on" if c.sp else "off", c.recompute, f"{e.step_time:.3f}",
                    f"{e.samples_per_s:.1f}", f"{e.model_tflops_per_gpu:.0f}", f"{e.mfu:.1%}",
                    f"{e.bubble:.1%}", f"{e.memory / 2**30:.1f}")
    con.print(tab)
    if r.memory_prediction is not None:   # the chosen layout's peak per stage, broken down
        con.print("\n".join(r.memory_prediction.lines("")), markup=False)
    con.print(r.explain().split("  rejected:")[1].join(["rejected:", ""]))
    con.print("ParallelConfig:", r.parallel_config_kwargs(), f"microbatch size {r.microbatch_size}")


def cmd_calibrate(a) -> int:
    from .calibrate import calibrate
    calibrate(a.out, a.world)
    return 0


def cmd_inspect(a) -> int:
    """Every rank's transformed graphs, diffs, layer drawing and kernels, with a fake
    process group (no ranks launched)."""
    from .dump import inspect_model, load_model_file
    model, args, kwargs = load_model_file(a.model)
    ranks = range(a.tp * a.pp * a.dp) if a.kernel_ranks == "all" else \
        [int(r) for r in a.kernel_ranks.split(",") if r != ""]
    for d in inspect_model(model, args, kwargs, a.out, tp=a.tp, pp=a.pp, dp=a.dp,
                           virtual_stages=a.virtual_stages,
                           sequence_parallel=a.sequence_parallel, kernel_ranks=tuple(ranks)):
        print(f"{d}: {', '.join(sorted(os.listdir(d)))}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptdp_compiler")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="choose t, p, d, v, b, m, SP and recompute")
    p.add_argument("--gpt", help="standard GPT size (1.7B … 1T, 175B) or 'hidden,heads,layers'")
    p.add_argument("--model", help="Python file defining `model` and `example_inputs`")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="A100-80GB")
    p.add_argument("--cluster", help="cluster JSON (from `calibrate`) instead of --gpu/--gpus")
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--flash", action="store_true", help="fused (flash) attention kernels")
    p.add_argument("--dp-overlap", action="store_true", help="overlap DP all-reduce")
    p.add_argument("--memory-limit", help="bytes per GPU or e.g. '40GiB': no layout over it")
    p.set_defaults(fn=cmd_plan)
    c = sub.add_parser("calibrate", help="measure this machine and write a cluster JSON")
    c.add_argument("--out", default="cluster.json")
    c.add_argument("--world", type=int, default=2)
    c.set_defaults(fn=cmd_calibrate)
    i = sub.add_parser("inspect", help="dump every rank's graphs/kernels (fake process group)")
    i.add_argument("model", help="Python file defining `model` (or build()) and `example_inputs`")
    i.add_argument("--tp", type=int, default=1)
    i.add_argument("--pp", type=int, default=1)
    i.add_argument("--dp", type=int, default=1)
    i.add_argument("--virtual-stages", type=int, default=1)
    i.add_argument("--sequence-parallel", action="store_true")
    i.add_argument("--out", default="ptdp_inspect")
    i.add_argument("--kernel-ranks", default="0",
                   help="ranks whose chunks are compiled by Inductor for kernel source: "
                        "'0,1', 'all' or '' (none)")
    i.set_defaults(fn=cmd_inspect)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

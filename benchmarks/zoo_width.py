"""The share of parameters per rank at a family's published widths.

The model zoo trains tiny configs (hidden 64), where weights of size O(hidden) per layer
(hyper-connection mixing weights, position tables, routers, norm vectors) weigh as much as
the O(hidden²) projections the passes split; at a real width they are noise. This script
takes the placements the passes give the tiny config (rank 0 at tp=2, fake process group,
nothing compiled or trained) and applies each parameter's local fraction to the shapes of
the family's config class defaults (the reference checkpoint's widths), built on the meta
device (nothing allocated). Parameters are matched by name, layer indices wildcarded; a
parameter of the real model with no tiny namesake counts as replicated.

    python benchmarks/zoo_width.py --families deepseek_v4,roc_bert [--sp]
        [--json benchmarks/results/model_zoo.json]   (adds ``share_published`` to the rows)

The numbers are estimates: a split with replicated pieces (multi-query kv heads) keeps
its tiny-config fraction, and a choice that depends on a weight's size is the tiny
config's (RoCBert's glyph table, 10% of the published model, is split by rows only once
it is large: at the published widths ``pm.explain()`` shows it split, this estimate
counts it whole).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_models as Z  # noqa: E402


def fractions(family: str, t: int = 2, sp: bool = False) -> dict:
    """{parameter name: local elements / full elements} on tp rank 0 of the tiny config."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from ptdp_compiler.config import ParallelConfig
    from ptdp_compiler.program import build_program
    from ptdp_compiler.runtime.mesh import build_mesh
    model = Z.build(family)
    args, kwargs = Z.batch(family, 2)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=t)
    try:
        prog = build_program(model, ParallelConfig(tp=t, sequence_parallel=sp),
                             (args, kwargs, None), build_mesh(1, 1, t),
                             dict(model.named_parameters()), until="passes")
    finally:
        dist.destroy_process_group()
    return {n: math.prod(pp.local_shape or pp.full_shape) / max(math.prod(pp.full_shape), 1)
            for n, pp in prog.plan.params.items()}


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def published_model(family: str):
    """The family's model at its config class defaults, on the meta device."""
    import transformers as T
    from transformers import CONFIG_MAPPING
    cfg = CONFIG_MAPPING[Z.ALIASES.get(family, family)]()
    cls = getattr(T, Z.model_class_name(Z.ALIASES.get(family, family)))
    with torch.device("meta"):
        return cls(cfg)


def share_published(family: str, t: int = 2, sp: bool = False) -> dict:
    frac = fractions(family, t, sp)
    by_pattern: dict = {}
    for n, f in frac.items():
        p = _pattern(n)
        by_pattern[p] = max(by_pattern.get(p, 0.0), f)
    total = local = unmatched = 0
    for n, p in published_model(family).named_parameters():
        f = frac.get(n, by_pattern.get(_pattern(n)))
        if f is None:
            unmatched += p.numel()
            f = 1.0
        total += p.numel()
        local += f * p.numel()
    tiny = sum(frac[n] * math.prod(s) for n, s in _tiny_shapes(family).items()) / \
        sum(math.prod(s) for s in _tiny_shapes(family).values())
    return {"share_tiny": round(tiny, 4), "share_published": round(local / total, 4),
            "published_params": total, "unmatched_fraction": round(unmatched / total, 4)}


def _tiny_shapes(family: str) -> dict:
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Z.build(family).named_parameters()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", required=True)
    ap.add_argument("--sp", action="store_true", help="sequence_parallel=True placements")
    ap.add_argument("--json", default=None, help="model_zoo JSON to add the column to")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers as T
    T.logging.set_verbosity_error()
    layout = "tp2sp" if a.sp else "tp2"
    out = {}
    print(f"{'family':22} {'tiny':>7} {'published':>10} {'params':>10} {'unmatched':>9}")
    for fam in [f for f in a.families.split(",") if f]:
        try:
            r = share_published(fam, sp=a.sp)
        except Exception as e:   # a refused family, or a config the meta device rejects
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        out[fam] = r
        if "error" in r:
            print(f"{fam:22} {r['error']}")
        else:
            print(f"{fam:22} {r['share_tiny']:7.3f} {r['share_published']:10.3f} "
                  f"{r['published_params'] / 1e9:9.2f}B {r['unmatched_fraction']:9.3f}")
    if a.json:
        from model_zoo import reason
        with open(a.json) as f:
            doc = json.load(f)
        for row in doc.get("rows", []):
            r = out.get(row["family"])
            cell = row.get("layouts", {}).get(layout)
            if r is not None and "error" not in r and cell is not None:
                cell["share_published"] = r["share_published"]
                row["reason"] = reason(row["layouts"])
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return out


if __name__ == "__main__":
    main()

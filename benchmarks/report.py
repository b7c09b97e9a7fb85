"""Regenerate the README's results section from the benchmarks' JSON files.

Each benchmark writes ``benchmarks/results/<name>.json`` as
``{"benchmark": name, "device": ..., "torch": ..., "rows": [...]}`` (an optional
``"command"`` says how it was produced). This script renders one table per file,
with the command that reproduces it, and replaces the text between

    <!-- results:begin -->   and   <!-- results:end -->

in README.md. A known benchmark without a JSON file is listed as "not yet measured";
a JSON file of a benchmark not listed here still gets a table. Row keys are not
assumed: columns are the union of the rows' keys (a benchmark's preferred columns
first), and values that are not scalars are left out of the table.

    python -m benchmarks.report [--readme README.md] [--results benchmarks/results] [--print]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (title, what it checks, preferred columns first). Order is the README's order.
KNOWN = {
    "tp_comm": ("Tensor-parallel communication vs Megatron's formula",
                "bytes per decoder layer per microbatch, measured / 8·b·s·h·(t−1)/t",
                ["t", "sequence_parallel", "measured_bytes", "formula_bytes", "ratio"]),
    "activation_memory": ("Activation memory vs Korthikanti et al. 2022",
                          "saved-for-backward bytes per layer, measured / the paper's formula",
                          ["config", "t", "sequence_parallel", "recompute"]),
    "pipeline": ("Pipeline bubble vs (p−1)/(v·m)",
                 "idle fraction of the measured schedule vs the formula", ["config"]),
    "planner_table1": ("Planner vs Narayanan et al. 2021 Table 1",
                       "predicted TFLOP/s per GPU of the published configurations", []),
    "compile_time": ("Compile-time scaling", "capture + passes + codegen seconds vs model size",
                     []),
    "reliability": ("Reliability", "failure handling: named errors, no hangs", []),
    "vs_torch_native": ("CPU ratio vs PyTorch's native stack (DTensor TP + pipelining)",
                        "seconds per step (median, after warm-up), native / ptdp (> 1: ptdp "
                        "faster; the median of the runs in ratio_runs); bytes sent per step, all ranks; model lines changed",
                        ["model", "config", "status", "ptdp_s", "native_s", "ratio",
                         "ratio_runs", "ptdp_bytes", "native_bytes", "loss_diff", "native_model_lines",
                         "ptdp_model_lines"]),
    "comm_reorder": ("Inductor comm/compute reordering (comm_reorder=True)",
                     "tp=2 + SP step time with reordering off / on in one run (speedup_on > 1: "
                     "reordering faster), which collectives moved (fwd/bwd: op×count) and the "
                     "compute nodes between each collective and its wait, off → on. On CPU "
                     "gloo there is little to hide; it is meant for async NCCL on GPUs",
                     ["config", "width", "step_ms_off", "step_ms_on", "speedup_on", "moved",
                      "collectives", "overlap_nodes_off", "overlap_nodes_on", "moved_ops"]),
    "gpu_throughput": ("GPU throughput / MFU (one H100, tp = pp = 1, selective recompute)",
                       "GPT h=4096, 32 heads, s=2048, bf16; one step = zero grads, forward, "
                       "loss, backward; modes timed in alternating rounds of one run (median). "
                       "mfu: model FLOPs (Korthikanti 72·B·s·l·h²(…)) / 989 TFLOP/s; "
                       "tflops_paper: Narayanan's 96·… count; targets MFU ≥ 55% and ≥ 1.0× "
                       "torch.compile", ["model", "mode", "tflops", "mfu", "vs_torch_compile",
                                         "step_ms", "step_gib", "loss", "device"]),
}


def default_command(name: str) -> str:
    return f"python benchmarks/{name}.py --json benchmarks/results/{name}.json"


def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def columns(rows: list, preferred: list) -> list:
    """Preferred columns that occur, then every other scalar-valued key in first-seen order."""
    seen: list = []
    for r in rows:
        for k, v in r.items():
            if k not in seen and _scalar(v):
                seen.append(k)
    nonscalar = {k for r in rows for k, v in r.items() if not _scalar(v)}
    return [c for c in preferred if c in seen] + [c for c in seen
                                                  if c not in preferred and c not in nonscalar]


def table(rows: list, preferred: list) -> str:
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return "_no rows_"
    cols = columns(rows, preferred)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def load(results_dir: str) -> dict:
    """{name: parsed JSON or an error string} for every *.json in ``results_dir``."""
    found = {}
    if not os.path.isdir(results_dir):
        return found
    for fn in sorted(os.listdir(results_dir)):
        if not fn.endswith(".json"):
            continue
        path = os.path.join(results_dir, fn)
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
                raise ValueError("expected an object with a 'rows' list")
        except (OSError, ValueError) as e:
            data = f"unreadable ({e})"
        name = data.get("benchmark", fn[:-5]) if isinstance(data, dict) else fn[:-5]
        found[str(name)] = data
    return found


def render(results_dir: str) -> str:
    data = load(results_dir)
    names = list(KNOWN) + sorted(n for n in data if n not in KNOWN)
    rel = os.path.relpath(results_dir, ROOT) if os.path.isabs(results_dir) else results_dir
    parts = [f"_Generated by `python -m benchmarks.report` from `{rel}/*.json`; "
             "do not edit by hand._", ""]
    missing = []
    for name in names:
        title, what, preferred = KNOWN.get(name, (name, "", []))
        d = data.get(name)
        if d is None:
            missing.append(f"- {title} — `{default_command(name)}`")
            continue
        parts.append(f"### {title}")
        parts.append("")
        if isinstance(d, str):
            parts += [f"`{rel}/{name}.json`: {d}", ""]
            continue
        cmd = d.get("command") or default_command(name)
        meta = ", ".join(f"{k} {fmt(d[k])}" for k in ("device", "torch") if k in d)
        parts.append(f"`{cmd}`" + (f" ({meta})" if meta else ""))
        parts.append("")
        if what:
            parts += [what + ".", ""]
        if d.get("note"):
            parts += [fmt(d["note"]), ""]
        parts += [table(d["rows"], preferred), ""]
    if missing:
        parts += ["### Not yet measured", ""] + missing + [""]
    return "\n".join(parts).rstrip() + "\n"


def update_readme(readme: str, section: str) -> str:
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: needs the markers {BEGIN} ... {END} (in this order)")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{section}{END}{tail}"
    with open(readme, "w") as f:
        f.write(new)
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--print", action="store_true", help="print the section, leave README alone")
    a = ap.parse_args(argv)
    section = render(a.results)
    if a.print:
        sys.stdout.write(section)
    else:
        update_readme(a.readme, section)
        print(f"updated {a.readme} ({section.count('### ')} sections)")
    return section


if __name__ == "__main__":
    main()

"""Regenerate the README's results section from the benchmarks' JSON files.

Each benchmark writes ``benchmarks/results/<name>.json`` as
``{"benchmark": name, "device": ..., "torch": ..., "rows": [...]}`` (an optional
``"command"`` says how it was produced). This script renders one table per file,
with the command that reproduces it, and replaces the text between

    <!-- results:begin -->   and   <!-- results:end -->

in docs/benchmarks.md (``--readme FILE``: in FILE instead). A known benchmark without a
JSON file is listed as "not yet measured";
a JSON file of a benchmark not listed here still gets a table. Row keys are not
assumed: columns are the union of the rows' keys (a benchmark's preferred columns
first), and values that are not scalars are left out of the table.

The README's prose quotes figures from these tables (a range of ratios, a worst error);
each such figure is written as ``<!-- fig:NAME -->text<!-- /fig -->`` and ``text`` is
recomputed from the same JSON by ``FIGURES[NAME]``, so prose and tables cannot drift. A
figure whose JSON is missing keeps its text and is reported; an unknown NAME is an error.
Figures are filled in README.md and every docs/*.md (``FIGURE_FILES``).

    python -m benchmarks.report [--readme FILE] [--results benchmarks/results] [--print]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (title, what it checks, preferred columns first). Order is the README's order.
KNOWN = {
    "tp_comm": ("Tensor-parallel communication vs Megatron's formula",
                "bytes one rank sends per decoder layer per microbatch, read from the "
                "profiler's c10d / gloo events of the step (benchmarks/pg_traffic.py), vs "
                "8·b·s·h·(t−1)/t: measured_bytes counts each collective the group ran as NCCL's "
                "ring sends it, "
                "gloo_bytes what gloo sent (gloo runs a reduce-scatter as a full-size "
                "all-reduce)",
                ["t", "sequence_parallel", "formula_bytes", "measured_bytes", "ratio", "gloo_bytes",
                 "gloo_ratio"]),
    "activation_memory": ("Activation memory vs Korthikanti et al. 2022",
                          "saved-for-backward bytes per layer measured from outside "
                          "(saved_tensors_hooks around pm.train_step, parameters excluded, "
                          "(4 layers − 2 layers) / 2) / the paper's formula; rng_state_bytes: "
                          "the part that is generator state replayed by recomputed dropouts",
                          ["config", "t", "sequence_parallel", "recompute",
                           "recompute_pointwise", "formula_bytes", "measured_bytes", "ratio",
                           "rng_state_bytes"]),
    "memory_model": ("Peak memory per rank: predicted before the first step vs measured",
                     "planner/memory.py's prediction (pm.predict_memory() after compile: trial "
                     "partitions of this rank's chunks, no step run) vs an allocation tracker "
                     "over step 2 (train_step + pm.step(), AdamW; TorchDispatchMode counting "
                     "live storages, training state adopted), the busiest rank of each; "
                     "GPT 4 layers h=128 s=128, aot_eager, CPU",
                     ["config", "world", "predicted_peak_bytes", "measured_peak_bytes",
                      "error"]),
    "pipeline": ("Pipeline bubble vs (p−1)/(v·m)",
                 "idle fraction of the measured schedule vs the formula", ["config"]),
    "planner_table1": ("Planner vs Narayanan et al. 2021 Table 1",
                       "predicted TFLOP/s per GPU of the published configurations", []),
    "compile_time": ("Compile-time scaling", "capture + passes + codegen seconds vs model size",
                     []),
    "reliability": ("Reliability", "failure handling: named errors, no hangs", []),
    "vs_torch_native": ("CPU ratio vs PyTorch's native stack (DTensor TP + pipelining, eager "
                        "and torch.compile'd)",
                        "seconds per step (median of interleaved rounds, after warm-up) of ptdp, "
                        "the native stack in eager and the native stack with torchtitan's "
                        "per-block torch.compile; ratio_eager = native eager / ptdp, "
                        "ratio_compiled = native compiled / ptdp (> 1: ptdp faster); bytes sent "
                        "per step, all ranks; model lines changed",
                        ["model", "config", "status", "ptdp_s", "native_eager_s",
                         "native_compiled_s", "ratio_eager", "ratio_compiled",
                         "ratio_eager_runs", "ratio_compiled_runs", "ptdp_bytes",
                         "native_eager_bytes", "native_compiled_bytes", "loss_diff",
                         "compiled_loss_diff", "native_model_lines", "ptdp_model_lines"]),
    "comm_reorder": ("Inductor comm/compute reordering (comm_reorder=True)",
                     "tp=2 + SP step time with reordering off / on in one run (speedup_on > 1: "
                     "reordering faster), which collectives moved (fwd/bwd: op×count) and the "
                     "compute nodes between each collective and its wait, off → on. On CPU "
                     "gloo there is little to hide; it is meant for async NCCL on GPUs",
                     ["config", "width", "step_ms_off", "step_ms_on", "speedup_on", "moved",
                      "collectives", "overlap_nodes_off", "overlap_nodes_on", "moved_ops"]),
    "model_zoo": ("Model zoo: every causal-LM family of transformers, unmodified",
                  "tiny random config of each family's own config class, 2 SGD steps against "
                  "the same model on one device; per layout: ok (loss and every gradient "
                  "match) / refused (a named error) / mismatch / crash, and the largest share "
                  "of the parameters one rank holds (ok 0.50: fully sharded at tp=2). "
                  "tp2pp2 runs on a subset; full messages, errors per step and warnings in "
                  "the JSON",
                  ["family", "kind", "params", "tp2", "tp2sp", "pp2", "tp2pp2", "reason"]),
    "train_hf": ("examples/train_hf.py: Hugging Face families trained at dp=2 × tp=2 × pp=2",
                 "a tiny config of each family's own transformers class (the model zoo's), "
                 "the byte corpus of train_gpt (2.5 kB: the loss falls towards memorising "
                 "it), AdamW lr 3e-3, 8 gloo ranks on 2 shared CPU cores, Inductor; "
                 "first10_mean / last10_mean: mean loss of the first / last ten steps",
                 ["family", "layout", "steps", "status", "first_loss", "last_loss",
                  "first10_mean", "last10_mean", "tokens_per_s", "first_step_s", "error"]),
    "context_parallel": ("Context parallelism (cp): activations, K/V traffic, sequence length",
                         "the project GPT (h=64, 4 heads, B=2, fp32, causal SDPA) on cp gloo "
                         "ranks; act_bytes: bytes autograd saves in one pm.train_step "
                         "(saved_tensors_hooks, parameters excluded), rank 0; act_ratio vs "
                         "ideal 1/cp; kv_bytes_per_layer: what one rank sends in the cp "
                         "all-gathers / reduce-scatters of one layer (profiler c10d/gloo "
                         "events, NCCL ring bytes; 2-layer minus 1-layer step) vs kv_formula "
                         "= 3·2·(cp−1)/cp·B·T·h_kv·d·4; step_ratio: step time / cp=1's (ranks "
                         "share 2 cores); longest_seq: longest sequence (multiple of 64) whose "
                         "act_bytes fit cp=1's at 512 tokens",
                         ["cp", "seq", "act_bytes", "act_ratio", "ideal_ratio",
                          "kv_bytes_per_layer", "kv_formula", "kv_ratio", "step_ms",
                          "step_ratio", "longest_seq", "longest_vs_cp1"]),
    "moe": ("Expert parallelism (ep) vs replicated and tp-sharded experts",
            "a Mixtral-style model from transformers on 2 gloo ranks, three programs stepped in "
            "interleaved rounds of one run: replicated experts (dp=2), ep=2, expert tensor "
            "parallelism (tp=2). expert_share: the routed experts' bytes one rank holds over "
            "the whole (ep: 1/ep); a2a_bytes_per_layer: bytes one rank sent to the others by "
            "the token all-to-alls of one MoE layer in a step (recorded inside the ops) vs "
            "formula_bytes = 2·tokens·top_k·h·(ep−1)/ep forward + the same backward; vs_ep: "
            "step time / ep's",
            ["layout", "dp", "ep", "tp", "expert_bytes_per_rank", "expert_share", "step_ms",
             "vs_ep", "a2a_bytes_per_layer", "formula_bytes", "a2a_ratio"]),
    "fsdp": ("Fully sharded data parallelism (dp_shard) vs PyTorch's FSDP2, eager and compiled",
             "the project GPT (tied embedding / head), fp32, AdamW, on the same gloo CPU ranks "
             "(world = dp_shard = 2, 4), four programs stepped in interleaved rounds of one run: "
             "ptdp dp_shard under Inductor and aot_eager, FSDP2 (fully_shard per block, then "
             "the root: torchtitan's recipe) eager and with each block torch.compile'd. "
             "step_ms: median step (zero grad + forward + backward + AdamW), slowest rank; "
             "vs_fsdp2_eager / vs_fsdp2_compiled = FSDP2's step time / this one's (> 1: faster); "
             "*_min: the same of each one's fastest step, *_cpu: of the median process CPU "
             "time per step (the 2 cores are shared with other jobs: wall times spread 2–5×). "
             "peak_bytes: a malloc interposer's peak over a step (every thread, Inductor's "
             "buffers included) + the training state at its start, max over ranks; "
             "peak_vs_fsdp2 = peak / FSDP2 eager's; peak_fwd_bwd / peak_opt_bytes: the same over "
             "forward + backward / the optimizer step alone; state_bytes: parameters + gradients + "
             "optimizer state per rank, state_share = that / the whole model's (≈ 1/n). "
             "ag_fwd / ag_bwd / rs_bytes: bytes one rank sent per step (profiler c10d / gloo "
             "events, NCCL ring bytes) vs formula_bytes = 3·(n−1)/n·P; FSDP2 re-gathers "
             "neither the root nor the last block in backward; ptdp gathers and "
             "reduce-scatters the tied embedding / head once",
             ["world", "variant", "step_ms", "vs_fsdp2_eager", "vs_fsdp2_compiled",
              "vs_fsdp2_eager_min", "vs_fsdp2_compiled_min", "vs_fsdp2_eager_cpu",
              "vs_fsdp2_compiled_cpu", "peak_bytes", "peak_vs_fsdp2", "peak_fwd_bwd_bytes", "peak_opt_bytes",
              "state_bytes", "state_share", "act_peak_bytes",
              "ag_fwd_bytes", "ag_bwd_bytes", "rs_bytes", "formula_bytes", "bytes_ratio",
              "loss_diff"]),
    "gpu_throughput": ("GPU throughput / MFU (one H100, tp = pp = 1, selective recompute)",
                       "GPT h=4096, 32 heads, s=2048, bf16; one step = zero grads, forward, "
                       "loss, backward; modes timed in alternating rounds of one run (median). "
                       "mfu: model FLOPs (Korthikanti 72·B·s·l·h²(…)) / 989 TFLOP/s; "
                       "tflops_paper: Narayanan's 96·… count; targets MFU ≥ 55% and ≥ 1.0× "
                       "torch.compile", ["model", "mode", "tflops", "mfu", "vs_torch_compile",
                                         "step_ms", "step_gib", "loss", "device"]),
}


# ---- figures the README's prose quotes from the tables ----------------------------------
def _num(x: float, spec: str) -> str:
    return format(x, spec)


def _span(values, spec: str = ".2f", unit: str = "") -> str:
    """"a–b" (or "a" when all round alike) of ``values`` formatted with ``spec``."""
    lo, hi = _num(min(values), spec), _num(max(values), spec)
    return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"


def _pct(x: float) -> str:
    """A percentage with two significant digits (0.027 -> '0.03', 6.96 -> '7.0')."""
    return f"{x:.2f}" if x < 1 else f"{x:.1f}" if x < 10 else f"{x:.0f}"


def _rows(data: dict, **match) -> list:
    return [r for r in data["rows"] if isinstance(r, dict) and not isinstance(r.get("error"), str)
            and all(r.get(k) == v for k, v in match.items())]


def _bubble(d):
    ratios = [r["bubble_measured"] / r["bubble_formula"] for r in _rows(d)
              if r.get("bubble_measured") and r.get("bubble_formula")]
    return _span(ratios, ".2f", "×")


def _activation(d):
    # tp=1 and tp=2+SP with Table 2's exact set (recompute_pointwise=False), the rows the
    # README quotes: |measured / formula − 1| in percent
    devs = [abs(r["ratio"] - 1) * 100 for r in _rows(d)
            if (r["t"] == 1 or (r["t"] == 2 and r["sequence_parallel"]))
            and not r.get("recompute_pointwise", False)]
    return f"{_pct(min(devs))}–{_pct(max(devs))}%"


def _full_recompute(d):
    # recompute="full" measured from outside / 2·s·b·h/t, every t, SP and pointwise setting
    return _span([r["ratio"] for r in _rows(d, recompute="full")], ".2f")


def _memory_error(d):
    return _pct(100 * max(abs(r["error"]) for r in _rows(d))) + "%"


def _gpu(d, key, spec, scale=1.0, unit=""):
    out = []
    for layers in ("l=4", "l=8"):
        row = next(r for r in _rows(d, mode="ptdp") if layers in r["model"])
        out.append(_num(row[key] * scale, spec) + unit + (f" ({layers})" if key == "mfu" else ""))
    return " / ".join(out)


def _native(d, key, configs):
    vals = [r[key] for r in _rows(d, status="measured")
            if r["config"] in configs and r.get(key) is not None]
    return _span(vals, ".2f", "×")


def _fsdp(d, key, variant="ptdp_inductor"):
    return _span([r[key] for r in _rows(d, variant=variant) if r.get(key) is not None],
                 ".2f", "×")


TP_CONFIGS = ("tp2", "tp2_sp", "tp2_pp2")
PP_CONFIGS = ("pp2_1f1b", "pp2_v2_interleaved")

# NAME -> (benchmark whose JSON it reads, function of that JSON -> the text)
FIGURES = {
    "tp_comm_ratio": ("tp_comm", lambda d: _span([r["ratio"] for r in _rows(d)], ".2f")),
    "tp_comm_gloo_sp": ("tp_comm", lambda d: _span(
        [r["gloo_ratio"] for r in _rows(d, sequence_parallel=True)], ".2f")),
    "pipeline_bubble": ("pipeline", _bubble),
    "activation_range": ("activation_memory", _activation),
    "full_recompute_ratio": ("activation_memory", _full_recompute),
    "memory_model_error": ("memory_model", _memory_error),
    "memory_model_configs": ("memory_model", lambda d: str(len(_rows(d)))),
    "planner_table1_error": ("planner_table1", lambda d: _pct(
        100 * max(abs(r["error"]) for r in _rows(d))) + "%"),
    "simulator_error": ("simulator_vs_runtime", lambda d: _pct(
        100 * max(abs(r["error"]) for r in _rows(d))) + "%"),
    "simulator_pairs": ("simulator_vs_runtime", lambda d: str(len(_rows(d)))),
    "compile_48_vs_2": ("compile_time", lambda d: _num(
        next(r["compile_s"] for r in _rows(d, layers=48))
        / next(r["compile_s"] for r in _rows(d, layers=2)), ".2f") + "×"),
    "comm_reorder_moved": ("comm_reorder", lambda d: "{} of {}".format(
        _rows(d)[0]["moved"], _rows(d)[0]["collectives"])),
    "comm_reorder_speedup": ("comm_reorder", lambda d: _span(
        [r["speedup_on"] for r in _rows(d)], ".2f", "×")),
    "gpu_mfu": ("gpu_throughput", lambda d: _gpu(d, "mfu", ".1f", 100, "%")),
    "gpu_vs_compile": ("gpu_throughput", lambda d: _gpu(d, "vs_torch_compile", ".2f",
                                                        unit="×")),
    "native_eager_tp": ("vs_torch_native", lambda d: _native(d, "ratio_eager", TP_CONFIGS)),
    "native_compiled_tp": ("vs_torch_native",
                           lambda d: _native(d, "ratio_compiled", TP_CONFIGS)),
    "native_eager_pp": ("vs_torch_native", lambda d: _native(d, "ratio_eager", PP_CONFIGS)),
    "native_compiled_pp": ("vs_torch_native",
                           lambda d: _native(d, "ratio_compiled", PP_CONFIGS)),
    "native_load": ("vs_torch_native", lambda d: "{} CPUs, 1-minute load average {}".format(
        d["cpus"], _span(d["load_average"], ".0f"))),
    "train_hf_ok": ("train_hf", lambda d: ", ".join(
        r["family"] + ("" if r.get("codegen", "inductor") == "inductor" else
                       f" ({r['codegen']})") for r in _rows(d, status="ok")) or "none"),
    "train_hf_losses": ("train_hf", lambda d: "{} → {}".format(
        _span([r["first10_mean"] for r in _rows(d, status="ok")]),
        _span([r["last10_mean"] for r in _rows(d, status="ok")]))),
    "fsdp_vs_eager": ("fsdp", lambda d: _fsdp(d, "vs_fsdp2_eager")),
    "fsdp_vs_compiled": ("fsdp", lambda d: _fsdp(d, "vs_fsdp2_compiled")),
    "fsdp_peak": ("fsdp", lambda d: _fsdp(d, "peak_vs_fsdp2")),
    "fsdp_bytes": ("fsdp", lambda d: _fsdp(d, "bytes_ratio")),
    "fsdp_fsdp2_bytes": ("fsdp", lambda d: _fsdp(d, "bytes_ratio", "fsdp2_eager")),
}
# where figures are filled (tables go to TABLES_FILE)
FIGURE_FILES = ("README.md", "docs")
TABLES_FILE = os.path.join("docs", "benchmarks.md")
FIGURE = re.compile(r"<!-- fig:([A-Za-z0-9_]+) -->(.*?)<!-- /fig -->", re.S)


def fill_figures(text: str, results_dir: str) -> tuple:
    """(text with every figure recomputed, [figures left as they were, with why])."""
    data, stale = load(results_dir), []

    def one(m):
        name, old = m.group(1), m.group(2)
        if name not in FIGURES:
            raise SystemExit(f"README figure {name!r}: not in benchmarks/report.py FIGURES")
        bench, fn = FIGURES[name]
        d = data.get(bench)
        try:
            if not isinstance(d, dict):
                raise ValueError(f"{bench}.json missing or unreadable")
            new = fn(d)
        except (KeyError, ValueError, StopIteration, ZeroDivisionError) as e:
            stale.append(f"{name}: kept {old!r} ({type(e).__name__}: {e})")
            new = old
        return f"<!-- fig:{name} -->{new}<!-- /fig -->"
    return FIGURE.sub(one, text), stale


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


def update_readme(readme: str, section: str, results_dir: str | None = None) -> str:
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: needs the markers {BEGIN} ... {END} (in this order)")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{section}{END}{tail}"
    new, stale = fill_figures(new, results_dir or os.path.join(ROOT, "benchmarks", "results"))
    for line in stale:
        print(f"{readme}: figure {line}", file=sys.stderr)
    with open(readme, "w") as f:
        f.write(new)
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", help="the file with the tables' markers (default: "
                    "docs/benchmarks.md, and figures in README.md and docs/*.md)")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--print", action="store_true", help="print the section, leave files alone")
    a = ap.parse_args(argv)
    section = render(a.results)
    if a.print:
        sys.stdout.write(section)
        return section
    tables = a.readme or os.path.join(ROOT, TABLES_FILE)
    update_readme(tables, section, a.results)
    print(f"updated {tables} ({section.count('### ')} sections)")
    if a.readme is None:
        for path in figure_files():
            if path != tables:
                update_figures(path, a.results)
    return section


def figure_files() -> list:
    """README.md and every docs/*.md: the files whose prose quotes figures."""
    out = []
    for f in FIGURE_FILES:
        p = os.path.join(ROOT, f)
        if os.path.isdir(p):
            out += sorted(os.path.join(p, x) for x in os.listdir(p) if x.endswith(".md"))
        elif os.path.exists(p):
            out.append(p)
    return out


def update_figures(path: str, results_dir: str) -> None:
    """Recompute the figures of a file without tables."""
    with open(path) as f:
        text = f.read()
    new, stale = fill_figures(text, results_dir)
    for line in stale:
        print(f"{path}: figure {line}", file=sys.stderr)
    if new != text:
        with open(path, "w") as f:
            f.write(new)


if __name__ == "__main__":
    main()

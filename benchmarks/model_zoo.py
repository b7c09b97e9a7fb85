"""Model zoo: every causal-LM family of the installed transformers, compiled as a new user would.

Families are discovered from ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; each gets a tiny random
config of transformers' own config class (``benchmarks/zoo_models.py``: hidden 64, 2
layers, 4 heads, 2 kv heads where the family groups them, 4 experts top-2, vocabulary 128,
dropout 0). A family that cannot train on one CPU device is skipped with the reason
(encoder-decoder, pixel/audio inputs, the single-device step raising).

Every other family is trained ``STEPS`` SGD steps on one device (the specification) and
under each layout, unmodified, with ``ptdp.parallelize(model, ..., codegen="aot_eager")``:

- ``tp2``:    tp=2
- ``tp2sp``:  tp=2, sequence_parallel=True
- ``pp2``:    pp=2, 2 microbatches
- ``tp2pp2``: tp=2 × pp=2, 2 microbatches (a fixed subset, ``--tp2pp2-families``)

Per family and layout: ``status`` is ok (loss and every gradient gathered to full shape
match the single-device model within ``--rtol`` of each tensor's largest entry, or within
``NOISE``× the single-device fp32 run's own error against float64 where the model is so
ill-conditioned that rounding alone exceeds ``--rtol``; the row then says so), refused
(the compiler raised one of its named errors: class and message), mismatch, or crash (any
other exception, a dead rank, or a timeout: "crash: timeout"); ``worst_rel_err`` is the
largest max|g − g_ref| / max|g_ref| over losses and gradients; ``share`` is the largest,
over ranks, of (elements this rank holds) / (elements of the full model). Python warnings
the compiler emits on rank 0 (e.g. for a silently replicated weight) are kept per layout.

The README table shows one row per family: each layout's status and share (``w`` marks a
compiler warning) and the first non-ok layout's reason; the JSON keeps the full messages.

    python benchmarks/model_zoo.py [--families a,b|design|others] [--layouts tp2,tp2sp,pp2,tp2pp2]
        (context parallelism: --layouts cp2,cp4,cp2tp2sp,cp2pp2,cp2dp2)
        [--tp2pp2-families a,b|all] [--timeout 300] [--json PATH [--update]]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402
from benchmarks import zoo_models as Z  # noqa: E402

GB = 4                 # global batch: 2 microbatches of 2 under pp
RTOL = 1e-4            # relative to each tensor's largest entry ...
MAX_MESSAGE = 3000     # characters of an error message kept in the JSON
FLOOR = 1e-3           # ... or to FLOOR x the step's largest gradient entry, if larger
NOISE = 4              # ... or, past rtol, within NOISE x the single-device fp32 run's own error
LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "tp2sp": (2, dict(tp=2, sequence_parallel=True)),
    "pp2": (2, dict(pp=2, microbatches=2)),
    "tp2pp2": (4, dict(tp=2, pp=2, microbatches=2)),
}
# context parallelism (``--layouts cp2,...``; not in the default run)
CP_LAYOUTS = {
    "cp2": (2, dict(cp=2)),
    "cp4": (4, dict(cp=4)),
    "cp2tp2sp": (4, dict(cp=2, tp=2, sequence_parallel=True)),
    "cp2pp2": (4, dict(cp=2, pp=2, microbatches=2)),
    "cp2dp2": (4, dict(cp=2, dp=2)),
}
DEFAULT_LAYOUTS = list(LAYOUTS)
LAYOUTS.update(CP_LAYOUTS)
# tp2 x pp2 on a diverse subset: MHA/GQA/MQA, fused qkv, interleaved rotary, per-head
# norms, soft-capping, ALiBi, MoE, MLA
# a fully tensor-parallel rank holds at most 1.1/t of a tiny model's parameters (issue 18);
# pipeline layouts are not flagged (a tied embedding lives on the first and last stage)
SHARE_LIMIT = {"tp2": 0.55, "tp2sp": 0.55}
TP2PP2_FAMILIES = ["gpt2", "llama", "qwen3", "gemma2", "phi3", "falcon", "bloom", "codegen",
                   "mixtral", "deepseek_v3"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COMPILER_DIRS = tuple(os.path.join(REPO, d) + os.sep
                       for d in ("ptdp_compiler", "passes", "codegen"))


def _compiler_warning(w) -> bool:
    """A warning the compiler raised: its class is ptdp's, or it was issued from the
    compiler's source (or, with a stacklevel, attributed to this benchmark's call)."""
    cat = w.category
    if getattr(cat, "__module__", "").startswith(("ptdp_compiler", "passes", "codegen")):
        return True
    fn = os.path.abspath(w.filename or "")
    return fn.startswith(_COMPILER_DIRS) or fn == os.path.abspath(__file__)


def zoo_job(family: str, cfg: dict, gb: int = GB, steps: int = Z.STEPS, lr: float = Z.LR,
            return_grads_from: int = 0):
    """Run on every rank of a LocalWorld: compile ``family`` with ``cfg``, train ``steps``
    SGD steps, return losses, (on rank ``return_grads_from``) full gradients, this rank's
    parameter elements and the compiler's warnings (rank 0)."""
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = ptdp.parallelize(Z.build(family), codegen="aot_eager", **cfg)
        losses, grads = Z.parallel_sgd(pm, *Z.batch(family, gb), steps, lr)
    seen, warns = set(), []
    for w in caught:
        if _compiler_warning(w):
            text = f"{w.category.__name__}: {w.message}"
            if text not in seen:
                seen.add(text)
                warns.append(text)
    return {"rank": rank, "losses": [float(x) for x in losses],
            "grads": grads if rank == return_grads_from else None,
            "nlocal": sum(p.numel() for p in pm.parameters()),
            "warnings": warns if rank == 0 else []}


def compare(ref_losses, ref_grads, results) -> tuple:
    """(worst relative error, where, problem or None, worst error per step) of every rank's
    losses and rank 0's full gradients against the single-device reference.

    A gradient's error is max|g − g_ref| over max|g_ref|, floored at FLOOR × the largest
    gradient entry of the step: a gradient that is zero in exact arithmetic (e.g. a key
    projection's bias, which softmax cancels) is rounding noise, not a scale."""
    worst, where, problem = 0.0, None, None
    per_step = [0.0] * len(ref_losses)
    for res in results:
        for s, (got, want) in enumerate(zip(res["losses"], ref_losses)):
            want = float(want)
            e = abs(got - want) / max(abs(want), 1e-12)
            per_step[s] = max(per_step[s], e)
            if e > worst:
                worst, where = e, f"rank {res['rank']} step {s} loss"
    grads = next(r["grads"] for r in results if r["grads"] is not None)
    for s, (got, want) in enumerate(zip(grads, ref_grads)):
        if set(got) != set(want):
            missing = sorted(set(want) - set(got))[:3]
            extra = sorted(set(got) - set(want))[:3]
            problem = f"step {s}: gradient names differ (missing {missing}, extra {extra})"
            return float("inf"), None, problem, per_step
        floor = FLOOR * max((w.detach().abs().max().item() for w in want.values()
                             if w.numel()), default=0.0)
        for n, w in want.items():
            g = got[n]
            if tuple(g.shape) != tuple(w.shape):
                return (float("inf"), n, f"{n}: shape {tuple(g.shape)} != {tuple(w.shape)}",
                        per_step)
            w64, g64 = w.detach().double(), g.detach().double()
            scale = max(w64.abs().max().item() if w.numel() else 0.0, floor)
            diff = (g64 - w64).abs().max().item() if w.numel() else 0.0
            e = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
            if not (e <= per_step[s]):   # also catches nan
                per_step[s] = e
            if not (e <= worst):
                worst, where = e, f"step {s} grad {n}"
    return worst, where, problem, per_step


def _error_parts(exc) -> tuple:
    """(exception class, message, named) of a failed run; named: raised on purpose."""
    cause = exc
    if isinstance(exc, ptdp.errors.RankError):
        if exc.__cause__ is not None:
            cause = exc.__cause__
        else:
            cls, _, msg = exc.exc_repr.partition(": ")
            named = cls in {c.__name__ for c in _named_errors()}
            return cls, msg, named
    return type(cause).__name__, str(cause), isinstance(cause, _named_errors()) and not \
        isinstance(cause, (ptdp.errors.RankError, ptdp.errors.WorldTimeoutError))


def _named_errors():
    errs = ptdp.errors
    return (errs.ShardingError, errs.ConfigError, errs.CaptureError, errs.InputShapeError)


class Worlds:
    """One LocalWorld per world size, reused across families; a failed one is replaced."""

    def __init__(self, timeout: float):
        self.timeout, self.worlds = timeout, {}

    def run(self, n, fn, *args):
        w = self.worlds.get(n)
        if w is None or not w.alive:
            w = self.worlds[n] = ptdp.LocalWorld(n, timeout_s=min(self.timeout, 120))
        return w.run(fn, *args, timeout=self.timeout)

    def close(self):
        for w in self.worlds.values():
            try:
                w.close()
            except Exception:
                pass


def fp32_noise(family: str, ref) -> list:
    """Per step, how far the single-device fp32 run itself is from the same run in float64
    (worst relative error, as ``compare`` measures it). Some tiny random models are so
    ill-conditioned after one SGD step that rounding alone moves a gradient by 1e-3..1e-1
    (cpmant, gemma4_unified_text): there a parallel run can only be held to that noise."""
    model = Z.build(family).double()
    args, kwargs = Z.batch(family, GB)
    f64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    losses, grads = Z.sgd(model, tuple(f64(a) for a in args),
                          {k: f64(v) for k, v in kwargs.items()})
    as_result = {"rank": "fp64", "losses": [float(x) for x in losses], "grads": grads}
    return compare(ref[0], ref[1], [as_result])[3]


def run_layout(worlds: Worlds, family: str, layout: str, ref, full: int, rtol: float) -> dict:
    n, cfg = LAYOUTS[layout]
    t0 = time.perf_counter()
    row = {"status": None, "share": None, "worst_rel_err": None, "worst_at": None,
           "error": None, "message": None, "warnings": []}
    try:
        results = worlds.run(n, zoo_job, family, cfg)
    except ptdp.errors.WorldTimeoutError as e:
        row.update(status="crash", error="timeout", message=str(e))
    except Exception as e:   # noqa: BLE001 - every failure is a row
        cls, msg, named = _error_parts(e)
        row.update(status="refused" if named else "crash", error=cls, message=msg)
        if not named:
            row["traceback"] = getattr(e, "traceback", None) or traceback.format_exc()
    else:
        worst, where, problem, per_step = compare(ref[0], ref[1], results)
        row["share"] = round(max(r["nlocal"] for r in results) / full, 4)
        row["worst_rel_err"] = worst if worst != float("inf") else None
        row["worst_at"] = where
        row["rel_err_per_step"] = [e if e != float("inf") else None for e in per_step]
        row["warnings"] = results[0]["warnings"]
        noise = None
        if problem is None and not worst <= rtol:   # rounding, or a real error?
            noise = row["fp32_noise_per_step"] = fp32_noise(family, ref)
        if problem is not None or not worst <= rtol and not all(
                e <= max(rtol, NOISE * n) for e, n in zip(per_step, noise)):
            row.update(status="mismatch",
                       message=problem or f"{where}: relative error {worst:.3g} > {rtol:g}" +
                       (f" (one device, fp32 vs fp64: {max(noise):.3g})" if noise else ""))
        else:
            row["status"] = "ok"
            if noise:
                row["note"] = (f"error {worst:.3g} > {rtol:g}, but within {NOISE}x of the "
                               f"single-device fp32 run's own error vs fp64 "
                               f"({', '.join(f'{n:.2g}' for n in noise)} per step)")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def kind(family: str, cfg) -> str:
    d = cfg.to_dict()
    if getattr(cfg, "is_encoder_decoder", False) or "decoder_layers" in d:
        return "seq2seq decoder"
    if family == "reformer":
        return "decoder"
    if Z.encoder_like(family):
        return "encoder as decoder"
    types = [t for k in Z._PER_LAYER_UNIQUE for t in (d.get(k) or [])
             if isinstance(t, str)]
    recurrent = any(("mamba" in t or "linear" in t or "conv" in t or "recurrent" in t
                     or t in ("mlstm", "slstm", "rwkv")) for t in types) or \
        any(k.startswith(("mamba_", "linear_num", "conv_L")) for k in d)
    moe = any(isinstance(d.get(k), int) and d.get(k) for k in Z._EXPERTS) or \
        isinstance(d.get("ffn_config"), dict) and d["ffn_config"].get("moe_num_experts")
    if family in ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"):
        return "recurrent"
    if recurrent:
        return "hybrid moe" if moe else "hybrid"
    return "moe" if moe else "decoder"


def short(msg: str | None, n: int = 130) -> str:
    """The first line of a message, source paths shortened to file:line, truncated."""
    if not msg:
        return ""
    line = next((ln.strip() for ln in str(msg).splitlines() if ln.strip()), "")
    line = re.sub(r'File "[^"]*?/(?:site-packages|work/main)/(?:transformers/)?(?:models/\w+/)?'
                  r'([^"/]+(?:/[^"/]+)*)", line (\d+), in \w+', r"\1:\2", line)
    line = line.replace("tensor parallelism cannot shard node ", "")
    return line if len(line) <= n else line[: n - 1] + "…"


def cell(r: dict) -> str:
    if r["status"] == "ok":
        sh = r["share"]
        # 3 digits where 2 would round a share over the 0.55 limit down onto it
        txt = f"{sh:.3f}" if 0.545 <= sh < 0.56 and f"{sh:.2f}" == "0.55" else f"{sh:.2f}"
        return f"ok {txt}" + (" w" if r["warnings"] else "")
    if r["status"] == "mismatch":
        return f"mismatch {r['worst_rel_err']:.1g}" if r["worst_rel_err"] else "mismatch"
    if r["status"] == "crash" and r["error"] == "timeout":
        return "crash: timeout"
    return r["status"]


def reason(res: dict) -> str:
    """The first non-ok layout's error, else a share over the limit (with the share at
    the published widths where benchmarks/zoo_width.py measured it), else the first
    compiler warning."""
    bad = next(((lay, r) for lay, r in res.items() if r["status"] != "ok"), None)
    if bad:
        return f"{bad[0]}: " + (f"{bad[1]['error']}: " if bad[1]["error"] else "") + \
            short(bad[1]["message"])
    heavy = [(lay, r) for lay, r in res.items()
             if r["share"] is not None and r["share"] > SHARE_LIMIT.get(lay, 1.0)]
    if heavy:
        return ", ".join(f"{lay} {r['share']:.2f}" + (
            f" ({r['share_published']:.2f} at the published widths)"
            if r.get("share_published") is not None else "") for lay, r in heavy) + \
            " of the parameters per rank; " + (
                short(" ".join(heavy[0][1]["warnings"][0].split()), 130)
                if heavy[0][1]["warnings"] else "part replicated, no warning")
    warned = next(((lay, r) for lay, r in res.items() if r["warnings"]), None)
    if warned:   # a warning's first lines name the weights: keep them on one line
        return f"{warned[0]} warns: " + short(" ".join(warned[1]["warnings"][0].split()), 160)
    return ""


def summarize(rows: list, layouts: list) -> dict:
    out = {}
    for lay in layouts:
        c: dict = {}
        for r in rows:
            st = r["layouts"].get(lay, {}).get("status")
            if st:
                c[st] = c.get(st, 0) + 1
                if st == "ok" and r["layouts"][lay]["share"] > SHARE_LIMIT.get(lay, 1.0):
                    key = f"of them share > {SHARE_LIMIT[lay]}"
                    c[key] = c.get(key, 0) + 1
        out[lay] = c
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="",
                    help="comma-separated model_types, 'design' (the families DESIGN.md "
                         "names), 'others' (the rest, decoders before encoder / seq2seq "
                         "families) or 'rest' (with --update: the others the JSON lacks); "
                         "default all")
    ap.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS))
    ap.add_argument("--tp2pp2-families", default=",".join(TP2PP2_FAMILIES),
                    help="families run at tp2pp2 ('all' for every family)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--rtol", type=float, default=RTOL)
    ap.add_argument("--json", default=None)
    ap.add_argument("--update", action="store_true",
                    help="merge into the existing --json file: rows of the families run here "
                         "are replaced (layouts not run here are kept), other rows stay")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers as T
    T.logging.set_verbosity_error()

    layouts = [x for x in a.layouts.split(",") if x]
    for lay in layouts:
        if lay not in LAYOUTS:
            raise SystemExit(f"unknown layout {lay!r}; known: {', '.join(LAYOUTS)}")
    everything = Z.families()
    if a.families == "design":     # the families DESIGN.md names
        fams = [f for f in Z.DESIGN_FAMILIES if f in everything]
    elif a.families in ("others", "rest"):   # every other family, decoders first
        fams = sorted((f for f in everything if f not in Z.DESIGN_FAMILIES),
                      key=lambda f: (Z.encoder_like(f), f))
        if a.families == "rest" and a.update and a.json and os.path.exists(a.json):
            with open(a.json) as f:   # only the families the JSON has no row for yet
                have = json.load(f)
            have = {r["family"] for r in have.get("rows", [])} | \
                {s["family"] for s in have.get("skipped", [])}
            fams = [f for f in fams if f not in have]
    elif a.families == "none":     # with --update: re-render the JSON only
        fams = []
    elif a.families:
        fams = [Z.ALIASES.get(f, f) for f in a.families.split(",") if f]
        unknown = [f for f in fams if f not in everything]
        if unknown:
            raise SystemExit(f"unknown families {unknown}")
    else:   # the families DESIGN.md names first, then the rest
        fams = [f for f in Z.DESIGN_FAMILIES if f in everything] + \
            [f for f in everything if f not in Z.DESIGN_FAMILIES]
    pp_subset = None if a.tp2pp2_families == "all" else \
        {Z.ALIASES.get(f, f) for f in a.tp2pp2_families.split(",") if f}

    command = "python benchmarks/model_zoo.py " + " ".join(
        x for x in (argv if argv is not None else sys.argv[1:]))
    rows, skipped = [], []
    doc = {"benchmark": "model_zoo", "device": platform.processor() or platform.machine(),
           "torch": torch.__version__, "transformers": T.__version__,
           "command": command.strip(), "layouts": {k: LAYOUTS[k][1] for k in layouts},
           "global_batch": GB, "seq": Z.SEQ, "steps": Z.STEPS, "lr": Z.LR, "rtol": a.rtol,
           "rows": rows, "skipped": skipped}

    old_rows, old_skipped = {}, {}
    if a.update and a.json and os.path.exists(a.json):
        with open(a.json) as f:
            old = json.load(f)
        old_rows = {r["family"]: r for r in old.get("rows", [])}
        old_skipped = {s["family"]: s for s in old.get("skipped", [])}
        for k in old.get("layouts", {}):
            if k in LAYOUTS and k not in doc["layouts"]:
                doc["layouts"][k] = LAYOUTS[k][1]
        doc["command"] = old.get("command", doc["command"]) + " ; " + doc["command"]
    all_layouts = list(doc["layouts"])

    def merged():
        done = {r["family"] for r in rows} | {s["family"] for s in skipped}
        out_rows, out_skipped = [], []
        for fam in ([f for f in Z.DESIGN_FAMILIES if f in everything] +
                    [f for f in everything if f not in Z.DESIGN_FAMILIES]):
            new = next((r for r in rows if r["family"] == fam), None)
            if new is not None:
                prev = old_rows.get(fam)
                if prev is not None:   # keep layouts not run now
                    lays = {**prev.get("layouts", {}), **new["layouts"]}
                    new = {**prev, **new, "layouts": lays}
                    for lay, r in lays.items():
                        new[lay] = cell(r)
                    new["reason"] = reason(lays)
                out_rows.append(new)
            elif fam not in done and fam in old_rows:
                out_rows.append(old_rows[fam])
            sk = next((x for x in skipped if x["family"] == fam), None)
            if sk is None and fam not in done:
                sk = old_skipped.get(fam)
            if sk is not None:
                out_skipped.append(sk)
        return out_rows, out_skipped

    def dump():
        if old_rows or old_skipped:
            doc["rows"], doc["skipped"] = merged()
        for r in doc["rows"]:    # cells and reasons as this version renders them
            for lay, res in r.get("layouts", {}).items():
                msg = res.get("message")
                if isinstance(msg, str) and len(msg) > MAX_MESSAGE:   # e.g. a whole graph
                    res["message"] = msg[:MAX_MESSAGE] + f" … ({len(msg)} characters)"
                r[lay] = cell(res)
            r["reason"] = reason(r.get("layouts", {}))
        summary = summarize(doc["rows"], all_layouts)
        doc["summary"] = summary
        doc["note"] = ("Cells: status and share of parameters per rank (max over ranks; "
                       "w: the compiler warned). " + "; ".join(
                           f"{lay}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items()))
                           for lay, c in summary.items()) +
                       f". {len(doc['rows'])} families train on one device; "
                       f"{len(doc['skipped'])} skipped (reasons in the JSON: " +
                       ", ".join(s["family"] for s in doc["skipped"]) + ")")
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            tmp = a.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, default=str)
            os.replace(tmp, a.json)

    def on_alarm(*_):
        raise TimeoutError(f"the single-device step ran over {a.timeout:.0f} s")
    signal.signal(signal.SIGALRM, on_alarm)

    worlds = Worlds(a.timeout)
    hdr = f"{'family':22} {'kind':18} " + " ".join(f"{lay:>15}" for lay in layouts)
    print(hdr, flush=True)
    try:
        for fam in fams:
            t0 = time.perf_counter()
            if fam in Z.STATIC_SKIPS:
                skipped.append({"family": fam, "reason": Z.STATIC_SKIPS[fam]})
                print(f"{fam:22} skipped: {Z.STATIC_SKIPS[fam]}", flush=True)
                dump()
                continue
            try:
                signal.alarm(int(a.timeout))   # the single-device step must not hang us
                cfg = Z.tiny_config(fam)
                ref = Z.reference(fam, GB)
            except Exception as e:  # noqa: BLE001
                why = f"fails on one device: {type(e).__name__}: {short(str(e), 160)}"
                signal.alarm(0)
                skipped.append({"family": fam, "reason": why})
                print(f"{fam:22} skipped: {why}", flush=True)
                dump()
                continue
            signal.alarm(0)
            full = sum(g.numel() for g in ref[1][0].values())
            row = {"family": fam, "kind": kind(fam, cfg), "params": full}
            res = {}
            for lay in layouts:
                if lay == "tp2pp2" and pp_subset is not None and fam not in pp_subset:
                    continue
                res[lay] = run_layout(worlds, fam, lay, ref, full, a.rtol)
                row[lay] = cell(res[lay])
            row["reason"] = reason(res)
            row["model"] = {"class": Z.model_class_name(fam),
                            "config": type(cfg).__name__}
            row["layouts"] = res
            rows.append(row)
            dump()
            print(f"{fam:22} {row['kind']:18} " +
                  " ".join(f"{row.get(lay, '-'):>15}" for lay in layouts) +
                  f"  {time.perf_counter() - t0:5.0f}s  {row['reason']}", flush=True)
    finally:
        worlds.close()
        dump()
    summary = summarize(rows, layouts)
    print("\nsummary:")
    for lay, c in summary.items():
        print(f"  {lay:8} " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
    print(f"  {len(rows)} families run, {len(skipped)} skipped")
    return doc


if __name__ == "__main__":
    main()

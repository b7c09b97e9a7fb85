"""``examples/train_hf.py`` on several Hugging Face families: does the loss fall?

Each family runs as its own job (``python examples/train_hf.py --family F``, dp=2 × tp=2 ×
pp=2 on 8 local CPU ranks by default, 200 steps, Inductor), one after the other; a row per
family: first and last loss, the means of the first and last ten steps, tokens/s after
the first step and the seconds to the end of the first step (capture + compile).

    python benchmarks/train_hf_families.py --json benchmarks/results/train_hf.json
    python benchmarks/train_hf_families.py --families llama,qwen3 --steps 50 --codegen aot_eager
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = "llama,qwen3,gemma3,mixtral,deepseek_v3,phi3,gpt2"


def first_error(text: str) -> str:
    """The launcher's one-line report of the failing rank (``RankError: rank r failed: ...``),
    else the last exception line; 300 characters."""
    lines = [l for l in text.splitlines() if re.match(r"^[\w.]*(Error|Exception)\w*: ", l)]
    ranked = [l for l in lines if "RankError" in l]
    return (ranked or lines or [text.strip()[-300:]])[0][:300]


def run_family(family: str, a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, os.path.join(ROOT, "examples", "train_hf.py"), "--family", family,
               "--dp", str(a.dp), "--tp", str(a.tp), "--pp", str(a.pp), "--steps", str(a.steps),
               "--codegen", a.codegen, "--json", out] + (["--sequence-parallel"] if a.sp else [])
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT)
            err = "" if p.returncode == 0 else first_error(p.stderr or p.stdout)
        except subprocess.TimeoutExpired:
            err = f"timed out after {a.timeout} s"
        row = {"family": family, "layout": f"dp={a.dp} tp={a.tp} pp={a.pp}" +
               (" sp" if a.sp else ""), "steps": a.steps, "codegen": a.codegen,
               "wall_s": round(time.perf_counter() - t0, 1)}
        if not os.path.exists(out):
            return {**row, "status": "failed", "error": err}
        r = json.load(open(out))
    losses = r["losses"]
    first10, last10 = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    return {**row, "status": "ok" if last10 < first10 else "loss did not fall",
            "model": r["model"], "first_loss": round(losses[0], 3),
            "last_loss": round(losses[-1], 3), "first10_mean": round(first10, 3),
            "last10_mean": round(last10, 3), "tokens_per_s": round(r["tokens_per_s"]),
            "first_step_s": round(r["first_step_s"], 1), "error": err or None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=FAMILIES)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--codegen", default="inductor")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json")
    ap.add_argument("--append", action="store_true", help="add the rows to --json's")
    ap.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD)")
    a = ap.parse_args(argv)
    if a.commit is None:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, cwd=ROOT)
        a.commit = p.stdout.strip() or "unknown"
    rows, commands = [], []
    if a.append and a.json and os.path.exists(a.json):
        with open(a.json) as f:
            old = json.load(f)
        rows, commands = old["rows"], old["command"].split(" && ")
    commands.append("python benchmarks/train_hf_families.py " + " ".join(argv if argv is not None
                                                                        else sys.argv[1:]))
    for fam in a.families.split(","):
        rows.append(run_family(fam, a))
        print(json.dumps(rows[-1]), flush=True)
        if a.json:   # written after every family: a long run keeps what it measured
            import torch
            with open(a.json, "w") as f:
                json.dump({"benchmark": "train_hf", "device": "cpu (gloo, 8 ranks on 2 shared "
                           "cores)", "torch": torch.__version__,
                           "command": " && ".join(commands),
                           "note": f"measured at commit {a.commit}, one job per family, "
                                   "one after the other", "rows": rows},
                          f, indent=1)
    return rows


if __name__ == "__main__":
    main()

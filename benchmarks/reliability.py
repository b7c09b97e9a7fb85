"""Reliability: faults injected into real training runs, what survived, and bad
configurations refused with a named error.

Every row is one scenario, actually run (CPU ranks on gloo, the project GPT, aot_eager):

- ``rank raises`` / ``rank SIGKILLed`` (tp=2, pp=2, a pipeline world of 4 ranks): training
  checkpoints every 2 steps; at step 3 one rank raises or kills itself mid-run. The run
  must stop with ``RankError`` naming that rank (``stopped_s``: seconds from the start of
  the run until the error reached the caller, bounded by the world's timeout), then a
  fresh world resumes from the last checkpoint, continues to the end, and its losses must
  equal those of an uninterrupted run (1e-6): ``runs_recovered`` 1, ``steps_lost`` the
  steps redone, ``checkpoints_verified`` 1.
- ``SIGKILL during save``: a process is killed while writing a checkpoint over an existing
  one; the previous checkpoint must load with its exact parameters, the ``.partial`` is
  ignored.
- ``torchrun --max-restarts=1``: ``examples/train_gpt.py`` on 2 torchrun ranks (pp=2) with
  ``--ckpt-every 3 --resume``, the last rank exiting after step 5 (``--fail-at-step``);
  torchrun stops the other rank and restarts both in place (``restart_count`` 1), they
  resume from the step-3 checkpoint, and their losses must equal an uninterrupted torchrun
  run's (1e-6); ``stopped_s`` is the whole faulty run's wall time. Skipped (reported) when
  torchrun is absent.
- ``bad configuration``: each one tried and expected to raise a named
  ``ptdp_compiler.errors`` exception before any work starts; the row holds the error.

    python benchmarks/reliability.py [--json PATH] [--no-torchrun]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402
from examples.models.gpt import GPT, GPTConfig  # noqa: E402

STEPS, CKPT_EVERY, FAIL_AT = 6, 2, 3
LAYOUT = dict(tp=2, pp=2, microbatches=2)
TOL = 1e-6


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=32))


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 128, (4, 16), generator=g)
    return ids, (ids * 3 + 1) % 128


def _make(seed: int = 0, **overrides):
    pm = ptdp.parallelize(_model(seed), codegen="aot_eager", **{**LAYOUT, **overrides})
    pm.optimizer(torch.optim.AdamW, lr=1e-2, max_grad_norm=1.0)
    return pm


def train_job(ckpt: str, resume: bool, fault: str | None, victim: int):
    """Train to STEPS (checkpointing every CKPT_EVERY), optionally resuming, optionally
    injecting ``fault`` on rank ``victim`` at step FAIL_AT. Returns {step: loss}."""
    import torch.distributed as dist
    pm = _make()
    first = 0
    if resume:
        ids, tgt = _batch(0)
        pm.compile(ids, targets=tgt)
        first = pm.load(ckpt)["next_step"]
    losses = {}
    for step in range(first, STEPS):
        if fault and step == FAIL_AT and dist.get_rank() == victim:
            if fault == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {step}")
        ids, tgt = _batch(step)
        losses[step] = float(pm.train_step(ids, targets=tgt))
        pm.step()
        if (step + 1) % CKPT_EVERY == 0:
            pm.save(ckpt, extra={"next_step": step + 1})
    return losses


def _close_enough(got: dict, want: dict) -> bool:
    return bool(got) and all(abs(got[s] - want[s]) <= TOL * abs(want[s]) for s in got)


def fault_rows(reference: dict, tmp: str) -> list:
    rows = []
    n = LAYOUT["tp"] * LAYOUT["pp"]
    for fault in ("raise", "sigkill"):
        ckpt = os.path.join(tmp, f"ckpt_{fault}")
        victim = 3
        world = ptdp.LocalWorld(n, timeout_s=60)
        t0 = time.time()
        named, err = False, ""
        try:
            world.run(train_job, ckpt, False, fault, victim, timeout=300)
        except ptdp.RankError as e:
            named = e.rank == victim and f"rank {victim}" in str(e)
            err = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        stopped = time.time() - t0
        world.close(force=True)
        last_ckpt = (FAIL_AT // CKPT_EVERY) * CKPT_EVERY
        world = ptdp.LocalWorld(n, timeout_s=120)
        resumed = world.run(train_job, ckpt, True, None, victim, timeout=300)[0]
        world.close()
        ok = named and _close_enough(resumed, reference) and min(resumed) == last_ckpt
        rows.append({"scenario": f"rank {fault} at step {FAIL_AT} (tp=2, pp=2)",
                     "faults_injected": 1, "runs_recovered": int(ok),
                     "steps_lost": FAIL_AT - last_ckpt, "checkpoints_verified": int(ok),
                     "rejected": None, "stopped_s": round(stopped, 1), "error": err})
    return rows


def _slow_save_child(path: str, ready: str):
    import torch.distributed.checkpoint as dcp
    pm = _make(seed=3, tp=1, pp=1)   # nothing compiled: the parameters are saved

    def stall(*a, **k):
        open(ready, "w").close()
        time.sleep(600)
    dcp.FileSystemWriter.write_data = stall
    pm.save(path)


def save_kill_row(tmp: str) -> dict:
    path, ready = os.path.join(tmp, "ckpt_kill"), os.path.join(tmp, "ready")
    pm = _make(tp=1, pp=1)
    pm.save(path, extra={"step": 1})
    saved = pm.full_state_dict()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from benchmarks.reliability import _slow_save_child as f; f(*sys.argv[2:])",
         ROOT, path, ready], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while not os.path.exists(ready) and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    fresh = _make(seed=5, tp=1, pp=1)
    ok = os.path.isdir(path + ".partial") and fresh.load(path) == {"step": 1} and all(
        torch.equal(t, saved[n]) for n, t in fresh.full_state_dict().items())
    return {"scenario": "SIGKILL during checkpoint save", "faults_injected": 1,
            "runs_recovered": int(ok), "steps_lost": 0, "checkpoints_verified": int(ok),
            "rejected": None, "stopped_s": None, "error": ""}


def torchrun_cmd(exe: str, ckpt: str, out: str, steps: int, restarts: int, extra=()) -> list:
    """``examples/train_gpt.py`` on 2 torchrun ranks (pp=2, a tiny GPT, aot_eager)."""
    return [exe, "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}",
            os.path.join(ROOT, "examples", "train_gpt.py"), "--dp", "1", "--tp", "1", "--pp",
            "2", "--microbatches", "2", "--steps", str(steps), "--batch", "4", "--seq", "16",
            "--layers", "2", "--width", "32", "--codegen", "aot_eager", "--ckpt-dir", ckpt,
            "--json", out, "--timeout", "60", *extra]


def run_torchrun(cmd: list, out: str, limit: float = 150):
    """(exit code, stderr tail, rank 0's JSON or None); a run past ``limit`` is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, err = proc.communicate(timeout=limit)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        proc.communicate()
        code, err = 124, f"timed out after {limit:.0f} s"
    res = json.load(open(out)) if os.path.exists(out) else None
    return code, (err or "").strip()[-300:], res


def torchrun_row(tmp: str) -> dict:
    """One uninterrupted torchrun run, then one whose last rank exits after step FAIL under
    ``--max-restarts=1``: torchrun restarts both workers in place (ranks > 0 start 2 s late,
    the skew that used to make the restarted gloo group read the dead attempt's addresses),
    they resume from the step-EVERY checkpoint, and their losses must equal the
    uninterrupted run's from there on (1e-6)."""
    row = {"scenario": "torchrun --max-restarts=1, in-place restart resumes (pp=2)",
           "faults_injected": 0, "runs_recovered": 0, "steps_lost": 0,
           "checkpoints_verified": 0, "rejected": None, "stopped_s": None, "error": ""}
    exe = shutil.which("torchrun")
    if exe is None:
        row["error"] = "torchrun not found: not run"
        return row
    steps, every, fail = 8, 3, 5
    out = os.path.join(tmp, "clean.json")
    code, err, clean = run_torchrun(torchrun_cmd(exe, os.path.join(tmp, "clean_ckpt"), out,
                                                 steps, restarts=0), out)
    if code != 0 or clean is None:
        row["error"] = f"uninterrupted run: exit {code}: {err[-120:]}"
        return row
    out = os.path.join(tmp, "faulty.json")
    t0 = time.time()
    code, err, faulty = run_torchrun(torchrun_cmd(
        exe, os.path.join(tmp, "faulty_ckpt"), out, steps, restarts=1,
        extra=["--ckpt-every", str(every), "--resume", "--fail-at-step", str(fail),
               "--restart-skew", "2"]), out)
    row["faults_injected"] = 1
    row["stopped_s"] = round(time.time() - t0, 1)  # the whole run, restart included
    last = (fail // every) * every
    if code != 0 or faulty is None:
        row["error"] = f"exit {code}: {err.splitlines()[-1] if err else 'no output'}"[:160]
        return row
    got, want = faulty["losses"], clean["losses"][faulty["first_step"]:]
    same = len(got) == len(want) and all(abs(a - b) <= TOL * abs(b) for a, b in zip(got, want))
    in_place = faulty["restart_count"] == 1 and faulty["first_step"] == last
    row["runs_recovered"] = int(in_place and same)
    row["checkpoints_verified"] = int(same)
    row["steps_lost"] = fail + 1 - faulty["first_step"]
    if not (in_place and same):
        row["error"] = (f"restart_count {faulty['restart_count']}, resumed at step "
                        f"{faulty['first_step']} (want {last}), losses equal: {same}")
    return row


def _bad_configs(tmp: str) -> list:
    """(what was tried, callable expected to raise a named error)."""
    def after_compile(fn, **kw):
        def go():
            pm = ptdp.parallelize(_model(), codegen="aot_eager", **kw)
            return fn(pm)
        return go

    small = os.path.join(tmp, "small_model_ckpt")
    _make(tp=1, pp=1).save(small)
    with torch.device("meta"):
        meta_model = _model()
    meta_pm = ptdp.parallelize(meta_model, codegen="aot_eager")
    meta_pm.optimizer(torch.optim.SGD, lr=0.1)
    ids, tgt = _batch(0)
    return [
        ("precision='fp8'", lambda: ptdp.parallelize(_model(), precision="fp8")),
        ("tp=0", lambda: ptdp.parallelize(_model(), tp=0)),
        ("virtual_stages=2 with pp=1", lambda: ptdp.parallelize(_model(), virtual_stages=2)),
        ("interleaved pp=2, v=2, microbatches=3",
         lambda: ptdp.parallelize(_model(), pp=2, virtual_stages=2, microbatches=3)),
        ("distributed_optimizer='yes'",
         lambda: ptdp.parallelize(_model(), distributed_optimizer="yes")),
        ("tp=2 in a world of 1", lambda: ptdp.parallelize(_model(), tp=2)),
        ("batch 3 into microbatches=2",
         after_compile(lambda pm: pm.train_step(ids[:3], targets=tgt[:3]), microbatches=2)),
        ("pm.step() without an optimizer", after_compile(lambda pm: pm.step())),
        ("load a missing checkpoint", after_compile(lambda pm: pm.load(os.path.join(tmp, "none")))),
        ("load a checkpoint of another model", lambda: ptdp.parallelize(
            GPT(GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64)),
            codegen="aot_eager").load(small)),
        ("step a meta-built model before loading weights", lambda: meta_pm.step()),
        ("parallelize(a tensor)", lambda: ptdp.parallelize(torch.zeros(2))),
    ]


def bad_config_rows(tmp: str) -> list:
    rows = []
    for what, fn in _bad_configs(tmp):
        t0 = time.time()
        try:
            fn()
            named, err = False, "accepted (not rejected)"
        except ptdp.errors.PTDPError as e:
            named, err = True, f"{type(e).__name__}: {str(e).splitlines()[0]}"
        except Exception as e:  # an unnamed error counts as not cleanly rejected
            named, err = False, f"{type(e).__name__}: {str(e).splitlines()[0]}"
        rows.append({"scenario": f"bad configuration: {what}", "faults_injected": 0,
                     "runs_recovered": 0, "steps_lost": 0, "checkpoints_verified": 0,
                     "rejected": named, "stopped_s": round(time.time() - t0, 3),
                     "error": err[:160]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-torchrun", action="store_true")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="ptdp_reliability_")
    try:
        w = ptdp.LocalWorld(LAYOUT["tp"] * LAYOUT["pp"], timeout_s=120)
        reference = w.run(train_job, os.path.join(tmp, "ckpt_ref"), False, None, -1,
                          timeout=300)[0]
        w.close()
        rows = fault_rows(reference, tmp)
        rows.append(save_kill_row(tmp))
        if not a.no_torchrun:
            rows.append(torchrun_row(tmp))
        rows += bad_config_rows(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = {"scenario": "TOTAL",
             **{k: sum(r[k] for r in rows) for k in ("faults_injected", "runs_recovered",
                                                     "steps_lost", "checkpoints_verified")},
             "rejected": sum(1 for r in rows if r["rejected"]),
             "bad_configurations_tried": sum(1 for r in rows if r["rejected"] is not None)}
    print(f"{'scenario':58} {'faults':>6} {'recov':>5} {'lost':>4} {'ckpt ok':>7} "
          f"{'rejected':>8} {'s':>6}  error")
    for r in rows:
        rej = "" if r["rejected"] is None else ("yes" if r["rejected"] else "NO")
        s = "" if r["stopped_s"] is None else f"{r['stopped_s']:.1f}"
        print(f"{r['scenario'][:58]:58} {r['faults_injected']:>6} {r['runs_recovered']:>5} "
              f"{r['steps_lost']:>4} {r['checkpoints_verified']:>7} {rej:>8} {s:>6}  "
              f"{r['error'][:90]}")
    print(f"TOTAL: {total['faults_injected']} faults injected, {total['runs_recovered']} runs "
          f"recovered, {total['steps_lost']} steps lost, {total['checkpoints_verified']} "
          f"checkpoints verified, {total['rejected']}/{total['bad_configurations_tried']} bad "
          "configurations rejected with a named error")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"benchmark": "reliability", "device": "cpu (gloo)",
                       "torch": torch.__version__,
                       "command": "python benchmarks/reliability.py --json " + a.json,
                       "rows": rows + [total]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

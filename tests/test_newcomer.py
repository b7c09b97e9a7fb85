"""The newcomer's first minutes (issue 25): the main job says what it is doing at once,
the compile reports its phases, train_hf trains a Hugging Face family, and ``inspect``
draws a transformer layer (not the embedding)."""
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

import ptdp_compiler as ptdp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_line(cmd: list, limit: float) -> tuple:
    """(seconds to the first output line, that line) of ``cmd``, which is then killed."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], limit)
        line = proc.stdout.readline().decode() if ready else ""
        return time.monotonic() - t0, line
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the job and any ranks it forked
        proc.wait(timeout=30)


def test_main_job_speaks_within_5_seconds():
    """From the command line of the README, the first progress line comes before torch is
    even imported (which alone takes seconds on a loaded machine)."""
    dt, line = _first_line([sys.executable, os.path.join("examples", "train_gpt.py")], 30)
    assert line.startswith("ptdp | "), line
    assert dt < 5.0, f"first progress line after {dt:.1f} s"


def test_compile_reports_each_phase(capsys):
    """One line per finished phase on stderr (not a TTY here): capture, passes, every
    distinct region's compile, with seconds."""
    from examples.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16,
                          dropout=0.0))
    pm = ptdp.parallelize(model, codegen="aot_eager")
    x = torch.randint(0, 64, (2, 16))
    pm.compile(x, targets=x)
    err = capsys.readouterr().err
    names = [m.group(1) for m in re.finditer(r"^ptdp \| (.+?) \d+\.\d s( \(.*\))?$", err,
                                             re.M)]
    assert "capture" in names and "passes" in names and "compile" in names, err
    regions = [n for n in names if n.startswith("compile · chunk 0 · region ")]
    assert regions and regions[0].endswith("1/" + regions[0].rsplit("/", 1)[1]), err
    os.environ["PTDP_PROGRESS"] = "0"
    try:
        ptdp.parallelize(model, codegen="aot_eager").compile(x, targets=x)
    finally:
        del os.environ["PTDP_PROGRESS"]
    assert "ptdp | " not in capsys.readouterr().err

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
    from ptdp_compiler import progress
    with pytest.raises(ValueError):   # a phase that raises is not reported as done
        with progress.phase("passes"):
            raise ValueError("no rule")
    assert re.search(r"^ptdp \| passes failed after \d+\.\d s$", capsys.readouterr().err, re.M)


def test_train_hf_trains_a_hugging_face_family_briefly():
    """examples/train_hf.py: a tiny Qwen3 of transformers' own class at tp=2 + SP on 2 ranks
    (8 ranks capture 4× slower on 2 cores; benchmarks/train_hf_families.py measures
    dp=2 × tp=2 × pp=2), a few steps (aot_eager: no kernel compile), loss falling; the
    summary line is train_gpt's."""
    import json
    out = os.path.join(ROOT, ".pytest_cache", "train_hf_qwen3.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    p = subprocess.run([sys.executable, os.path.join("examples", "train_hf.py"), "--family",
                        "qwen3", "--dp", "1", "--tp", "2", "--pp", "1", "--sequence-parallel",
                        "--steps", "6", "--codegen", "aot_eager", "--json", out],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "qwen3 (Qwen3ForCausalLM" in p.stdout and "on 2 CPU ranks (dp=1, tp=2, pp=1)" in p.stdout
    assert "ptdp | capture" in p.stderr, p.stderr[-2000:]
    losses = json.load(open(out))["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses


def _rank0_chunks(model, args, kwargs, **layout):
    """Rank 0's chunk graphs after the passes (fake process group, nothing compiled)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from ptdp_compiler.config import ParallelConfig
    from ptdp_compiler.program import build_program
    from ptdp_compiler.runtime.mesh import build_mesh
    cfg = ParallelConfig(**layout)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cfg.tp * cfg.pp)
    try:
        prog = build_program(model, cfg, (args, kwargs, None), build_mesh(1, cfg.pp, cfg.tp),
                             dict(model.named_parameters()), until="passes")
    finally:
        dist.destroy_process_group()
    return [c.gm for _, c in sorted(prog.chunks.items())]


def _drawn(gm):
    """(weight names of the matmuls, collective ops) of the layer ``inspect`` draws."""
    from ptdp_compiler.dump import is_collective, pick_layer, weight_name
    from ptdp_compiler.graph_utils import op_name
    layer = pick_layer(gm)
    calls = [n for n in layer.graph.nodes if n.op == "call_function"]
    return ([weight_name(n) for n in calls if op_name(n) == "linear"],
            [op_name(n) for n in calls if is_collective(n)], {op_name(n) for n in calls})


def test_inspect_draws_a_transformer_layer_of_our_gpt_not_the_embedding():
    from ptdp_compiler.dump import load_model_file
    model, args, kwargs = load_model_file(os.path.join(ROOT, "examples", "models", "gpt.py"))
    chunk0 = _rank0_chunks(model, args, kwargs, tp=2, pp=2)[0]
    linears, collectives, ops = _drawn(chunk0)
    # chunk 0 is the embedding and the first block: the block is drawn
    assert linears == ["query", "key", "value", "proj", "fc", "out"] and \
        "embedding" not in ops, (linears, ops)
    assert collectives.count("tp_g") == 2, collectives   # after attention's and the MLP's row


def test_inspect_draws_llamas_layer_with_its_collectives_at_tp2_sp():
    """The acceptance picture: Hugging Face Llama at tp=2 + SP, the drawn layer holds q, k,
    v, o and the MLP's gate, up, down, each column pair after an SP all-gather and each row
    linear before a reduce-scatter."""
    from benchmarks.zoo_models import batch, build
    args, kwargs = batch("llama", 2)
    chunk = _rank0_chunks(build("llama"), args, kwargs, tp=2, sequence_parallel=True)[0]
    linears, collectives, _ = _drawn(chunk)
    assert sorted(linears) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"]), linears
    assert collectives.count("sp_gather") == 2 and collectives.count("sp_scatter") == 2, \
        collectives


def test_readme_opens_with_the_pictures_and_the_two_commands_ci_runs():
    """The README's first screen: the two pictures (files that exist, made by
    benchmarks/readme_figures.py) and the two commands; .ci/run runs exactly those."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    first = readme.split("## Try this", 1)[0]
    assert len(first.splitlines()) < 50
    for fig in ("docs/figures/timeline_interleaved.png", "docs/figures/llama_layer_tp2_sp.png"):
        assert fig in first and os.path.exists(os.path.join(ROOT, fig)), fig
    block = first.split("```bash", 1)[1].split("```", 1)[0]
    commands = [l.strip() for l in block.splitlines() if l.strip() and not l.startswith("#")]
    assert commands == ['pip install torch==2.13.0 && pip install -e ".[dev,hf]" && '
                        'python examples/train_gpt.py', "python -m pytest -q"]
    ci = [l.strip() for l in open(os.path.join(ROOT, ".ci", "run")) if l.strip()]
    assert ci[-1] == commands[1]
    assert "python -m pip install --quiet torch==2.13.0" in ci
    assert 'python -m pip install --quiet -e ".[dev,hf]"' in ci

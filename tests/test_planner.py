"""Planner: graph-derived costs, Korthikanti memory, simulator, Table 1 of Narayanan et al."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ptdp_compiler as ptdp
from ptdp_compiler.planner import Cluster, gpt_model_cost, plan
from ptdp_compiler.planner.cost_model import activation_bytes_per_layer, graph_costs
from ptdp_compiler.planner.search import Candidate, Evaluator
from ptdp_compiler.planner.simulator import simulate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import planner_table1 as bench  # noqa: E402


def test_graph_flops_match_gpt_formula():
    mc = gpt_model_cost(2304, 24, 24)
    s, h, V = 2048, 2304, 51200
    layer = sum(c.flops for c in mc.layers[0] if c.kind in ("gemm", "attention"))
    assert layer == pytest.approx(24 * s * h * h + 4 * s * s * h, rel=1e-3)  # + biases
    head = sum(c.flops for c in mc.post if c.kind == "gemm")
    assert head == 2 * s * h * V
    assert mc.total_params / 1e9 == pytest.approx(1.65, abs=0.01)


def test_user_model_plan_and_public_api():
    from examples.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4))
    idx = torch.zeros(2, 64, dtype=torch.long)
    r = ptdp.plan(m, (idx,), kwargs={"targets": idx},
                  cluster=ptdp.Cluster(nodes=1, gpus_per_node=8, gpu="H100-SXM"), global_batch=64)
    cfg = r.to_parallel_config()
    assert cfg.tp * cfg.pp * cfg.dp == 8 and len(r.top) == 5 and "rejected" in r.explain()


def test_korthikanti_table2_formulas():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert activation_bytes_per_layer(s, b, h, a) == sbh * 34 + 5 * a * s * s * b
    assert activation_bytes_per_layer(s, b, h, a, t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert activation_bytes_per_layer(s, b, h, a, t, sp=True) == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
    assert activation_bytes_per_layer(s, b, h, a, t, sp=True, recompute="selective") == pytest.approx(34 * sbh / t)


def test_simulator_extrapolation_exact_and_bubble():
    f = lambda c: 1.0  # noqa: E731
    r = simulate_config("interleaved", 4, 2, 8, lambda c: 0.5, lambda c: 1.0)
    assert r.bubble == pytest.approx(3 / 16)
    full = simulate_config("1f1b", 8, 1, 64, f, lambda c: 2.0 + (c == 7), lambda a: 0.1)
    ext = simulate_config("1f1b", 8, 1, 64, f, lambda c: 2.0 + (c == 7), lambda a: 0.1, max_m=16)
    assert ext.extrapolated_from and ext.step_time == pytest.approx(full.step_time)


def test_timeline_outputs(tmp_path):
    r = simulate_config("interleaved", 4, 2, 8, lambda c: 0.5, lambda c: 1.0, lambda a: 0.05)
    r.chrome_trace(str(tmp_path / "t.json"))
    ev = json.load(open(tmp_path / "t.json"))["traceEvents"]
    assert sum(e.get("cat") == "compute" for e in ev) == 4 * 2 * 8 * 2
    pytest.importorskip("matplotlib")
    r.timeline_png(str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_table1_all_rows_within_15_percent():
    rows = bench.table1_rows(do_search=False, log=lambda *_: None)
    assert len(rows) == 10
    for r in rows:
        assert abs(r["error"]) <= 0.15, r


def test_korthikanti_mfu_within_15_percent():
    for r in bench.korthikanti_rows(log=lambda *_: None):
        assert abs(r["error"]) <= 0.15, r


@pytest.mark.parametrize("row", [0, 3, 4])
def test_planner_choice_at_least_as_fast_as_published(row):
    params_b, a, h, l, t, p, gpus, batch, pub = bench.TABLE1[row]
    mc = gpt_model_cost(h, a, l)
    cl = Cluster.for_gpus(gpus)
    pub_est = bench.published_estimate(Evaluator(mc, cl, batch), t, p, gpus, batch)
    r = plan(mc, cluster=cl, global_batch=batch)
    assert r.samples_per_s >= pub_est.samples_per_s * 0.999
    if row == 3:
        # 18.4B on 256 GPUs: published t=8, p=1 with full recompute. The planner keeps the
        # activations (80 GB fits them at smaller t) and moves TP traffic off the critical
        # path; it chooses differently and predicts a faster step.
        assert (r.tp, r.pp, r.recompute) != (t, p, "full")
        assert r.step_time_s < pub_est.step_time
        assert "top 5" in r.explain()


def test_cli_plan_runs():
    out = subprocess.run([sys.executable, "-m", "ptdp_compiler", "plan", "--gpt", "1.7B",
                          "--gpus", "32", "--global-batch", "512"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ParallelConfig" in out.stdout

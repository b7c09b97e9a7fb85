"""Memory you can plan on: full recompute keeps one residual checkpoint per layer (measured
from outside, through the public train_step), the per-rank peak predicted before the first
step matches an allocation tracker over a step, and memory_limit= refuses a layout
predicted not to fit before anything is compiled."""
import pytest
import torch

import ptdp_compiler as ptdp
from benchmarks.activation_memory import formula_bytes, measure_step_job
from benchmarks.memory_model import measure_job as memory_job
from tests.models import batch, build

S, B, H = 256, 2, 256
SMALL = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.1)


def _full_layer(t, sp):
    """(bytes per layer, of which generator state) of recompute="full": 4 layers − 2."""
    lo, hi = (measure_step_job(n, t, sp, "full", s=S, codegen="aot_eager") for n in (2, 4))
    return (hi["bytes"] - lo["bytes"]) / 2, (hi["rng_bytes"] - lo["rng_bytes"]) / 2


def test_full_recompute_keeps_one_checkpoint_per_layer():
    """saved_tensors_hooks around pm.train_step: 0.9–1.15 of 2·s·b·h per layer, and apart
    from the replayed dropouts' generator state exactly one (b, s, h) bf16 tensor."""
    got, rng = _full_layer(1, False)
    want = formula_bytes(S, B, H, 8, 1, False, "full")
    assert 0.9 <= got / want <= 1.15, (got, want)
    assert (got - rng) == want, (got, rng, want)


def test_full_recompute_one_checkpoint_per_layer_tp2_sp(world):
    got, rng = world(2, _full_layer, 2, True, timeout=400)[0]
    want = formula_bytes(S, B, H, 8, 2, True, "full")    # 2·s·b·h / t
    assert 0.9 <= got / want <= 1.15, (got, want)
    assert (got - rng) == want, (got, rng, want)


def test_predicted_peak_within_10_percent_of_measured():
    """Prediction after compile (no step run) vs the allocation tracker over step 2 (the
    other layouts: benchmarks/memory_model.py)."""
    kw = dict(precision="bf16", recompute="selective", microbatches=2)
    r = memory_job(kw, model=SMALL, seq=64, global_batch=4)
    err = r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1
    assert abs(err) < 0.10, (kw, r)


def _pm(**kw):
    return ptdp.parallelize(build("gpt"), codegen="aot_eager", **kw)


def test_memory_limit_refuses_before_compiling():
    from ptdp_compiler.codegen import compile_stats
    args, kwargs = batch("gpt", 2)
    before = compile_stats["compiles"]
    pm = _pm(memory_limit="64KiB", dp=1)
    with pytest.raises(ptdp.MemoryLimitError) as e:
        pm.train_step(*args, **kwargs)
    msg = str(e.value)
    assert "predicted to need" in msg and "params" in msg and "activations" in msg, msg
    assert "memory_limit=64.00 KiB" in msg
    assert compile_stats["compiles"] == before          # refused before any compile
    assert all(p.grad is None for p in pm.parameters())
    # the same layout under a roomy limit trains, and explain shows the prediction
    pm = _pm(memory_limit=2**30)
    pm.train_step(*args, **kwargs)
    assert "predicted peak memory per rank" in pm.explain()


def test_memory_limit_names_the_cheapest_change():
    """Over the limit with plenty of activations: the refusal proposes a change that fits."""
    args, kwargs = batch("gpt", 2)
    pm = _pm(recompute="none", precision="bf16")   # gradients alive with the activations
    pm.compile(*args, **kwargs)
    pred = pm.predict_memory()
    from ptdp_compiler.planner.memory import cheapest_fit_program
    pred.limit = int(pred.peak - 0.25 * pred.worst.activations)
    fixes = cheapest_fit_program(pred)
    assert fixes and fixes[0][1] <= pred.limit and "recompute" in fixes[0][0], fixes


def test_memory_limit_parsing():
    from ptdp_compiler.config import parse_bytes
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(1000) == 1000 and parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(ptdp.ConfigError):
        _pm(memory_limit="lots")


def test_planner_never_proposes_a_layout_over_the_limit():
    from ptdp_compiler.planner import Cluster, gpt_model_cost
    mc = gpt_model_cost(2304, 24, 24, 2048, 51200)
    cl = Cluster(nodes=1, gpus_per_node=8, gpu="A100-80GB")
    free = ptdp.plan(mc, cluster=cl, global_batch=64)
    limit = int(0.6 * free.best.memory)
    r = ptdp.plan(mc, cluster=cl, global_batch=64, memory_limit=limit)
    assert all(e.memory <= limit for e in r.top), [e.memory for e in r.top]
    assert r.memory_prediction.peak <= limit
    assert {"params", "grads", "optimizer", "activations"} <= set(r.memory_prediction.rows()[0])
    with pytest.raises(ptdp.MemoryLimitError, match="least memory"):
        ptdp.plan(mc, cluster=cl, global_batch=64, memory_limit="1GiB")


def test_breakdown_follows_the_schedule():
    """1F1B keeps p − r microbatches on stage r; interleaved more on the first stage; ZeRO-1
    divides the optimizer states by d."""
    from ptdp_compiler.planner import gpt_model_cost
    from ptdp_compiler.planner.memory import Layout, predict
    mc = gpt_model_cost(1024, 16, 8, 512, 8192)
    one = predict(mc, Layout(p=4, m=8, d=2))
    assert [s.inflight for s in one.stages] == [4, 3, 2, 1]
    inter = predict(mc, Layout(p=4, v=2, m=8, d=2))
    assert inter.stages[0].inflight > one.stages[0].inflight
    zero = predict(mc, Layout(p=4, m=8, d=2, zero=True))
    assert zero.stages[0].optimizer < 0.6 * one.stages[0].optimizer
    full = predict(mc, Layout(p=4, m=8, d=2, recompute="full"))
    assert full.stages[0].activations < 0.2 * one.stages[0].activations
    assert full.stages[0].recompute_workspace > 0

"""Real training: mixed precision, the (distributed) optimizer, global grad-norm clipping,
inf/NaN skipping, checkpoints that reshard across layouts, and faults.

Layouts are dicts (tp, dp, pp, distributed_optimizer, precision) so pipeline layouts join
the same parametrizations; jobs are module-level functions run on shared gloo worlds."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ptdp_compiler as ptdp
from tests.models import VOCAB, assert_close_tensor, batch, build

GB = 8          # global batch
LR = 1e-2


def _layout(tp=1, dp=1, pp=1, **kw):
    return dict(tp=tp, dp=dp, pp=pp, **kw)


def _world(lay):
    return lay["tp"] * lay["dp"] * lay["pp"]


def _data(step):
    """A learnable batch: the target is a fixed function of the token (some ignored)."""
    (ids,), kw = batch("gpt", GB, seed=100 + step)
    tgt = (ids * 3 + 1) % VOCAB
    tgt[kw["targets"] < 0] = -1
    return ids, tgt


def _make(lay, model=None, microbatches=2, opt_cls=torch.optim.AdamW, **opt_kw):
    pm = ptdp.parallelize(model if model is not None else build("gpt", n_layer=lay["pp"] * 2 if
                                                                 lay["pp"] > 1 else 2),
                          codegen="aot_eager",
                          microbatches=microbatches, **lay)
    kw = dict(lr=LR, weight_decay=0.1) if opt_cls is torch.optim.AdamW else {}
    kw.update(opt_kw)
    pm.optimizer(opt_cls, **kw)
    return pm


def _train(pm, steps, first=0):
    losses, reports = [], []
    for s in range(first, first + steps):
        ids, tgt = _data(s)
        losses.append(float(pm.train_step(pm.dp_shard(ids), targets=pm.dp_shard(tgt))))
        reports.append(pm.step())
    return losses, reports


# ---- index math: rectangles of the full tensor ------------------------------------------
def test_piece_boxes_cover_exactly_the_local_range():
    import random

    from ptdp_compiler.passes.sharding import shard_tensor
    from ptdp_compiler.placement import Shard
    from ptdp_compiler.runtime.layout import LocalParam, piece_boxes
    rnd = random.Random(0)
    for shape, pl in [((12, 8), Shard(0, 3)), ((12, 8), Shard(1, 2)), ((24,), Shard(0)),
                      ((6, 4, 4), Shard(1)), ((5, 7), None), ((), None)]:
        full = torch.randn(shape)
        for t in ((1, 2) if pl is not None else (1,)):
            for r in range(t):
                p = pl if t > 1 else None
                local = shard_tensor(full, p, t, r)
                lp = LocalParam("w", torch.nn.Parameter(local), p, True, tuple(shape), t, r)
                for _ in range(25):
                    lo = rnd.randrange(0, local.numel())
                    hi = rnd.randrange(lo, local.numel() + 1)
                    boxes = piece_boxes(lp, local.reshape(-1)[lo:hi].clone(), lo, hi)
                    assert sum(v.numel() for _, _, v in boxes) == hi - lo
                    for off, size, v in boxes:
                        assert torch.equal(full[tuple(slice(o, o + s) for o, s in
                                                      zip(off, size))], v)


# ---- distributed optimizer ----------------------------------------------------------------
def _zero_vs_plain_job(lay):
    out = {}
    for zero in (False, True):
        pm = _make({**lay, "distributed_optimizer": zero})
        _train(pm, 3)
        out[zero] = (pm.full_state_dict(), pm._optimizer.state_bytes())
    return out


# dp=2 is covered with tp=2; the distributed optimizer under pp (tied weights across
# stages) by the checkpoint test's (tp=2, pp=2, dp=2) run
@pytest.mark.parametrize("lay", [_layout(dp=4), _layout(tp=2, dp=2)], ids=["dp4", "tp2dp2"])
def test_distributed_optimizer_matches_plain(world, lay):
    res = world(_world(lay), _zero_vs_plain_job, lay, timeout=300)
    for r in res:
        plain, zero = r[False][0], r[True][0]
        for n in plain:
            assert_close_tensor(n, zero[n], plain[n], rtol=1e-6)
        ratio = r[True][1] / r[False][1]
        d = lay["dp"]
        assert abs(ratio - 1 / d) < 0.1 / d, f"optimizer bytes ratio {ratio:.3f}, want ≈ 1/{d}"


# ---- global grad-norm clipping ------------------------------------------------------------
MAX_NORM = 0.05


def _clip_job(lay):
    pm = _make(lay, model=build("gpt"), opt_cls=torch.optim.SGD, lr=1.0, max_grad_norm=MAX_NORM)
    _, reports = _train(pm, 1)
    return reports[0].grad_norm, reports[0].clip_coef, pm.full_state_dict()


# tp=2, pp=2: the tied embedding / LM head lives on both stages, the norm weights on both tp
# ranks; each must be counted once
@pytest.mark.parametrize("lay", [_layout(tp=2, pp=2)], ids=["tp2pp2"])
def test_clip_equals_clip_grad_norm(world, lay):
    model = build("gpt")
    assert model.head.weight is model.tok_emb.weight  # tied: must be counted once
    ids, tgt = _data(0)
    model(ids, tgt).backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1.0 * p.grad
    for norm, coef, sd in world(_world(lay), _clip_job, lay, timeout=300):
        assert abs(norm - want) <= 1e-6 * want, (norm, want)
        assert coef < 1.0
        for n, p in model.named_parameters():
            assert_close_tensor(n, sd[n], p, rtol=1e-5)


# ---- inf/NaN -------------------------------------------------------------------------------
def _nonfinite_job(precision):
    pm = _make(_layout(dp=2, precision=precision))
    _train(pm, 1)
    before = pm.full_state_dict()
    ids, tgt = _data(1)
    pm.train_step(pm.dp_shard(ids), targets=pm.dp_shard(tgt))
    if pm.coords.rank == 1:  # one rank sees an overflow
        p = next(iter(pm.parameters()))
        g = getattr(p, "main_grad", None)
        (g if g is not None else p.grad).view(-1)[0] = float("inf")
    scale0 = pm._buckets.loss_scale if hasattr(pm._buckets, "loss_scale") else None
    rep = pm.step()
    after = pm.full_state_dict()
    same = all(torch.equal(before[n], after[n]) for n in before)
    _, later = _train(pm, 1, first=2)
    return rep.skipped, same, scale0, rep.loss_scale, pm._buckets.loss_scale \
        if hasattr(pm._buckets, "loss_scale") else None, later[0].skipped


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nonfinite_gradient_skips_step_everywhere(world, precision):
    for skipped, unchanged, scale0, _, scale1, later_skipped in world(
            2, _nonfinite_job, precision, timeout=300):
        assert skipped and unchanged and not later_skipped
        if precision == "fp16":
            assert scale1 == scale0 / 2  # dynamic loss scale backs off


# ---- mixed precision ---------------------------------------------------------------------
def _precision_job(precision, pp):
    pm = _make(_layout(pp=pp, precision=precision), model=build("gpt"), opt_cls=torch.optim.SGD,
               lr=0.5)
    losses, reports = _train(pm, 3)
    return losses, [(r.skipped, r.grad_norm) for r in reports]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_under_pipeline_matches_one_stage(world, precision):
    """pp=2 uses the fp16 loss scale as the backward seed and sums the tied weight's fp32
    main_grad over stages: its norms and losses are the single-stage run's (up to the
    rounding of the tied gradient's low-precision sum, which one stage does in-graph)."""
    want = _precision_job(precision, 1)
    for got in world(2, _precision_job, precision, 2, timeout=300):
        assert [s for s, _ in got[1]] == [s for s, _ in want[1]]
        for (_, a), (_, b) in zip(got[1], want[1]):
            assert abs(a - b) <= 1e-2 * b, (got[1], want[1])
        # the reported loss is the low-precision graph output: allow two of its ulps
        ulp = torch.finfo(torch.bfloat16 if precision == "bf16" else torch.float16).eps
        assert max(abs(a - b) for a, b in zip(got[0], want[0])) <= 2 * ulp * max(want[0])


def test_bf16_and_fp16_track_fp32_for_50_steps(tmp_path):
    curves = {}
    for precision, steps in (("fp32", 50), ("bf16", 50), ("fp16", 20)):
        pm = _make(_layout(precision=precision), microbatches=1, lr=3e-3, weight_decay=0.0)
        curves[precision] = _train(pm, steps)[0]
        if precision == "bf16":
            p = next(iter(pm.parameters()))
            assert p.dtype == torch.bfloat16 and p.main_grad.dtype == torch.float32
            masters = {pc.lp.name: pc.master.detach().clone() for pc in pm._optimizer.pieces}
            assert all(m.dtype == torch.float32 for m in masters.values())
            pm.save(str(tmp_path / "bf16"))
    fp32 = torch.tensor(curves["fp32"])
    assert fp32[-5:].mean() < fp32[:5].mean() - 0.3  # it trains
    for precision in ("bf16", "fp16"):
        got = torch.tensor(curves[precision])
        diff = (got - fp32[:len(got)]).abs().max().item()
        # bf16 keeps 8 significant bits (~0.4% per rounding); fp16's first steps may be
        # skipped while the dynamic loss scale backs off from 2^16, so its curve lags a little
        tol = 0.05 if precision == "bf16" else 0.1
        assert diff < tol, f"{precision} loss departs from fp32 by {diff:.3f}"
    # what the bf16 run checkpointed are its fp32 masters, bit for bit
    pm32 = _make(_layout())
    pm32.load(str(tmp_path / "bf16"))
    for n, p in pm32.named_parameters():
        assert torch.equal(p.detach(), masters[n]), n


# ---- checkpoints that reshard ----------------------------------------------------------
SAVE_AT = _layout(tp=2, pp=2, dp=2, distributed_optimizer=True)


def _ckpt_make(lay):
    # 4 layers so pp=4 has a block per stage; 4 microbatches (1 sample each at dp=2)
    return _make(lay, model=build("gpt", n_layer=4), microbatches=4)


def _save_job(path):
    pm = _ckpt_make(SAVE_AT)
    _train(pm, 2)
    pm.save(path, extra={"next_step": 2})
    return _train(pm, 3, first=2)[0]


def _resume_job(lay, path):
    pm = _ckpt_make(lay)
    ids, tgt = _data(0)
    pm.compile(pm.dp_shard(ids), targets=pm.dp_shard(tgt))  # fixes the layout for the state
    extra = pm.load(path)
    return _train(pm, 3, first=extra["next_step"])[0]


@pytest.fixture(scope="module")
def saved_checkpoint(world, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "step2")
    uninterrupted = world(8, _save_job, path, timeout=400)[0]
    return path, uninterrupted


@pytest.mark.parametrize("lay", [_layout(tp=4), _layout(pp=4, dp=2, distributed_optimizer=True),
                                 None], ids=["tp4", "pp4dp2-zero", "single-device"])
def test_checkpoint_loads_at_another_layout(world, saved_checkpoint, lay):
    path, want = saved_checkpoint
    if lay is None:
        got = _resume_job(_layout(), path)
    else:
        got = world(_world(lay), _resume_job, lay, path, timeout=400)[0]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6 * max(want), (got, want)


def _slow_save_child(path, where, ready):
    """Save a second checkpoint over ``path`` and stop (to be SIGKILLed) at ``where``."""
    import torch.distributed.checkpoint as dcp
    pm = _make(_layout(), model=build("gpt", seed=3))  # nothing compiled: saves parameters

    def stall(*a, **k):
        open(ready, "w").close()
        time.sleep(600)
    if where == "write":
        dcp.FileSystemWriter.write_data = stall
    else:
        real = os.rename
        os.rename = lambda a, b: stall() if str(a).endswith(".partial") else real(a, b)
    pm.save(path)


@pytest.mark.parametrize("where", ["write", "rename"])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, where):
    path, ready = str(tmp_path / "ckpt"), str(tmp_path / "ready")
    pm = _make(_layout())
    _train(pm, 1)
    pm.save(path, extra={"step": 1})
    saved = pm.full_state_dict()
    # a fresh interpreter (a fork of this threaded process can deadlock in OpenMP)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from tests.test_training import _slow_save_child as f; f(*sys.argv[2:])",
         root, path, where, ready], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while not os.path.exists(ready) and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(ready), "the child never reached the save"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert os.path.isdir(path + ".partial")  # the interrupted save is there, and ignored
    fresh = _make(_layout(), model=build("gpt", seed=5))
    assert fresh.load(path) == {"step": 1}
    for n, t in fresh.full_state_dict().items():
        assert torch.equal(t, saved[n]), n
    pm.save(path, extra={"step": 2})  # the next save clears the debris
    assert not os.path.exists(path + ".partial") and fresh.load(path) == {"step": 2}


# ---- bad input is refused with a named error ----------------------------------------------
def test_training_state_errors(tmp_path):
    with pytest.raises(ptdp.ConfigError, match="precision"):
        ptdp.parallelize(build("gpt"), precision="fp8")
    with pytest.raises(ptdp.ConfigError, match="distributed_optimizer"):
        ptdp.parallelize(build("gpt"), distributed_optimizer="yes")
    pm = ptdp.parallelize(build("gpt"), codegen="aot_eager")
    with pytest.raises(ptdp.ConfigError, match="optimizer"):
        pm.step()
    with pytest.raises(ptdp.CheckpointError, match="no complete checkpoint"):
        pm.load(str(tmp_path / "nothing"))
    pm.save(str(tmp_path / "small"))
    other = ptdp.parallelize(build("gpt", n_embd=64), codegen="aot_eager")
    with pytest.raises(ptdp.CheckpointError, match="shapes differ"):
        other.load(str(tmp_path / "small"))


# ---- faults: a dead or failing rank stops the world, named, with nothing left behind ------
def _faulty_job(kind, victim):
    import torch.distributed as dist
    pm = ptdp.parallelize(build("gpt", n_layer=1), dp=dist.get_world_size(), codegen="aot_eager")
    ids, tgt = _data(0)
    pm.train_step(pm.dp_shard(ids), targets=pm.dp_shard(tgt))
    if dist.get_rank() == victim:
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {victim}")
    pm.train_step(pm.dp_shard(ids), targets=pm.dp_shard(tgt))  # peers block in the all-reduce
    return "finished"


@pytest.mark.parametrize("kind,n", [("sigkill", 8), ("raise", 4)])
def test_failing_rank_stops_world_named(kind, n):
    """A rank killed (of 8) or raising (of 4; world 8 costs CI 20 s) stops every rank with
    an error naming it, and no process is left behind."""
    victim = n - 3
    world = ptdp.LocalWorld(n, timeout_s=60)
    pids = [p.pid for p in world._procs]
    t0 = time.time()
    with pytest.raises(ptdp.RankError) as ei:
        world.run(_faulty_job, kind, victim, timeout=120)
    took = time.time() - t0
    assert ei.value.rank == victim and f"rank {victim}" in str(ei.value)
    assert took < 60 + 30, took  # (includes the ranks' first compile)
    world.close(force=True)
    time.sleep(0.5)
    for pid in pids:
        assert not _alive(pid), f"rank process {pid} left behind"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False



# ---- torchrun --max-restarts: an in-place restart resumes from the last checkpoint -------
TINY_TRAIN_GPT = ["--dp", "1", "--tp", "1", "--pp", "2", "--microbatches", "2", "--steps", "8",
                  "--batch", "4", "--seq", "16", "--layers", "2", "--width", "32",
                  "--codegen", "aot_eager", "--peak-tflops", "1"]


def _train_gpt_losses_job(argv):
    from examples.train_gpt import parse_args, train
    return train(parse_args(argv))["losses"]


# Opt-in (PTDP_TORCHRUN_RESTART=1): 28 s, and once in CI (2026-12-02) the restarted rank 1
# aborted in gloo ("terminate called without an active exception", no Python traceback)
# after the restarted ranks' first step; 12 runs here, 9 of them with the cores saturated,
# passed. Unexplained, so not in the default suite until it is.
@pytest.mark.skipif(__import__("shutil").which("torchrun") is None,
                    reason="torchrun is not installed")
@pytest.mark.skipif(os.environ.get("PTDP_TORCHRUN_RESTART") != "1",
                    reason="PTDP_TORCHRUN_RESTART=1 runs it (an unexplained abort once in CI)")
def test_torchrun_max_restarts_resumes_from_last_checkpoint(world, tmp_path):
    """The last of 2 torchrun ranks (pp=2) dies after step 5; torchrun restarts both in place,
    rank 1 two seconds late: the skew that made the restarted gloo group read the dead
    attempt's addresses from torchrun's shared store (runtime/launch.py). They must resume
    from the step-3 checkpoint with the losses of an uninterrupted run (1e-6)."""
    import json
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rank0.json"
    cmd = [shutil.which("torchrun"), "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           os.path.join(root, "examples", "train_gpt.py"), *TINY_TRAIN_GPT,
           "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "3", "--resume",
           "--fail-at-step", "5", "--restart-skew", "2", "--timeout", "30", "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # torchrun and its workers: nothing left behind
        proc.communicate()
        pytest.fail("torchrun --max-restarts=1 did not finish within 150 s (a hang)")
    assert proc.returncode == 0, err[-3000:]
    got = json.loads(out.read_text())
    assert got["restart_count"] == 1, "the run must have been restarted by torchrun"
    assert got["first_step"] == 3, "resumed from the last checkpoint (saved after step 3)"
    want = world(2, _train_gpt_losses_job, TINY_TRAIN_GPT, timeout=120)[0]
    assert len(want) == 8 and len(got["losses"]) == 5
    for step, (a, b) in enumerate(zip(got["losses"], want[3:]), start=3):
        assert abs(a - b) <= 1e-6 * abs(b), (step, a, b)


# ---- gradient buckets: what a step costs in memory traffic ---------------------------------
def test_without_reduction_gradients_stay_where_autograd_puts_them():
    """dp = 1, same dtype: no flat buffers, no copies; parameters that got no gradient
    still end the step with a zero one (as DDP's do)."""
    from ptdp_compiler.runtime.data_parallel import GradBuckets
    torch.manual_seed(0)
    lin, unused = torch.nn.Linear(4, 3), torch.nn.Parameter(torch.ones(2))
    buckets = GradBuckets(list(lin.parameters()) + [unused])
    assert buckets.num_buckets == 0 and buckets.nbytes == 0
    for _ in range(2):                                   # a stale .grad is cleared
        buckets.start_step()
        lin(torch.randn(5, 4)).sum().backward()
        produced = lin.weight.grad
        buckets.finish()
        assert lin.weight.grad is produced
        assert torch.equal(unused.grad, torch.zeros(2))


def test_main_grad_buckets_copy_the_first_gradient_and_accumulate_the_rest():
    """bf16 parameters, fp32 main grads over two microbatches: the buffers are never
    zeroed, yet hold exactly Σ fp32(microbatch gradient); a slot no gradient reached is
    zeroed (poisoned buffers prove neither relies on stale contents)."""
    from ptdp_compiler.runtime.precision import MainGradBuckets
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4).to(torch.bfloat16)
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    buckets = MainGradBuckets(list(lin.parameters()) + [unused])
    xs = [torch.randn(5, 8, dtype=torch.bfloat16) for _ in range(2)]
    expected = [sum(torch.autograd.grad(lin(x).float().sum(), p)[0].float() for x in xs)
                for p in lin.parameters()]
    for _ in range(2):
        for b in buckets.buckets:
            b["buffer"].fill_(7.0)
        buckets.start_step()
        for x in xs:
            lin(x).float().sum().backward()
        buckets.finish()
        for p, e in zip(lin.parameters(), expected):
            assert p.grad is None and torch.equal(p.main_grad, e)
        assert torch.equal(unused.main_grad, torch.zeros(3))


def test_token_counts_stay_on_device_as_tensors():
    """Loss weights are tensors when the counts are (no host read-back per step) and
    equal the Python-number weights."""
    from ptdp_compiler.runtime.executor import global_weights
    ws, total = global_weights([torch.tensor(3.0), torch.tensor(1.0)], None)
    assert all(isinstance(w, torch.Tensor) for w in ws)
    assert [float(w) for w in ws] == global_weights([3.0, 1.0], None)[0] == [0.75, 0.25]
    assert float(total) == 4.0
    assert torch.isnan(global_weights([torch.tensor(0.0)], None)[0][0])

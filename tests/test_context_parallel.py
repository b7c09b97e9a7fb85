"""Context parallelism (``parallelize(..., cp=N)``) against the single-device model.

Every cp rank gets the same full-length batch; the graph keeps this rank's load-balanced
sequence chunks (r and 2·cp-1-r of 2·cp), all-gathers K/V for attention and counts only
its own targets in the loss weight. Two SGD steps: every rank's loss and rank 0's full
gradients must equal one device's. The suite runs FAST (GPT / Llama at cp=2, cp=4,
cp=2 x tp=2+SP, cp=2 x pp=2, cp=2 x dp=2: about a minute on 2 cores); PTDP_CP_ALL=1 adds
every layout on eight model-zoo families (MHA, GQA, MQA, fused qkv, sliding windows,
soft-capping, ALiBi, local attention) and seven MoE families (their routed experts run on
this rank's tokens: cp2, cp4, cp2 x tp2+SP, cp2 x pp2). Plus ops without a rule run on the whole sequence (warned;
strict=True refuses them by name), padding masks (left and right), a checkpoint
saved at cp=2 and loaded without cp, the layout itself (activations T/cp, one
gather per K and V, no T x T mask) and the named errors. Worlds are shared per size
(conftest); every run has a timeout."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ptdp_compiler as ptdp
from benchmarks import zoo_models as Z
from ptdp_compiler.config import ParallelConfig
from ptdp_compiler.errors import ContextParallelError, InputShapeError
from ptdp_compiler.passes.cp_ops import local_positions
from ptdp_compiler.program import build_program
from tests import models as M

STEPS, LR, GB = 2, 0.1, 4
LAYOUTS = {
    "cp2": (2, dict(cp=2)),
    "cp4": (4, dict(cp=4)),
    "cp2-tp2sp": (4, dict(cp=2, tp=2, sequence_parallel=True)),
    "cp2-pp2": (4, dict(cp=2, pp=2, microbatches=2)),
    "cp2-dp2": (4, dict(cp=2, dp=2)),
}
FAST = {("gpt", "cp2"), ("llama", "cp4"), ("llama", "cp2-tp2sp"), ("gpt", "cp2-pp2"),
        ("llama", "cp2-dp2")}
ZOO = ["gpt2", "qwen3", "gemma2", "phi3", "falcon", "bloom", "mistral", "gpt_neo"]
# routed experts run on this rank's tokens (cp_moe_rules); PTDP_CP_ALL: every layout below
MOE = {"mixtral": ("cp2", "cp4", "cp2-tp2sp", "cp2-pp2"),
       "qwen2_moe": ("cp2", "cp4", "cp2-tp2sp", "cp2-pp2"),
       "deepseek_v3": ("cp2", "cp4", "cp2-tp2sp", "cp2-pp2"),
       "olmoe": ("cp2", "cp4", "cp2-tp2sp", "cp2-pp2"),
       "qwen3_moe": ("cp2",), "granitemoe": ("cp2",), "gpt_oss": ("cp2",)}


def _build(family):
    return M.build(family) if family in ("gpt", "llama") else Z.build(family)


def _batch(family):
    return M.batch(family, GB) if family in ("gpt", "llama") else Z.batch(family, GB)


def _cp_job(family: str, layout: dict):
    import torch.distributed as dist
    pm = ptdp.parallelize(_build(family), codegen="aot_eager", **layout)
    losses, grads = Z.parallel_sgd(pm, *_batch(family), STEPS, LR)
    return {"rank": dist.get_rank(), "losses": [float(x) for x in losses],
            "grads": grads if dist.get_rank() == 0 else None}


def _cases():
    out = []
    for fam in ["gpt", "llama"] + ZOO:
        for lay in LAYOUTS:
            if (fam, lay) in FAST or os.environ.get("PTDP_CP_ALL") == "1":
                out.append(pytest.param(fam, lay, id=f"{fam}-{lay}"))
            elif fam in ("gpt", "llama"):
                out.append(pytest.param(fam, lay, id=f"{fam}-{lay}", marks=pytest.mark.skip(
                    reason="PTDP_CP_ALL=1 runs it")))
    if os.environ.get("PTDP_CP_ALL") == "1":
        out += [pytest.param(fam, lay, id=f"{fam}-{lay}") for fam, lays in MOE.items()
                for lay in lays]
    return out


@pytest.mark.parametrize("family,layout", _cases())
def test_context_parallel_matches_one_device(world, family, layout):
    n, cfg = LAYOUTS[layout]
    ref_losses, ref_grads = M.reference_sgd(_build(family), *_batch(family), STEPS, LR)
    results = world(n, _cp_job, family, cfg, timeout=300)
    for res in results:
        assert res["losses"] == pytest.approx([float(x) for x in ref_losses], rel=1e-5), \
            f"rank {res['rank']} losses"
    got = results[0]["grads"]
    for step in range(STEPS):
        # relative to each gradient's largest entry, floored at 1e-3 x the step's largest
        # (a key bias's gradient vanishes in exact arithmetic: its value is rounding noise)
        floor = 1e-3 * max(g.abs().max().item() for g in ref_grads[step].values())
        for name, want in ref_grads[step].items():
            g = got[step][name]
            assert g.shape == want.shape, name
            err = (g.double() - want.double()).abs().max().item()
            assert err <= 1e-4 * max(want.abs().max().item(), floor), \
                f"step {step} grad {name}: max abs err {err:.3e}"


def _padded_job(layout: dict):
    import torch.distributed as dist
    pm = ptdp.parallelize(M.build("llama"), codegen="aot_eager", **layout)
    losses, grads = Z.parallel_sgd(pm, *_padded_batch(), STEPS, LR)
    return {"rank": dist.get_rank(), "losses": [float(x) for x in losses],
            "grads": grads if dist.get_rank() == 0 else None}


def _padded_batch():
    """Right and left padding: the padding mask joins the causal one in the model's own
    mask code; under cp its key axis stays whole and its query axis is this rank's."""
    args, kwargs = M.batch("llama", GB)
    am = torch.ones_like(kwargs["input_ids"])
    am[1, 11:] = 0
    am[2, :3] = 0
    kwargs["attention_mask"] = am
    kwargs["labels"] = kwargs["labels"].masked_fill(am == 0, -100)
    return args, kwargs


def test_padding_mask_matches_one_device(world):
    ref_losses, ref_grads = M.reference_sgd(M.build("llama"), *_padded_batch(), STEPS, LR)
    results = world(2, _padded_job, dict(cp=2), timeout=300)
    for res in results:
        assert res["losses"] == pytest.approx([float(x) for x in ref_losses], rel=1e-5)
    for name, want in ref_grads[-1].items():
        M.assert_close_tensor(name, results[0]["grads"][-1][name], want, 1e-4)


def _ckpt_job(path: str, layout: dict, save: bool):
    pm = ptdp.parallelize(M.build("gpt"), codegen="aot_eager", **layout)
    args, kwargs = M.batch("gpt", GB)
    args = tuple(pm.dp_shard(a) for a in args)
    kwargs = {k: pm.dp_shard(v) for k, v in kwargs.items()}
    pm.optimizer(torch.optim.AdamW, lr=1e-2)
    if save:
        pm.train_step(*args, **kwargs)
        pm.step()
        pm.save(path)
    else:
        pm.compile(*args, **kwargs)
        pm.load(path)
    return float(pm.train_step(*args, **kwargs)), pm.full_state_dict()


def test_checkpoint_is_independent_of_cp(world, tmp_path):
    """cp is not part of the saved layout: saved at cp=2, loaded at dp=2 (no cp), the same
    parameters and the same next loss."""
    path = str(tmp_path / "ckpt")
    saved_loss, saved = world(2, _ckpt_job, path, dict(cp=2), True, timeout=240)[0]
    loaded_loss, loaded = world(2, _ckpt_job, path, dict(dp=2), False, timeout=240)[0]
    assert loaded_loss == pytest.approx(saved_loss, rel=1e-5)
    for name, want in saved.items():
        assert torch.equal(loaded[name], want), name


# ---- the per-rank graph, built in one process -----------------------------------------------
def _passes(model, args, kwargs, rank=0, **cfg):
    from ptdp_compiler.runtime.mesh import Coords
    config = ParallelConfig(**cfg).validate()
    coords = Coords(0, 1, 0, 0, 0, 1, 1, 1, None, cp=config.cp, cp_rank=rank)
    return build_program(model, config, (args, kwargs, None), coords, until="passes")


def test_rank_holds_load_balanced_chunks_and_equal_causal_work():
    T, cp = 16, 4
    seen = []
    work = set()
    for r in range(cp):
        pos = local_positions(T, cp, r)
        assert pos == list(range(2 * r, 2 * r + 2)) + list(range(14 - 2 * r, 16 - 2 * r))
        seen += pos
        work.add(sum(p + 1 for p in pos))      # keys a causal query at p attends to
    assert sorted(seen) == list(range(T))
    assert len(work) == 1                      # the same causal attention work on every rank


def test_activations_are_sequence_local_and_kv_gathered_once():
    args, kwargs = M.batch("llama", 2)
    prog = _passes(M.build("llama"), args, kwargs, rank=1, cp=2)
    gm = prog.gm
    gathers = [n for n in gm.graph.nodes if n.target is torch.ops.ptdp.cp_gather.default]
    assert len(gathers) == 4                   # K and V of each of the 2 layers
    for g in gathers:                          # before repeat_kv: the 2 key/value heads
        assert tuple(g.meta["val"].shape)[1:] == (2, 1, 16, 8)
    T = 16
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() >= 3 and v.shape[-1] == 32:
            assert T not in tuple(v.shape)[:-1], f"{n.name} {tuple(v.shape)} is whole-sequence"
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            assert tuple(v.shape)[-2:] != (T, T), f"{n.name}: a T x T mask was built"
    log = dict(prog.plan.pass_log)["context_parallel"]
    assert "chunks 1 and 2" in log


def test_routed_experts_run_on_this_ranks_tokens_and_match(world):
    """Qwen2-MoE at cp=2: the expert block sorts, gathers and multiplies this rank's N·k/cp
    token slots only (no all-gather but attention's K and V, no whole-sequence warning),
    and two SGD steps equal one device's."""
    import warnings
    from ptdp_compiler.passes.analyze import is_grouped_mm
    fam = "qwen2_moe"
    args, kwargs = Z.batch(fam, 2)                 # 2 x 16 tokens, top-2 of 4 experts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = _passes(Z.build(fam), args, kwargs, rank=1, cp=2).gm
    assert not [w for w in caught if "whole sequence" in str(w.message)]
    gathers = [n for n in gm.graph.nodes if n.target is torch.ops.ptdp.cp_gather.default]
    assert len(gathers) == 4                       # K and V of each of the 2 layers
    slots = 2 * 16 * 2 // 2
    rows = [n.meta["val"].shape[0] for n in gm.graph.nodes if is_grouped_mm(n.target)]
    assert rows == [slots] * 4, rows               # gate_up and down of 2 layers
    sorts = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sort.default]
    assert [tuple(n.args[0].meta["val"].shape) for n in sorts] == [(slots,)] * 2
    test_context_parallel_matches_one_device(world, fam, "cp2")


class _CountedExperts(nn.Module):
    """Attention, then tokens sorted by a routed expert id whose per-expert counts also
    scale the experts' weights: counts of this rank's tokens would give another number, so
    the expert block falls back to the whole sequence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(32, 16)
        self.qkv, self.router, self.head = nn.Linear(16, 48), nn.Linear(16, 4), nn.Linear(16, 32)
        self.experts = nn.Parameter(torch.randn(4, 16, 16) * 0.1)

    def forward(self, ids, targets):
        x = self.emb(ids)
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2) \
            .reshape(b, t, 16)
        h = x.reshape(-1, 16)
        e = self.router(h).argmax(-1)
        order = e.argsort()
        counts = torch.histc(e[order].float(), 4, 0, 3)
        wt = self.experts * (1 + counts / e.numel()).view(4, 1, 1)
        y = torch.bmm(h[order].unsqueeze(1), wt[e[order]]).squeeze(1)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel())
        x = x + y[inv].view(b, t, 16)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def test_expert_counts_feeding_the_loss_fall_back_to_the_whole_sequence():
    ids = torch.randint(0, 32, (2, 8))
    with pytest.warns(UserWarning, match=r"argsort.*routed experts were not kept.*per-rank expert counts"):
        gm = _passes(_CountedExperts(), (ids, ids), {}, cp=2).gm
    sort = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.argsort.default)
    assert tuple(sort.meta["val"].shape) == (16,)          # the whole sequence's 2 x 8 tokens


def test_sequence_length_must_split_into_2cp_chunks():
    model = M.build("gpt")
    ids = torch.randint(0, M.VOCAB, (2, 18))
    with pytest.raises(InputShapeError, match=r"pad the inputs by 6 token\(s\) to 24"):
        _passes(model, (ids,), {"targets": ids}, cp=4)


class _CumsumMixer(nn.Module):
    """Tokens mixed by a running sum along the sequence: no attention to gather for."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.out = nn.Linear(16, 32)

    def forward(self, ids, targets):
        h = self.emb(ids).cumsum(1)
        return F.cross_entropy(self.out(h).flatten(0, 1), targets.flatten())


class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.out = nn.Linear(16, 32)

    def forward(self, ids, targets):
        return F.cross_entropy(self.out(self.emb(ids)).flatten(0, 1), targets.flatten())


class _MixedTokens(nn.Module):
    """Causal attention, then two token mixers context parallelism has no rule for: a
    running sum along the sequence and logits shifted by one token (the labels shifted on
    the activations' side). They run on the all-gathered whole sequence."""

    def __init__(self, cumsum: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.cumsum = cumsum
        self.emb = nn.Embedding(32, 16)
        self.qkv, self.proj, self.head = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 32)

    def forward(self, ids, targets):
        x = self.emb(ids)
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, 16))
        if self.cumsum:
            x = x + 0.1 * x.cumsum(1)
        logits = self.head(x)[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten())


@pytest.mark.parametrize("model,match", [
    (_CumsumMixer, r"cumsum.*runs along the sequence"),
    (lambda: _MixedTokens(cumsum=False), r"slice.*takes part of the sequence"),
])
def test_strict_refuses_token_mixing_it_has_no_rule_for_by_name(model, match):
    ids = torch.randint(0, 32, (2, 8))
    with pytest.raises(ContextParallelError, match=match):
        _passes(model(), (ids, ids), {}, cp=2, strict=True)


@pytest.mark.parametrize("model,match", [
    (_NoAttention, r"found no attention"),
    (_CumsumMixer, r"found no attention.*cumsum"),
])
def test_a_model_without_attention_is_refused(model, match):
    ids = torch.randint(0, 32, (2, 8))
    with pytest.raises(ContextParallelError, match=match):
        _passes(model(), (ids, ids), {}, cp=2)


def _mixed_job():
    import warnings
    import torch.distributed as dist
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = ptdp.parallelize(_MixedTokens(), codegen="aot_eager", cp=2)
        losses, grads = Z.parallel_sgd(pm, *_mixed_batch(), STEPS, LR)
    return {"losses": [float(x) for x in losses], "grads": grads,
            "warned": [str(w.message) for w in caught if "whole sequence" in str(w.message)
                       and dist.get_rank() == 0]}


def _mixed_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 32, (GB, 16), generator=g)
    return (ids, ids), {}


def test_ops_without_a_rule_run_on_the_whole_sequence_and_match(world):
    ref_losses, ref_grads = M.reference_sgd(_MixedTokens(), *_mixed_batch(), STEPS, LR)
    results = world(2, _mixed_job, timeout=240)
    for res in results:
        assert res["losses"] == pytest.approx([float(x) for x in ref_losses], rel=1e-5)
    for name, want in ref_grads[-1].items():
        M.assert_close_tensor(name, results[0]["grads"][-1][name], want, 1e-4)
    assert results[0]["warned"] and "cumsum" in results[0]["warned"][0]


# ---- cp in the planner --------------------------------------------------------------------------
def test_planner_searches_cp_with_kv_traffic_and_sequence_local_memory():
    """The planner tries cp | world/(t·p) with 2·cp | s: per-rank compute and activations
    are 1/cp (attention scores keep all s keys), each layer adds the K/V all-gather forward
    and gather + reduce-scatter backward (3 · 2·(cp−1)/cp · b·s·kv/t elements, kv = K's
    width before repeat_kv, read from the graph), and gradients are summed over dp × cp.
    A long sequence picks cp; a short one does not; under a memory limit only cp meets,
    the search without cp fails."""
    from ptdp_compiler.errors import MemoryLimitError
    from ptdp_compiler.planner import Cluster, CostOptions, gpt_model_cost, model_cost, plan
    from ptdp_compiler.planner.search import Candidate, Evaluator

    llama = M.build("llama")          # 4 query heads, 2 kv heads of 8: K is 16 wide
    mc_small = model_cost(llama, *M.batch("llama", 4))
    assert (mc_small.heads, mc_small.kv_width) == (4, 16)

    cl = Cluster(nodes=2, gpus_per_node=8, gpu="H100-SXM")
    long = gpt_model_cost(4096, 32, 32, seq=32768)
    ev = Evaluator(long, cl, 8)
    est = {}
    for cp in (1, 2, 4):
        c = Candidate(t=4, p=1, d=4 // cp, v=1, b=1, m=2 * cp, sp=True, recompute="selective",
                      cp=cp)
        est[cp] = (ev.evaluate(c), ev.memory_prediction(c).worst)
        kv = 3 * 2 * (cp - 1) / cp * 1 * 32768 * 4096 / 4 * 2
        assert est[cp][0].breakdown["cp_kv_bytes_per_layer"] == pytest.approx(kv)
        assert (est[cp][0].breakdown["cp_kv_per_layer_s"] > 0) == (cp > 1)
    for cp in (2, 4):   # activations per microbatch 1/cp, the state the same
        assert est[cp][1].per_microbatch == pytest.approx(est[1][1].per_microbatch / cp)
        assert est[cp][1].params == est[1][1].params

    chosen = plan(long, cluster=cl, global_batch=8)
    assert chosen.cp > 1 and chosen.to_parallel_config().cp == chosen.cp
    assert f"cp={chosen.cp}" in chosen.explain()
    short = plan(gpt_model_cost(4096, 32, 32, seq=2048), cluster=cl, global_batch=64)
    assert short.cp == 1

    fits = plan(long, cluster=cl, global_batch=8, memory_limit="27GiB")
    assert fits.cp > 1 and fits.memory_gib <= 27
    with pytest.raises(MemoryLimitError):
        plan(long, cluster=cl, global_batch=8, memory_limit="27GiB",
             options=CostOptions(cp_search=False))
    odd = plan(gpt_model_cost(4096, 32, 32, seq=2050), cluster=cl, global_batch=64)
    assert odd.cp == 1 and any("cp needs" in why for _, why in odd.rejected)


# ---- precision and dropout ------------------------------------------------------------------------
def _precision_job(precision: str, dropout: float):
    model = M.build("llama", attention_dropout=dropout)
    args, kwargs = M.batch("llama", GB)
    pm = ptdp.parallelize(model, cp=2, precision=precision, codegen="aot_eager")
    pm.optimizer(torch.optim.SGD, lr=LR)
    losses = []
    for _ in range(STEPS + 1):
        losses.append(float(pm.train_step(*args, **kwargs)))
        pm.step()
    return losses


def test_bf16_tracks_fp32_and_attention_dropout_trains_under_cp(world):
    """bf16 (bf16 compute, fp32 masters) at cp=2 stays within bf16 rounding of one fp32
    device over 3 SGD steps; attention dropout at cp=2 trains (each rank draws its own
    tokens' masks, so the numbers are a different sample than one device's, not equal)."""
    ref, _ = M.reference_sgd(M.build("llama"), *M.batch("llama", GB), STEPS + 1, LR)
    ref = [float(x) for x in ref]
    bf16 = world(2, _precision_job, "bf16", 0.0, timeout=240)
    assert bf16[0] == bf16[1]                      # both cp ranks report the step's loss
    assert bf16[0] == pytest.approx(ref, rel=2e-2), (bf16[0], ref)
    drop = world(2, _precision_job, "fp32", 0.3, timeout=240)
    assert drop[0] == drop[1] and drop[0] != pytest.approx(ref, rel=1e-6)
    assert drop[0] == pytest.approx(ref, rel=0.1) and drop[0][-1] < drop[0][0]

"""The sharding-rule registry and what it promises: models built from torch.nn parts are
sharded and match one device; kv heads < tp are replicated, not refused; a large weight
left whole is never silent (warning, explain, strict=True)."""
import warnings

import pytest
import torch

import ptdp_compiler as ptdp
from ptdp_compiler.passes.rules import RULES, find_rule
from ptdp_compiler.passes.tp_coverage import ReplicatedWeightWarning

from models import assert_close_tensor, parallel_sgd, reference_sgd
from nn_models import VOCAB, TorchNNLM

STEPS, LR = 2, 0.1
DEPTH = {"scan_mix": 1, "state_loop": 1}   # loops over time make big graphs: one layer


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 16), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    return (), {"input_ids": ids, "labels": labels}


def nn_job(block, sp):
    torch.manual_seed(0)
    pm = ptdp.parallelize(TorchNNLM(block, depth=DEPTH.get(block, 2)), tp=2,
                          sequence_parallel=sp, codegen="aot_eager")
    losses, grads = parallel_sgd(pm, *_batch(), STEPS, LR)
    return losses, grads, sum(p.numel() for p in pm.parameters()), \
        {n: str(pp.placement) for n, pp in pm.plan.params.items()}


@pytest.mark.parametrize("block,sp", [("sdpa", False), ("mha", True), ("shape_ops", True),
                                      ("delta_mix", True), ("ssd_mix", True),
                                      ("scan_mix", True), ("odds", False), ("odds", True),
                                      ("sink_mix", True), ("glyph", True), ("no_grad", True),
                                      ("head_conv", False), ("head_conv", True),
                                      ("state_loop", True),
                                      ("rel_bias", True), ("dense_moe", True),
                                      ("normed_key", True)])
def test_torch_nn_lm_tp2_matches_single_device(world, block, sp):
    """nn.RMSNorm (aten.rms_norm), nn.MultiheadAttention (fused in_proj split in blocks) or
    F.scaled_dot_product_attention, tied embedding / LM head; complex rotary, per-head
    vector norms, view_as / reshape_as / expand_as / zeros_like, masked_fill_ and
    log_sigmoid (nn_models.ShapeOpsBlock); a gated linear-
    attention mixer whose fused [q | k | v] has unequal pieces, each split by heads, the
    conv filters with them (nn_models.DeltaMixBlock); Mamba-2's fused [z | x | B | C | dt]
    with B and C whole on every rank and a gated norm over split groups
    (nn_models.SSDMixBlock); Mamba-1's x_proj, row-parallel inside its own block
    (nn_models.ScanMixBlock); a low-rank query, einsum projections, a sub-norm and a gated
    FFN (nn_models.OddsBlock; under SP its gated output goes back to the sequence split
    by one all-to-all); DeepSeek-V4's interleaved rotary, sinks, key built in fresh
    storage and grouped output projection (nn_models.SinkMixBlock); a second id table
    (RoCBert's glyph ids: vocab-parallel, padded, all-reduced whole under SP); a block run
    under torch.no_grad() first (HRM: the region inlined, its result detached); ZAYA's
    attention (a grouped conv1d, one group per q / k head, over [q | k]: each rank's
    groups whole; keys plus the mean of their query heads; a value of two one-head
    pieces, gathered per head at the attention); a
    per-head state updated token by token into a torch.zeros buffer (xLSTM: the buffer
    made split by heads), torch.concatenate, var(unbiased=False); per-head relative
    states clipped, times a bank every head shares, flipped and gathered (Inkling); a
    dense expert FFN through bmm over 3-D weights (Inkling: tokens gathered under SP); keys
    L2-normalised over the whole width, kept whole, met by head-split queries (xLSTM: under
    SP the keys' sequence shard gathered at the matmul)."""
    torch.manual_seed(0)
    model = TorchNNLM(block, depth=DEPTH.get(block, 2))
    full = sum(p.numel() for p in model.parameters())
    ref_losses, ref_grads = reference_sgd(model, *_batch(), STEPS, LR)
    for rank, (losses, grads, nlocal, placed) in enumerate(world(2, nn_job, block, sp,
                                                                timeout=300)):
        for s in range(STEPS):
            assert_close_tensor(f"rank {rank} loss {s}", losses[s], ref_losses[s], rtol=1e-4)
            for n, g in ref_grads[s].items():
                assert_close_tensor(f"rank {rank} step {s} {n}", grads[s][n], g, rtol=1e-4)
        assert nlocal / full <= 0.55, nlocal / full
        if block == "delta_mix":   # [q | k | v] of 16, 16, 32 rows, each split by heads
            for n in ("fused.weight", "conv.weight"):
                assert placed[f"blocks.1.{n}"] == "Shard(0, pieces=[16, 16, 32])", placed
            assert placed["blocks.1.z.weight"] == "Shard(0)", placed
        if block == "ssd_mix":    # [z | x | B | C | dt]: B and C (one group) whole
            assert placed["blocks.0.in_proj.weight"] == "Shard(0, pieces=[32, 32, 4, 4, 4], " \
                "whole=[False, False, True, True, False])", placed
            assert placed["blocks.0.conv.weight"] == "Shard(0, pieces=[32, 4, 4], " \
                "whole=[False, True, True])", placed
            for n in ("a_log", "dt_bias", "gnorm"):
                assert placed[f"blocks.1.{n}"] == "Shard(0)", (n, placed)
        if block == "odds":
            expect = {"q_a.weight": "Shard(0)", "k": "Shard(1)", "o": "Shard(1)",
                      "sub_w": "Shard(0)", "receptance.weight": "Shard(0)",
                      "value.weight": "Shard(1)"}
            for n, pl in expect.items():
                assert placed[f"blocks.1.{n}"] == pl, (n, placed)
        if block == "sink_mix":   # heads split through stack / copy_; o_a split by groups
            expect = {"q_a.weight": "Shard(0)", "kv_a.weight": "Shard(0)",
                      "q_b.weight": "Shard(0)", "kv_b.weight": "Shard(0)", "o_a": "Shard(0)",
                      "sinks": "Shard(0)", "o_b.weight": "Shard(1)"}
            for n, pl in expect.items():
                assert placed[f"blocks.1.{n}"] == pl, (n, placed)
        if block == "normed_key":
            # computed whole (keys normalised over the whole width), stored split by rows
            assert placed["blocks.1.k.weight"] == "Shard(0)", placed
            assert placed["blocks.1.qv.weight"] == "Shard(0, blocks=2)", placed
        if block == "dense_moe":   # each expert's FFN split: in by columns, out by rows
            assert placed["blocks.1.w_in"] == "Shard(2)", placed
            assert placed["blocks.1.w_out"] == "Shard(1)", placed
        if block == "rel_bias":   # the per-head states split; the shared bank whole
            assert placed["blocks.1.rel.weight"] == "Shard(0)", placed
            assert placed["blocks.1.bank"] == "None", placed
        if block == "state_loop":   # the attention block split through the buffer
            assert placed["blocks.0.qkv.weight"] == "Shard(0, blocks=3)", placed
            assert placed["blocks.0.proj.weight"] == "Shard(1)", placed
        if block == "head_conv":   # [q | k] channels, each split by heads; the value's
            # pieces (one head each) split too, each head gathered at the attention
            assert placed["blocks.1.conv.weight"] == "Shard(0, pieces=[32, 16])", placed
            for n in ("q", "k", "v_cur", "v_del"):
                assert placed[f"blocks.1.{n}.weight"] == "Shard(0)", (n, placed)
        if block == "glyph":
            assert placed["glyph.weight"] == "Shard(0, vocabulary padded 61->62)", placed
        if block == "scan_mix":   # x_proj row-parallel; the scan split by channels
            assert placed["blocks.0.x_proj.weight"] == "Shard(1)", placed
            assert placed["blocks.0.in_proj.weight"] == "Shard(0, blocks=2)", placed
            for n in ("conv.weight", "conv.bias", "d"):   # read only by their channels
                assert placed[f"blocks.0.{n}"] == "Shard(0)", (n, placed)
            # dt = softplus(W @ dt + bias[:, None]) and exp(a * dt): found back from the
            # per-time-step slices through the products, the matmul's rows and the bias
            for n in ("dt_proj.weight", "dt_proj.bias", "a_log"):
                assert placed[f"blocks.0.{n}"] == "Shard(0)", (n, placed)


def norm_mix_job(strict, sp=False, gather=True):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        pm = ptdp.parallelize(TorchNNLM("norm_mix"), tp=2, codegen="aot_eager", strict=strict,
                              sequence_parallel=sp, shard_replicated_weights=gather)
        try:
            losses, grads = parallel_sgd(pm, *_batch(), STEPS, LR)
        except ptdp.PTDPError as e:
            return type(e).__name__, str(e), [], None
    placed = {n: str(pp.placement) for n, pp in pm.plan.params.items()}
    return None, pm.explain(), [str(w.message) for w in caught
                                if issubclass(w.category, ReplicatedWeightWarning)], \
        (losses, grads, placed, sum(p.numel() for p in pm.parameters()))


MIX = ["blocks.0.mix.weight", "blocks.1.mix.weight"]


def test_replicated_weight_is_named_in_warning_explain_and_refused_when_strict(world):
    """A linear whose output is layer-normalised over all its features cannot be split: it
    is computed whole. The user is told which weight and why; strict=True refuses before
    training."""
    err, text, warned, _ = world(2, norm_mix_job, False, timeout=300)[0]
    assert err is None, text
    assert len(warned) == 1 and all(n in warned[0] for n in MIX), warned
    assert "layer_norm" in warned[0] and "all-gathered where read" in warned[0], warned
    assert "tensor-parallel coverage" in text and f"gathered {MIX[0]}" in text, text
    res = world(2, norm_mix_job, True, timeout=300)
    for err, msg, _, _ in res:   # every rank refuses alike (none hangs)
        assert err == "ShardingError" and MIX[0] in msg and "strict=True" in msg, msg


@pytest.mark.parametrize("sp", [False, True])
def test_weight_computed_whole_is_stored_split_and_matches_single_device(world, sp):
    """The weight no rule splits is stored split by rows over tp (parameter, gradient and
    optimizer state 1/t per rank) and all-gathered where read; its gradient, complete on
    every rank, keeps this rank's rows. Loss and every gradient equal one device's, with
    and without SP; ``shard_replicated_weights=False`` keeps it whole on every rank (checked
    without SP only: it is the path every weight took before)."""
    torch.manual_seed(0)
    model = TorchNNLM("norm_mix")
    full = sum(p.numel() for p in model.parameters())
    ref_losses, ref_grads = reference_sgd(model, *_batch(), STEPS, LR)
    kept = {}
    for gather in (True, False) if not sp else (True,):
        for rank, (err, text, _, got) in enumerate(world(2, norm_mix_job, False, sp, gather,
                                                         timeout=300)):
            assert err is None, text
            losses, grads, placed, nlocal = got
            for s in range(STEPS):
                assert_close_tensor(f"rank {rank} loss {s}", losses[s], ref_losses[s],
                                    rtol=1e-4)
                for n, g in ref_grads[s].items():
                    assert_close_tensor(f"rank {rank} step {s} {n}", grads[s][n], g,
                                        rtol=1e-4)
            for n in MIX:
                assert placed[n] == ("Shard(0)" if gather else "None"), placed
            kept[gather] = nlocal
            assert ("gathered " if gather else "replicated ") + MIX[0] in text, text
    mix = sum(p.numel() for n, p in model.named_parameters() if n in MIX)
    assert kept.get(False, kept[True] + mix // 2) - kept[True] == mix // 2, kept
    assert kept[True] / full <= 0.55, kept[True] / full


def mix_layout_job(kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReplicatedWeightWarning)
        pm = ptdp.parallelize(TorchNNLM("norm_mix"), codegen="aot_eager", **kw)
    losses, grads = parallel_sgd(pm, *_batch(), STEPS, LR)
    return losses, grads, [str(pm.plan.params[n].placement) for n in MIX]


@pytest.mark.parametrize("kw", [
    dict(tp=2, pp=2, virtual_stages=2, microbatches=2, sequence_parallel=True,
         recompute="full"),
    dict(tp=2, dp_shard=2)], ids=["tp2-pp2-interleaved-sp-full", "tp2-dp_shard2"])
def test_weight_computed_whole_composes_with_pipeline_and_fully_shard(world, kw):
    """The gathered weight inside pipeline chunks (one gather per reader, so no cut carries
    a gathered weight; re-gathered under full recompute) and under dp_shard (its tp shard
    split again over dp_shard, gathered twice)."""
    torch.manual_seed(0)
    ref_losses, ref_grads = reference_sgd(TorchNNLM("norm_mix"), *_batch(), STEPS, LR)
    for rank, (losses, grads, placed) in enumerate(world(4, mix_layout_job, kw, timeout=300)):
        assert placed == ["Shard(0)"] * 2, placed
        for s in range(STEPS):
            assert_close_tensor(f"rank {rank} loss {s}", losses[s], ref_losses[s], rtol=1e-4)
            for n, g in ref_grads[s].items():
                assert_close_tensor(f"rank {rank} step {s} {n}", grads[s][n], g, rtol=1e-4)


def mix_adamw_job():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReplicatedWeightWarning)
        pm = ptdp.parallelize(TorchNNLM("norm_mix"), tp=2, dp=2, distributed_optimizer=True,
                              codegen="aot_eager")
    args, kwargs = _batch()
    kwargs = {k: pm.dp_shard(v) for k, v in kwargs.items()}
    pm.optimizer(torch.optim.AdamW, lr=1e-3, max_grad_norm=0.1)
    out = []
    for _ in range(3):
        loss = pm.train_step(*args, **kwargs)
        out.append((loss.item(), pm.step().grad_norm))
    return out


def test_weight_computed_whole_clips_and_steps_like_one_device(world):
    """AdamW with global-norm clipping under ZeRO-1 (tp=2 x dp=2): the gathered weight's
    rows count once in the norm, its optimizer state is split like its storage; losses
    and gradient norms over three steps equal one device's (torch's clip_grad_norm_)."""
    torch.manual_seed(0)
    model = TorchNNLM("norm_mix")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(*_batch()[0], **_batch()[1])
        loss = loss if isinstance(loss, torch.Tensor) else loss[0]
        loss.backward()
        ref.append((loss.item(), torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1).item()))
        opt.step()
    for got in world(4, mix_adamw_job, timeout=300):
        for (l, n), (rl, rn) in zip(got, ref):
            assert abs(l - rl) <= 1e-4 * abs(rl) and abs(n - rn) <= 1e-4 * rn, (got, ref)


def mix_ckpt_job(path, save, kw):
    torch.manual_seed(0 if save else 5)   # a resumed run starts from other weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReplicatedWeightWarning)
        pm = ptdp.parallelize(TorchNNLM("norm_mix"), codegen="aot_eager", **kw)
    pm.optimizer(torch.optim.AdamW, lr=1e-2)
    args, kwargs = _batch()
    if save:
        pm.train_step(*args, **kwargs)
        pm.step()
        pm.save(path)
    else:
        pm.compile(*args, **kwargs)
        pm.load(path)
    pm.train_step(*args, **kwargs)
    pm.step()
    return pm.train_step(*args, **kwargs).item()


def test_checkpoint_of_a_gathered_weight_loads_where_it_is_whole(world, tmp_path):
    """Saved at tp=2 with the weight stored split (and its AdamW state), loaded at tp=2
    with it whole (shard_replicated_weights=False) and on one device: training goes on
    with the same losses."""
    path = str(tmp_path / "ckpt")
    want = world(2, mix_ckpt_job, path, True, dict(tp=2), timeout=300)[0]
    for n, kw in [(2, dict(tp=2, shard_replicated_weights=False)), (1, {})]:
        got = world(n, mix_ckpt_job, path, False, kw, timeout=300)[0]
        assert abs(got - want) <= 1e-5 * abs(want), (kw, got, want)


def falcon_job():
    from benchmarks import zoo_models as Z
    pm = ptdp.parallelize(Z.build("falcon"), tp=2, codegen="aot_eager")
    pm.train_step(*Z.batch("falcon", 2)[0], **Z.batch("falcon", 2)[1])
    return {n: str(pp.placement) for n, pp in pm.plan.params.items()}


def test_multi_query_fused_qkv_splits_queries_and_keeps_the_kv_head_whole(world):
    """Falcon's fused q/k/v with one kv head (< tp=2): the query rows are split, the
    shared key/value rows stay whole on every rank (parity: test_model_zoo)."""
    pytest.importorskip("transformers")
    placements = world(2, falcon_job, timeout=300)[0]
    assert placements["transformer.h.0.self_attention.query_key_value.weight"] == \
        "Shard(0, last 32 replicated)", placements


def test_every_rule_is_registered_by_op_overload():
    aten = torch.ops.aten
    for op in (aten.stack.default, aten.baddbmm.default, aten.rms_norm.default,
               aten.max.dim, aten.logsumexp.default, aten.slice.Tensor, aten.narrow.default,
               aten.scaled_dot_product_attention.default, aten.embedding.default,
               aten.einsum.default, aten.gather.default):
        assert op in RULES, op
    assert find_rule(aten.tanh.default) is RULES["pointwise"]   # by the pointwise tag
    assert find_rule(aten.cumsum.default) is not None
    assert find_rule(aten.nonzero.default) is None   # no rule: a named refusal


def _falcon_train(pm, steps):
    from benchmarks import zoo_models as Z
    args, kwargs = Z.batch("falcon", 4)
    out = []
    for _ in range(steps):
        loss = pm.train_step(*args, **kwargs)
        out.append((float(loss), pm.step().grad_norm))
    return out


def _falcon_pm(tp, distributed):
    from benchmarks import zoo_models as Z
    pm = ptdp.parallelize(Z.build("falcon"), tp=tp, dp=2 if distributed else 1,
                          distributed_optimizer=distributed, codegen="aot_eager")
    pm.optimizer(torch.optim.AdamW, lr=1e-2, max_grad_norm=0.5)
    return pm


def falcon_save_job(path):
    pm = _falcon_pm(2, True)
    first = _falcon_train(pm, 1)
    pm.save(path)
    return first + _falcon_train(pm, 2)


def falcon_resume_job(path):
    from benchmarks import zoo_models as Z
    pm = _falcon_pm(1, False)
    pm.compile(*Z.batch("falcon", 4)[0], **Z.batch("falcon", 4)[1])
    pm.load(path)
    return _falcon_train(pm, 2)


def test_multi_query_tail_counts_once_in_clip_and_checkpoint(world, tmp_path):
    """The kv rows every tp rank holds are one tensor's rows: the global gradient norm
    counts them once (it equals one device's), the checkpoint writes them once, and a
    tp=2 × dp=2 ZeRO-1 checkpoint resumes on one device with the same losses."""
    pytest.importorskip("transformers")
    from benchmarks import zoo_models as Z
    model = Z.build("falcon")
    args, kwargs = Z.batch("falcon", 4)
    model(*args, **kwargs).loss.backward()
    want_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    path = str(tmp_path / "mqa")
    saved = world(4, falcon_save_job, path, timeout=300)[0]
    assert abs(saved[0][1] - want_norm) <= 1e-5 * want_norm, (saved[0][1], want_norm)
    resumed = world(1, falcon_resume_job, path, timeout=300)[0]
    for (a, _), (b, _) in zip(resumed, saved[1:]):
        assert abs(a - b) <= 1e-5 * abs(b), (resumed, saved)


def _passes_rank0(model, args, kwargs, **layout):
    """Rank 0's program after the passes (fake process group, nothing compiled)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from ptdp_compiler.config import ParallelConfig
    from ptdp_compiler.program import build_program
    from ptdp_compiler.runtime.mesh import build_mesh
    cfg = ParallelConfig(**layout)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cfg.tp)
    try:
        return build_program(model, cfg, (args, kwargs, None), build_mesh(1, 1, cfg.tp),
                             dict(model.named_parameters()), until="passes")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sp", [False, True])
def test_position_and_type_tables_split_by_rows_and_reduced_with_the_tokens(sp):
    """BERT's token + type + position embeddings: every table's rows are split and the
    three partial lookups are summed before the one reduction the token embedding needs
    (all-reduce, or reduce-scatter under SP): no table whole, no extra collective.
    Numbers: test_tensor_parallel's BERT / GPT-2 parity cases."""
    pytest.importorskip("transformers")
    from models import batch, build
    from ptdp_compiler.passes.tensor_parallel import count_tp_collectives
    prog = _passes_rank0(build("bert"), *batch("bert", 2), tp=2, sequence_parallel=sp)
    for table in ("position_embeddings", "token_type_embeddings", "word_embeddings"):
        pp = prog.plan.params[f"bert.embeddings.{table}.weight"]
        assert str(pp.placement) == "Shard(0)" and pp.local_shape[0] * 2 == pp.full_shape[0]
    gm = prog.chunks[0].gm
    lookups = [n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert len(lookups) == 3
    counts = count_tp_collectives(gm)
    # 2 layers x 2 row-parallel ends, plus the embedding sum's one reduction; the
    # vocab-parallel cross-entropy all-reduces 3 statistics
    want = {"all_reduce": 3, "reduce_scatter": 5} if sp else {"all_reduce": 5 + 3}
    assert {k: counts.get(k) for k in want} == want, counts


@pytest.mark.parametrize("family,unread", [
    ("bart", "model.decoder.layers.0.encoder_attn.q_proj.weight"),   # no encoder
    ("big_bird", "bert.pooler.weight"),                              # a dead pooler
])
def test_parameters_the_loss_never_reads_are_stored_split(family, unread):
    """BART's decoder as a causal LM has cross-attention weights no token reaches;
    BigBird computes a pooler whose output the loss drops (the dead ops are removed).
    Such weights are stored split by rows (1/t per rank), said in explain's role column."""
    pytest.importorskip("transformers")
    from benchmarks import zoo_models as Z
    model = Z.build(family)
    args, kwargs = Z.batch(family, 2)
    prog = _passes_rank0(model, args, kwargs, tp=2)
    pp = prog.plan.params[unread]
    assert str(pp.placement) == "Shard(0)" and "not read by the forward" in pp.role
    share = sum(c.local_bytes for c in prog.plan.coverage) / \
        sum(p.numel() * 4 for p in model.parameters())
    assert share <= 0.55, share


def test_a_deep_fused_projection_model_learns_each_split_once():
    """Phi-3 with 12 layers (fused q/k/v and gate/up in every layer): what the walk learns
    about one layer's fused weights holds for its namesakes in every layer, so the pass
    converges in a few walks (it once re-walked per weight and gave up past 10)."""
    pytest.importorskip("transformers")
    import transformers as T
    from benchmarks import zoo_models as Z
    from ptdp_compiler.passes import tensor_parallel as tp_pass
    cfg = Z.tiny_config("phi3")
    cfg.num_hidden_layers = 12
    torch.manual_seed(0)
    model = T.Phi3ForCausalLM(cfg).float().train()
    walks, run = [], tp_pass.Rewriter.run
    tp_pass.Rewriter.run = lambda self: walks.append(1) or run(self)
    try:
        prog = _passes_rank0(model, *Z.batch("phi3", 2), tp=2)
    finally:
        tp_pass.Rewriter.run = run
    assert len(walks) <= 4, len(walks)
    for i in range(12):
        pl = prog.plan.params[f"model.layers.{i}.self_attn.qkv_proj.weight"].placement
        assert "blocks" in str(pl), pl


class _FusedBlock(torch.nn.Module):
    """A fused up-projection read as ``k`` blocks (k=2: a gated unit, k=3: one more)."""

    def __init__(self, k, h=16):
        super().__init__()
        self.k, self.up, self.down = k, torch.nn.Linear(h, 12), torch.nn.Linear(12 // k, h)
        self.norm = torch.nn.LayerNorm(h)

    def forward(self, x):
        p = self.up(self.norm(x)).chunk(self.k, -1)
        y = p[0] * p[1] if self.k == 2 else p[0] * p[1] + p[2]
        return x + self.down(y)


class _MixedLM(torch.nn.Module):
    def __init__(self, ks=(3, 2), vocab=32, h=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, h)
        self.layers = torch.nn.ModuleList(_FusedBlock(k, h) for k in ks)
        self.norm, self.head = torch.nn.LayerNorm(h), torch.nn.Linear(h, vocab, bias=False)

    def forward(self, ids, labels):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_namesake_weights_split_differently_are_each_learned():
    """Same name and shape in two layers, but read as 3 blocks in one and 2 in the other:
    the guess from the first layer is corrected for the second, not ping-ponged."""
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 8))
    prog = _passes_rank0(_MixedLM(), (ids, ids), {}, tp=2)
    got = [str(prog.plan.params[f"layers.{i}.up.weight"].placement) for i in (0, 1)]
    assert got == ["Shard(0, blocks=3)", "Shard(0, blocks=2)"], got


class _ScaledMLP(torch.nn.Module):
    """An embedding, then a residual MLP whose hidden channels are scaled by ``gain`` (read only
    against the column-parallel output) and by ``shared``, whose mean is also added to
    the MLP's output (a whole read)."""

    def __init__(self, width=16, inner=32):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, width)
        self.up = torch.nn.Linear(width, inner, bias=False)
        self.down = torch.nn.Linear(inner, width, bias=False)
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, inner))
        self.shared = torch.nn.Parameter(torch.linspace(1.0, 2.0, inner))
        self.norm = torch.nn.RMSNorm(width)
        self.head = torch.nn.Linear(width, VOCAB, bias=False)

    def forward(self, input_ids, labels):
        e = self.emb(input_ids)
        h = torch.relu(self.up(e)) * torch.exp(self.gain)[None, None, :]
        x = e + self.down(h * self.shared) + self.shared.mean()
        logits = self.head(self.norm(x))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_a_parameter_read_only_as_this_ranks_slice_is_stored_split_and_no_other():
    """``gain`` is sliced to the rank's channels by its one reader (through exp and a
    size-1 view): stored Shard(0), no gradient all-reduce. ``shared`` is also read whole (its
    mean): it stays replicated (sliced where the MLP reads it, its gradient summed)."""
    prog = _passes_rank0(_ScaledMLP(), *_batch(), tp=2)
    params = prog.plan.params
    assert str(params["gain"].placement) == "Shard(0)" and params["gain"].local_shape == (16,)
    assert "stored split" in params["gain"].role
    assert not params["gain"].grad_tp_reduce
    assert params["shared"].placement is None and params["shared"].grad_tp_reduce


class _PlainMLPLM(_ScaledMLP):
    """embedding -> up -> relu -> down -> LM head, no residual and no norm."""

    def forward(self, input_ids, labels):
        h = torch.relu(self.up(self.emb(input_ids)))
        logits = self.head(self.down(h))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_a_block_ending_right_before_the_lm_head_leaves_the_head_vocab_parallel():
    """``down`` ends the MLP block and, read by the head with nothing between, looked like
    the start of a block ending at the head: that guess is dropped with the head's row
    role (it was refused: 'a row-parallel linear needs its input split')."""
    prog = _passes_rank0(_PlainMLPLM(), *_batch(), tp=2)
    placed = {n: str(pp.placement) for n, pp in prog.plan.params.items()}
    assert placed["up.weight"] == "Shard(0)" and placed["down.weight"] == "Shard(1)", placed
    assert placed["head.weight"] == "Shard(0)" and placed["emb.weight"] == "Shard(0)", placed


@pytest.mark.parametrize("pl", ["pieces", "whole_pieces", "blocks", "padded"])
def test_a_ranks_boxes_of_the_full_tensor_tile_it_exactly(pl):
    """What a checkpoint stores: each rank's shard (shard_tensor) maps back, box by box
    (runtime.layout.local_to_full), onto exactly its elements of the full tensor (pieces
    kept whole on every rank are written by tp rank 0 only), and the ranks' shards
    together are the whole (unshard_tensors)."""
    from ptdp_compiler.passes.sharding import (PaddedShard, PieceShard, Shard, shard_tensor,
                                               unshard_tensors)
    from ptdp_compiler.runtime.layout import local_to_full
    t = 2
    full = torch.arange(64 * 3.0).reshape(64, 3) if pl != "padded" else \
        torch.arange(63 * 3.0).reshape(63, 3)
    place = {"pieces": PieceShard(0, 1, (16, 16, 32)), "blocks": Shard(0, 4),
             "whole_pieces": PieceShard(0, 1, (16, 8, 8, 32), (False, True, True, False)),
             "padded": PaddedShard(0, 1, 63, 64)}[pl]
    shards = [shard_tensor(full, place, t, r) for r in range(t)]
    assert torch.equal(unshard_tensors(shards, place), full)
    seen = torch.zeros_like(full)
    for r, local in enumerate(shards):
        for lo, fo, sz in local_to_full((0, 0), tuple(local.shape), place, tuple(full.shape),
                                        t, r, skip_tail=True):   # whole pieces: rank 0
            box = local[lo[0]:lo[0] + sz[0], lo[1]:lo[1] + sz[1]]
            assert torch.equal(box, full[fo[0]:fo[0] + sz[0], fo[1]:fo[1] + sz[1]])
            seen[fo[0]:fo[0] + sz[0], fo[1]:fo[1] + sz[1]] += 1
    assert bool((seen == 1).all())

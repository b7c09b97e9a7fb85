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


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 16), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    return (), {"input_ids": ids, "labels": labels}


def nn_job(block, sp):
    torch.manual_seed(0)
    pm = ptdp.parallelize(TorchNNLM(block), tp=2, sequence_parallel=sp, codegen="aot_eager")
    losses, grads = parallel_sgd(pm, *_batch(), STEPS, LR)
    return losses, grads, sum(p.numel() for p in pm.parameters())


@pytest.mark.parametrize("block,sp", [("sdpa", False), ("mha", True), ("shape_ops", True)])
def test_torch_nn_lm_tp2_matches_single_device(world, block, sp):
    """nn.RMSNorm (aten.rms_norm), nn.MultiheadAttention (fused in_proj split in blocks) or
    F.scaled_dot_product_attention, tied embedding / LM head; complex rotary, per-head
    vector norms, view_as / reshape_as / expand_as / zeros_like, masked_fill_ and
    log_sigmoid (nn_models.ShapeOpsBlock)."""
    torch.manual_seed(0)
    model = TorchNNLM(block)
    full = sum(p.numel() for p in model.parameters())
    ref_losses, ref_grads = reference_sgd(model, *_batch(), STEPS, LR)
    for rank, (losses, grads, nlocal) in enumerate(world(2, nn_job, block, sp, timeout=300)):
        for s in range(STEPS):
            assert_close_tensor(f"rank {rank} loss {s}", losses[s], ref_losses[s], rtol=1e-4)
            for n, g in ref_grads[s].items():
                assert_close_tensor(f"rank {rank} step {s} {n}", grads[s][n], g, rtol=1e-4)
        assert nlocal / full <= 0.55, nlocal / full


def falcon_job(strict):
    from benchmarks import zoo_models as Z
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = ptdp.parallelize(Z.build("falcon"), tp=2, codegen="aot_eager", strict=strict)
        args, kwargs = Z.batch("falcon", 2)
        try:
            pm.train_step(*args, **kwargs)
        except ptdp.PTDPError as e:
            return type(e).__name__, str(e), []
    return None, pm.explain(), [str(w.message) for w in caught
                                if issubclass(w.category, ReplicatedWeightWarning)]


def test_replicated_weight_is_named_in_warning_explain_and_refused_when_strict(world):
    """Falcon's fused q/k/v holds one kv head (multi-query) < tp=2: it stays whole. The
    user is told which weight and why; strict=True refuses before training."""
    pytest.importorskip("transformers")
    err, text, warned = world(2, falcon_job, False, timeout=300)[0]
    assert err is None, text
    name = "transformer.h.0.self_attention.query_key_value.weight"
    assert len(warned) == 1 and name in warned[0] and "1 head(s) < tp=2" in warned[0], warned
    assert "tensor-parallel coverage" in text and f"replicated {name}" in text, text
    res = world(2, falcon_job, True, timeout=300)
    for err, msg, _ in res:   # every rank refuses alike (none hangs)
        assert err == "ShardingError" and name in msg and "strict=True" in msg, msg


def test_every_rule_is_registered_by_op_overload():
    aten = torch.ops.aten
    for op in (aten.stack.default, aten.baddbmm.default, aten.rms_norm.default,
               aten.max.dim, aten.logsumexp.default, aten.slice.Tensor, aten.narrow.default,
               aten.scaled_dot_product_attention.default, aten.embedding.default):
        assert op in RULES, op
    assert find_rule(aten.tanh.default) is RULES["pointwise"]   # by the pointwise tag
    assert find_rule(aten.cumsum.default) is not None
    assert find_rule(aten.nonzero.default) is None   # no rule: a named refusal

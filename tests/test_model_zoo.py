"""A fast subset of the model zoo (benchmarks/model_zoo.py): a few Hugging Face families,
one per sharding rule they need (plain GQA decoders are covered by test_tensor_parallel),
trained at tp=2 against the same model on one device.
Each must match (loss and every gradient) and hold at most 0.55 of the parameters per rank.
The whole zoo runs in the benchmark; this file stays under ~90 s on 2 cores."""
import pytest

from benchmarks import zoo_models as Z
from benchmarks.model_zoo import GB, RTOL, compare, zoo_job

# family -> None (expected ok) or the reason it is expected to fail today (xfail, not
# strict: the missing sharding rules are being added; a pass is then reported as XPASS)
FAST = {
    "phi3": None,       # slices of a fused qkv / gate-up projection
    "codegen": None,    # aten.stack of interleaved rotary halves
    "bloom": None,      # aten.baddbmm with ALiBi biases (sharded with the heads)
    "qwen3": None,      # per-head q/k RMSNorm over head_dim is not a barrier
    "mixtral": None,    # MoE: expert tensor parallelism (3-D expert weights)
    "falcon": None,     # multi-query fused qkv: queries split, the kv head's rows replicated
    "gpt_oss": None,    # MoE with attention sinks, interleaved gate/up (strided slice)
    "llama4_text": None,  # experts through bmm over 3-D weights; the router's top-k is a
                          # barrier (it stays replicated); complex rotary (view_as_complex)
    "diffllama": None,  # attention output cut in head halves: q, k, v heads in 2 blocks,
                        # values tiled (repeat) back to every head
}


def _params(family, reason):
    return pytest.param(family, marks=pytest.mark.xfail(strict=False, reason=reason)) \
        if reason else family


@pytest.mark.parametrize("family", [_params(f, r) for f, r in FAST.items()])
def test_zoo_family_tp2(world, family):
    ref = Z.reference(family, GB)
    full = sum(g.numel() for g in ref[1][0].values())
    res = world(2, zoo_job, family, {"tp": 2}, timeout=300)
    worst, where, problem, _ = compare(ref[0], ref[1], res)
    assert problem is None, problem
    assert worst <= RTOL, f"{family}: relative error {worst:.3g} at {where}"
    share = max(r["nlocal"] for r in res) / full
    assert share <= 0.55, (f"{family}: a rank holds {share:.2f} of the parameters; "
                           f"compiler warnings: {res[0]['warnings']}")


def test_zoo_discovers_every_family_and_builds_the_design_ones_tiny():
    fams = Z.families()
    assert len(fams) >= 100, "families come from transformers' causal-LM mapping"
    for fam in Z.DESIGN_FAMILIES:
        if fam not in fams:      # an older transformers may not ship every family
            continue
        cfg = Z.tiny_config(fam)
        assert getattr(cfg, "use_cache", False) is False, fam
        model = Z.build(fam)
        n = sum(p.numel() for p in model.parameters())
        assert n < 400_000, f"{fam}: {n} parameters is not tiny"

"""Models too large for one device: built on the meta device, then loaded from a state dict
or given the single-device initialisation replayed shard by shard. Same shared gloo worlds
and data as tests/test_training.py."""
import pytest
import torch

import ptdp_compiler as ptdp
from tests.models import VOCAB, assert_close_tensor, batch, build
from tests.test_training import GB, LR, _data, _layout, _make, _train

# ---- models too large for one device: built on meta, loaded from a state dict -----------
META_AT = _layout(tp=2, pp=2)


def _meta_job():
    with torch.device("meta"):
        model = build("gpt", n_layer=4)
    pm = _make(META_AT, model=model, opt_cls=torch.optim.SGD, lr=0.5)
    ids, tgt = _data(0)
    pm.compile(pm.dp_shard(ids), targets=pm.dp_shard(tgt))
    held = sum(p.numel() for p in pm.parameters())
    still_meta = all(p.is_meta for p in model.parameters())  # the full model never allocated
    with pytest.raises(ptdp.ConfigError, match="meta device"):
        pm.step()  # refused until the weights are loaded
    ptdp.load_hf(pm, build("gpt", n_layer=4).state_dict())
    loaded = pm.full_state_dict()
    return held, still_meta, loaded, _train(pm, 2)[0]


def test_meta_built_model_equals_eager_after_load_hf(world):
    eager = build("gpt", n_layer=4)
    full = sum(p.numel() for p in eager.parameters())
    opt = torch.optim.SGD(eager.parameters(), lr=0.5)
    want_sd = {n: p.detach().clone() for n, p in eager.named_parameters()}
    want = []
    for s in range(2):
        ids, tgt = _data(s)
        opt.zero_grad()
        loss = eager(ids, tgt)
        loss.backward()
        opt.step()
        want.append(loss.item())
    for held, still_meta, loaded, losses in world(4, _meta_job, timeout=300):
        assert still_meta and held < 0.4 * full, (held, full)  # ≈ 1/4 + tied copy + norms
        for n, t in want_sd.items():
            assert torch.equal(loaded[n], t), n
        assert max(abs(a - b) for a, b in zip(losses, want)) <= 1e-6 * max(want), (losses, want)


# ---- models too large for one device: built on meta, single-device init replayed per shard --
INIT_SEED = 1234


def _unseeded_builder(name):
    """The model constructor as a user writes it (it does not seed: init_weights does)."""
    if name == "gpt":
        from examples.models.gpt import GPT, GPTConfig
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=4, n_head=4, n_embd=32))
    import transformers as T
    T.logging.set_verbosity_error()
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _init_weights_job(name, built_on, layout=None):
    import functools
    builder = functools.partial(_unseeded_builder, name)
    args, kwargs = batch(name, GB)
    with torch.device(built_on):
        model = builder()
    pm = ptdp.parallelize(model, codegen="aot_eager", microbatches=2, **(layout or META_AT))
    args = tuple(pm.dp_shard(a) for a in args)
    kwargs = {k: pm.dp_shard(v) for k, v in kwargs.items()}
    if built_on == "cpu":
        pm.compile(*args, **kwargs)            # a real model: shards re-drawn in place
    pm.init_weights(builder, seed=INIT_SEED)   # meta: applied once the tp/pp layout is fixed
    loss = pm.train_step(*args, **kwargs)
    still_meta = all(p.is_meta for p in model.parameters())  # the full model never allocated
    held = sum(p.numel() for p in pm.parameters())
    return pm.full_state_dict(), float(loss), pm.init_report, still_meta, held


# a meta-built Hugging Face Llama: capture retargets device=meta inside the RoPE higher-order
# op's subgraph and re-makes the KV cache's empty lifted constants on cpu; its non-persistent
# RoPE buffers get the builder's values. Built on cpu: shards re-drawn in place after compile
@pytest.mark.parametrize("name,built_on,layout", [
    ("gpt", "meta", None), ("gpt", "cpu", None),   # Llama: built on meta, sharded below
    ("llama", "meta", dict(dp_shard=2, tp=2))], ids=["gpt-meta", "gpt-cpu",
                                                     "llama-meta-dp_shard2-tp2"])
def test_meta_built_model_draws_single_device_init_numbers(world, name, built_on, layout):
    from tests.models import reference_sgd
    torch.manual_seed(INIT_SEED)
    eager = _unseeded_builder(name)
    want_sd = {n: p.detach().clone() for n, p in eager.named_parameters()}
    args, kwargs = batch(name, GB)
    want_loss = float(reference_sgd(eager, args, kwargs, 1, LR)[0][0])
    largest = max(p.numel() for p in want_sd.values())
    full = sum(p.numel() for p in want_sd.values())
    for sd, loss, report, still_meta, held in world(4, _init_weights_job, name, built_on,
                                                    layout, timeout=300):
        assert held < 0.5 * full, (held, full)
        assert still_meta == (built_on == "meta")
        assert list(sd) == list(want_sd)
        for n, t in want_sd.items():
            assert torch.equal(sd[n], t), n        # exactly the single-device draws
        assert abs(loss - want_loss) <= 1e-6 * abs(want_loss), (loss, want_loss)
        # memory: one full parameter of scratch at a time, and the constructor's own
        # full-size temporaries (GPT's untied head weight, built then discarded) no larger
        assert report.largest_param_numel == largest
        assert 0 < report.peak_scratch_numel <= largest, report
        assert report.peak_other_numel <= largest, report
        # pp=2: a stage holds some of the tensors (dp_shard: a piece of every one)
        assert report.held < report.params or layout is not None, report


def test_init_replay_keeps_elementwise_exact_and_refuses_reads_of_retired_shards():
    """After a parameter is retired to this rank's shard, an elementwise op on it is exact
    on the shard; an op reading the other ranks' elements is refused, never wrong."""
    from ptdp_compiler.passes.sharding import shard_tensor
    from ptdp_compiler.placement import Shard
    from ptdp_compiler.runtime.meta_init import _put_shard, replay_init

    def builder(renorm):
        a, b = torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)   # b's draws retire a
        with torch.no_grad():
            a.weight.mul_(3.0).clamp_(-0.5, 0.5)
            if renorm:
                a.weight.div_(a.weight.norm())
        return torch.nn.Sequential(a, b)

    torch.manual_seed(5)
    want = builder(False)
    shapes = {n: tuple(p.shape) for n, p in want.named_parameters()}
    pl = {n: Shard(0) if len(s) == 2 else None for n, s in shapes.items()}
    take = lambda n, full: shard_tensor(full, pl[n], 2, 1)  # noqa: E731
    put = lambda n, full, piece: _put_shard(full, piece, pl[n], 2, 1)  # noqa: E731
    shards, _, report = replay_init(lambda: builder(False), 5, shapes, take, put)
    assert report.rehydrated >= 1
    for n, p in want.named_parameters():
        assert torch.equal(shards[n], take(n, p.detach())), n
    with pytest.raises(ptdp.ConfigError, match="no longer holds in full"):
        replay_init(lambda: builder(True), 5, shapes, take, put)


def test_init_weights_misuse_is_refused_and_tp1_applies_at_once():
    from examples.models.gpt import GPT, GPTConfig
    cfg = dict(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=4, n_embd=32)
    builder = lambda: GPT(GPTConfig(**cfg))  # noqa: E731
    with torch.device("meta"):
        model = builder()
    pm = ptdp.parallelize(model, codegen="aot_eager")
    with pytest.raises(ptdp.ConfigError, match="different model"):
        pm.init_weights(lambda: GPT(GPTConfig(**{**cfg, "n_embd": 64})), seed=0)
    with pytest.raises(ptdp.ConfigError, match="seed must be an int"):
        pm.init_weights(builder, seed="0")
    with pytest.raises(ptdp.ConfigError, match="must return the nn.Module"):
        pm.init_weights(lambda: None, seed=0)
    pm.init_weights(builder, seed=3)   # tp = pp = 1: the layout is already fixed
    torch.manual_seed(3)
    want = builder()
    for n, t in pm.full_state_dict().items():
        assert torch.equal(t, want.get_parameter(n)), n

def test_meta_built_model_with_meta_buffers_single_device_layout_takes_init_weights():
    """tp=pp=1: parallelize() must not refuse a meta model's buffers before init_weights
    can be called; the first step then has the single-device loss."""
    with torch.device("meta"):
        meta = build("llama")
    pm = ptdp.parallelize(meta, codegen="aot_eager")
    args, kwargs = batch("llama", 4)
    with pytest.raises(ptdp.ConfigError, match="init_weights"):
        ptdp.parallelize(build_meta_llama(), codegen="aot_eager").train_step(*args, **kwargs)
    pm.init_weights(lambda: build("llama"), 0)
    want = build("llama")(*args, **kwargs)
    want = want.loss if hasattr(want, "loss") else want
    assert_close_tensor("first loss", pm.train_step(*args, **kwargs), want.detach(), rtol=1e-6)


def build_meta_llama():
    with torch.device("meta"):
        return build("llama")



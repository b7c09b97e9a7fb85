"""Tiny models the tests use: the project's GPT and Hugging Face models from random
configs (no downloads). None of them is rewritten for the compiler."""
import torch

from examples.models.gpt import GPT, GPTConfig

VOCAB, SEQ = 128, 16


def build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if name == "gpt":
        cfg = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32)
        cfg.update(overrides)
        return GPT(GPTConfig(**cfg))
    import transformers as T
    T.logging.set_verbosity_error()
    if name == "gpt2":
        kw = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        m = T.GPT2LMHeadModel(T.GPT2Config(**{**kw, **overrides}))
    elif name == "llama":
        kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
        m = T.LlamaForCausalLM(T.LlamaConfig(**{**kw, **overrides}))
    elif name == "bert":
        kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
        m = T.BertForMaskedLM(T.BertConfig(**{**kw, **overrides}))
    else:
        raise KeyError(name)
    m.train()
    return m


def batch(name: str, global_batch: int, seed: int = 1):
    """(args, kwargs) of one global batch; some labels are ignored (-100 / -1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (global_batch, SEQ), generator=g)
    if name == "gpt":
        tgt = torch.randint(0, VOCAB, (global_batch, SEQ), generator=g)
        tgt[0, :5] = -1  # ignored positions make the token-count weighting matter
        return (ids,), {"targets": tgt}
    labels = ids.clone()
    if name == "bert":
        masked = torch.rand(global_batch, SEQ, generator=g) < 0.3
        labels[~masked] = -100
    else:
        labels[0, :5] = -100
    return (), {"input_ids": ids, "labels": labels}


def assert_close_tensor(name, got, want, rtol=1e-5):
    """|got - want| <= rtol·|want| + rtol·max|want| (+ tiny) elementwise."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    tol = rtol * want.abs() + rtol * want.abs().max() + 1e-9
    bad = (got - want).abs() > tol
    assert not bad.any(), (f"{name}: max abs err {(got - want).abs().max().item():.3e}, "
                           f"max |want| {want.abs().max().item():.3e}")


def reference_sgd(model, args, kwargs, steps: int, lr: float):
    """The specification: single-device losses and gradients over ``steps`` SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        out = model(*args, **kwargs)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return losses, grads


from benchmarks.zoo_models import parallel_sgd  # noqa: E402,F401  (one SGD loop for tests and the zoo)


def saved_tensor_bytes(step) -> tuple:
    """Run ``step()`` and return (its result, bytes autograd saved for backward meanwhile):
    each storage counted once, parameters left out."""
    seen, total = set(), [0]

    def pack(x):
        key = x.untyped_storage().data_ptr()
        if key not in seen and not isinstance(x, torch.nn.Parameter):
            seen.add(key)
            total[0] += x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = step()
    return out, total[0]

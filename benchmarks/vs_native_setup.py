"""What benchmarks/vs_torch_native.py measures on both sides: the model sizes (read from the
environment, so spawned ranks see what main() was asked for), the layouts, the unmodified
models and their batches."""
from __future__ import annotations

import os

import torch

LOSS_PARALLEL_PP = True   # vocab-parallel loss on the last stage too (as with pp=1)
# model and batch size: "hidden,seq,batch,layers" (read from the environment, so the
# spawned rank processes see what main() was asked for)
SIZE_ENV = "PTDP_VS_NATIVE_SIZE"
DEFAULT_SIZE = "256,128,8,8"
HIDDEN, SEQ, BATCH, LAYERS = (int(x) for x in os.environ.get(SIZE_ENV, DEFAULT_SIZE).split(","))
VOCAB, HEADS = 1024, 4

CONFIGS = {   # name -> ptdp.parallelize keywords (the native side reads the same numbers)
    "tp2": dict(tp=2),
    # native DTensor plans keep each all-gathered linear input for backward; ptdp's default
    # re-gathers it (Megatron's memory-saving choice), sp_regather=False makes the same trade
    "tp2_sp": dict(tp=2, sequence_parallel=True, sp_regather=False),
    "pp2_1f1b": dict(pp=2, microbatches=4),
    "pp2_v2_interleaved": dict(pp=2, virtual_stages=2, microbatches=4),
    "tp2_pp2": dict(tp=2, pp=2, microbatches=4),
}


# ---- models and inputs ------------------------------------------------------------------
def build_model(name: str):
    torch.manual_seed(0)
    if name == "gpt":
        from examples.models.gpt import GPT, GPTConfig
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=LAYERS, n_head=HEADS,
                             n_embd=HIDDEN))
    import transformers as T
    T.logging.set_verbosity_error()
    m = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,
        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        use_cache=False))
    m.train()
    return m


def make_batch(name: str):
    """(ids, targets) of one global batch; every target counts (equal-size microbatches
    then make the mean of microbatch losses the global mean on both sides)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if name == "gpt":
        return ids, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, ids.clone()


def ptdp_inputs(name, ids, tgt):
    """(args, kwargs) of the unmodified model's forward."""
    return ((ids,), {"targets": tgt}) if name == "gpt" else ((), {"input_ids": ids, "labels": tgt})

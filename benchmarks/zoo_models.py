"""Tiny random models of every causal-LM family the installed ``transformers`` ships.

The families are discovered, not listed: every ``model_type`` in
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``. For each, the family's own config class is built
from its defaults with the size fields shrunk generically (any attribute whose name is a
common size field: hidden_size / n_embd / d_model, intermediate_size, layers, heads,
kv heads, head_dim, experts, MLA ranks, vocabulary, positions, layer_types, sliding
window, ...), every dropout probability zeroed (many families read them from the config,
not from ``nn.Dropout`` modules) and ``use_cache=False``. ``FAMILY_OVERRIDES`` holds the
few per-family fixes where the generic shrinking does not give a working model.

A family that cannot train on one device is skipped by ``probe`` (``reference`` raising)
with a short reason; ``STATIC_SKIPS`` names the structural ones up front (encoder-decoder,
pixel/audio inputs, a multimodal wrapper whose text decoder is its own family).

    from benchmarks.zoo_models import families, build, batch, reference
    model = build("llama")                  # nn.Module in train mode, fp32, seeded
    args, kwargs = batch("llama", 4)        # input_ids + labels (some -100)
    losses, grads = reference("llama", 4)   # single-device SGD losses / gradients
"""
from __future__ import annotations

import re

import torch

VOCAB, SEQ = 128, 16
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
EXPERTS, TOPK, MOE_INTER = 4, 2, 64
STEPS, LR = 2, 0.1

# The families DESIGN.md lists as training on one device (tiny configs, transformers 5.24):
# the benchmark must cover at least these. gemma3 is the text decoder (gemma3_text here;
# the "gemma3" model type is the vision-language wrapper).
DESIGN_FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "stablelm",
    "olmo", "olmo2", "falcon", "gpt_bigcode", "bloom", "mpt", "gpt_neo", "codegen",
    "starcoder2", "cohere", "granite", "glm", "glm4", "helium", "smollm3", "exaone4",
    "ernie4_5", "seed_oss", "nemotron", "persimmon", "biogpt", "xglm", "openai-gpt", "gpt2",
    "internlm3", "hunyuan_v1_dense", "gptj", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
    "granitemoe", "deepseek_v3", "gpt_oss",
]
ALIASES = {"gemma3": "gemma3_text", "openai_gpt": "openai-gpt", "gpt-j": "gptj"}

# Skipped before building: structural reasons a tiny text-only causal LM cannot be made.
STATIC_SKIPS = {
    # vision-language / speech wrappers whose text decoder is its own family here
    "gemma3": "multimodal wrapper (vision tower); its text decoder is gemma3_text",
    "gemma3n": "multimodal wrapper (vision + audio towers); its text decoder is gemma3n_text",
    "gemma4": "multimodal wrapper; its text decoder is gemma4_text",
    "gemma4_unified": "multimodal wrapper; its text decoder is gemma4_unified_text",
    "qwen3_5": "multimodal wrapper; its text decoder is qwen3_5_text",
    "qwen3_5_moe": "multimodal wrapper; its text decoder is qwen3_5_moe_text",
    "qwen4_exp": "multimodal wrapper; its text decoder is qwen4_exp_text",
    "dots3_note": "multimodal wrapper; its text decoder is dots3_note_text",
    # needs pixel / audio inputs
    "fuyu": "needs pixel inputs (image patches interleaved with text)",
    "got_ocr2": "needs pixel inputs (OCR vision-language model)",
    "mllama": "needs pixel inputs (cross-attention to a vision encoder)",
    "emu3": "needs image tokens from a VQ-VAE (vision-language)",
    "git": "needs pixel inputs (image-to-text)",
    "phi4_multimodal": "needs pixel / audio inputs (multimodal)",
    "moss_transcribe_diarize": "needs audio inputs (speech model)",
    "moshi": "needs audio codes (speech-text model)",
    "musicgen": "needs audio codebooks (text-to-music decoder)",
    "musicgen_melody": "needs audio codebooks (text-to-music decoder)",
    "trocr": "decoder of an image-to-text encoder-decoder (needs encoder states)",
    "whisper": "speech encoder-decoder",
    "llama4": "multimodal wrapper; its text decoder is llama4_text",
    "blt": "byte-latent transformer (patcher + local encoder/decoder sub-models): no tiny "
           "config from generic shrinking (the single-device step fails or runs > 60 s)",
    "xmod": "needs a language id per batch (XmodPreTrainedModel.set_default_language)",
}

# exact-name size fields -> tiny value (applied where the family's config has the field)
_HIDDEN = ("hidden_size", "n_embd", "d_model", "embed_dim", "emb_dim", "dim", "hidden_dim", "model_dim",
           "embedding_size", "word_embed_proj_dim", "attention_hidden_size",
           "input_embedding_size", "output_embedding_size")   # RemBERT's decoupled widths
_INTER = ("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim",
          "ffn_hidden_size", "intermediate_dim", "inner_hidden_size", "d_ff", "d_inner",
          "mlp_dim", "hidden_dim_ffn", "ffn_inner_hidden_size", "dim_ff", "dff")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
           "encoder_layers", "num_decoder_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
          "encoder_attention_heads", "swa_num_attention_heads")
_KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
       "num_key_value_groups", "swa_num_key_value_heads", "n_head_kv", "num_kv")
_HEAD_DIM = ("head_dim", "kv_channels", "attention_head_size", "swa_head_dim", "d_head",
             "dim_head")
_POS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
        "max_sequence_length", "seq_length", "original_max_position_embeddings",
        "rel_extent")   # Inkling-2's relative-distance bank: a positional extent too
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
            "n_experts", "num_routed_experts")
_TOPK = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "top_k",
         "num_selected_experts", "router_topk", "moe_top_k")
_MOE_INTER = ("moe_intermediate_size", "shared_expert_intermediate_size",
              "expert_intermediate_size", "moe_ffn_hidden_size", "shared_intermediate_size",
              "moe_shared_expert_intermediate_size", "expert_hidden_size", "moe_dim",
              "expert_ffn_hidden_size")
_SHARED_EXPERTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
FIXED = {
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB,
    "shape_vocab_size": 32, "pronunciation_vocab_size": 32, "shape_embed_dim": 32,
    "pronunciation_embed_dim": 32, "zero_expert_num": 2, "o_lora_rank": 16, "o_groups": 2,
    "vocab_size_per_layer_input": VOCAB,
    "ssm_state_size": 16, "mamba_d_ssm": 128, "n_mamba_heads": 8, "mamba_num_heads": 8, "mamba_head_dim": 16,
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "qk_head_dim": 24,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "decoder_sparse_step": 1,
    "n_group": 1, "num_expert_group": 1, "topk_group": 1,
    "rotary_dim": HEAD_DIM // 2, "rotary_emb_base": 10000,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_conv_kernel_dim": 4, "linear_head_dim": 16,
    "linear_num_heads": 4,
    "mamba_d_state": 16, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1,
    "mamba_chunk_size": 16, "mamba_expand": 2, "mamba_d_conv": 4, "mamba_dt_rank": 8,
    "state_size": 16, "time_step_rank": 8, "chunk_size": 16, "n_groups": 1,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "max_window_layers": LAYERS, "router_jitter_noise": 0.0, "output_router_logits": False,
    "use_cache": False, "pretraining_tp": 1, "num_nextn_predict_layers": 0,
    "use_mamba_kernels": False, "attention_window_size": 8,
    # ZAYA's router MLP width (256 beside a hidden size of 2048 when published): left at
    # 256 it made the replicated router 2/3 of the tiny model
    "router_hidden_size": HEAD_DIM,
}
_OPTIONAL_FIXED = {"q_lora_rank"}          # None means "no low-rank q": keep None
_TRUTHY_ONLY = set(_EXPERTS) | set(_SHARED_EXPERTS) | {"sliding_window", "sliding_window_size"}
_DROPOUT = re.compile(r"(dropout|pdrop|layerdrop|drop_prob|drop_path|_drop$|^drop$)")
_PER_LAYER_UNIQUE = ("layer_types", "mlp_layer_types", "layers_block_type", "attention_type",
                     "block_types", "layer_block_types")

# Per-family fixes where generic shrinking does not give a working tiny model.
FAMILY_OVERRIDES: dict = {
    "dbrx": {"d_model": HIDDEN, "n_heads": HEADS, "n_layers": LAYERS, "max_seq_len": 64,
             "attn_config": {"kv_n_heads": KV_HEADS, "attn_pdrop": 0.0, "clip_qkv": None},
             "ffn_config": {"ffn_hidden_size": MOE_INTER, "moe_num_experts": EXPERTS,
                            "moe_top_k": TOPK}},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 8},
    "mamba2": {"num_heads": 8},
    "zaya": {"num_experts_per_tok": 1},
    "reformer": {"is_decoder": True},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
}


def families() -> list:
    """Every causal-LM model_type of the installed transformers, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_class_name(family: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]
    return name if isinstance(name, str) else name[0]


def encoder_like(family: str) -> bool:
    """An encoder used as a decoder (BERT-style ``is_decoder`` flag) or the decoder of an
    encoder-decoder model, judged from the config's defaults (nothing is built)."""
    from transformers import CONFIG_MAPPING
    try:
        d = CONFIG_MAPPING[family]().to_dict()
    except Exception:
        return False
    return bool(d.get("is_encoder_decoder")) or "decoder_layers" in d or \
        ("is_decoder" in d and not d["is_decoder"] and "add_cross_attention" in d)


def _uniq(seq) -> list:
    out = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


def shrink(defaults: dict) -> dict:
    """Tiny overrides for the size fields present in a config's ``to_dict()``."""
    kw: dict = {}
    d = defaults
    layers = LAYERS
    moe = any(k in d for k in _MOE_INTER + _TOPK)
    n_layers = next((d[k] for k in _LAYERS if isinstance(d.get(k), int)), None)
    for key in _PER_LAYER_UNIQUE:   # keep one layer of each distinct kind
        v = d.get(key)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            kinds = _uniq(v)
            layers = max(layers, min(len(kinds), 4))
    for key, v in d.items():
        if key in _HIDDEN and isinstance(v, int):
            kw[key] = HIDDEN
        elif key in _INTER and (isinstance(v, int) or v is None) and key in d:
            if v is not None or key == "n_inner":
                kw[key] = INTER
        elif key in _LAYERS and isinstance(v, int):
            kw[key] = layers
        elif key in _HEADS and isinstance(v, int):
            kw[key] = HEADS
        elif key in _HEAD_DIM and (isinstance(v, int) or v is None):
            kw[key] = HEAD_DIM
        elif key in _POS and isinstance(v, int):
            kw[key] = 64
        elif key in _EXPERTS and ((isinstance(v, int) and v) or (v is None and moe)):
            kw[key] = EXPERTS
        elif key in _TOPK and ((isinstance(v, int) and v) or (v is None and moe)):
            kw[key] = TOPK
        elif key in _MOE_INTER and isinstance(v, int) and v:
            kw[key] = MOE_INTER
        elif key in _SHARED_EXPERTS and ((isinstance(v, int) and v) or (v is None and moe)):
            kw[key] = 1
        elif key == "hidden_size_per_layer_input" and isinstance(v, int) and v:
            kw[key] = 16
        elif key in ("sliding_window", "sliding_window_size") and isinstance(v, int) and v:
            kw[key] = 8
        elif key in FIXED and not isinstance(v, dict):
            if key in _OPTIONAL_FIXED and v is None:
                continue
            kw[key] = FIXED[key]
        elif _DROPOUT.search(key) and isinstance(v, float):
            kw[key] = 0.0
        elif key in _PER_LAYER_UNIQUE and isinstance(v, (list, tuple)) and v \
                and all(isinstance(x, str) for x in v):
            kinds = _uniq(v)
            kw[key] = (kinds * layers)[:layers]
        elif key in ("no_rope_layers",) and isinstance(v, (list, tuple)) and v:
            kw[key] = list(v[:layers]) + [v[-1]] * max(0, layers - len(v))
        elif key == "mlp_only_layers" and isinstance(v, (list, tuple)):
            kw[key] = []
        elif key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                     "decoder_start_token_id", "eod_token_id") and (
                isinstance(v, int) or (isinstance(v, list) and v)):
            kw[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 3)
        elif isinstance(v, list) and v and len(v) == n_layers and \
                all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            # a per-layer size list (e.g. gemma3n's intermediate_size)
            kw[key] = [INTER] * layers if key in _INTER else list(v[:layers])
        elif key == "per_layer_config" and isinstance(v, dict) and v:
            # per-layer overrides keyed by layer index: the first one lands on the last layer
            first = min(v, key=lambda k: int(k))
            kw[key] = {layers - 1: v[first]}
        elif key.endswith("_config") and isinstance(v, dict) and v:
            kw[key] = {**v, **shrink(v)}
    # MLA (DeepSeek-style): the rotary part of a head is qk_rope_head_dim wide
    if "qk_rope_head_dim" in d and "head_dim" in d:
        kw["head_dim"] = FIXED["qk_rope_head_dim"]
    # kv heads: MHA stays MHA (4), grouped/multi-query becomes 2 (tp=2 divides it)
    for key in _KV:
        if key in d:
            v, heads = d[key], next((d[h] for h in _HEADS if isinstance(d.get(h), int)), None)
            if isinstance(v, int) and heads is not None and v < heads:
                kw[key] = KV_HEADS
            elif isinstance(v, int) or v is None:
                kw[key] = HEADS if key != "num_key_value_groups" else 1
    return kw


def tiny_config(family: str):
    """The family's own config class with tiny sizes (dropout 0, use_cache False)."""
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[family]
    defaults = cls().to_dict()
    kw = shrink(defaults)
    for key, v in FAMILY_OVERRIDES.get(family, {}).items():
        if isinstance(v, dict) and isinstance(kw.get(key, defaults.get(key)), dict):
            kw[key] = {**defaults.get(key, {}), **kw.get(key, {}), **v}
        else:
            kw[key] = v
    cfg = cls(**kw)
    for attr in ("use_cache",):
        if hasattr(cfg, attr):
            setattr(cfg, attr, False)
    return cfg


def build(family: str, seed: int = 0):
    """A tiny random model of ``family`` in train mode (fp32), seeded."""
    import transformers as T
    T.logging.set_verbosity_error()
    family = ALIASES.get(family, family)
    cfg = tiny_config(family)
    cls = getattr(T, model_class_name(family))
    torch.manual_seed(seed)
    model = cls(cfg).float()
    model.train()
    if hasattr(model, "loss_type") and model.loss_type is None:
        model.loss_type = "ForCausalLM"
    return model


def batch(family: str, global_batch: int, seed: int = 1, seq: int = SEQ):
    """(args, kwargs) of one global batch: input_ids and labels, a few labels -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (global_batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    return (), {"input_ids": ids, "labels": labels}


def sgd(model, args, kwargs, steps: int = STEPS, lr: float = LR):
    """Single-device SGD: per-step losses and gradients (None -> zeros)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        out = model(*args, **kwargs)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        if loss is None or not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss}")
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: (p.grad.detach().clone() if p.grad is not None
                          else torch.zeros_like(p)) for n, p in model.named_parameters()})
        opt.step()
    return losses, grads


def parallel_sgd(pm, args, kwargs, steps: int, lr: float, after_step=None):
    """The same SGD loop on a ParallelModule (this rank's dp slice of the batch); returns
    global losses and full-shape gradients per step. ``after_step(pm)`` runs after each
    step's gradients are gathered."""
    args = tuple(pm.dp_shard(a) for a in args)
    kwargs = {k: pm.dp_shard(v) for k, v in kwargs.items()}
    opt = torch.optim.SGD(pm.parameters(), lr=lr)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(pm.train_step(*args, **kwargs).detach())
        grads.append(pm.full_grads())
        if after_step is not None:
            after_step(pm)
        opt.step()
    return losses, grads


def reference(family: str, global_batch: int = 4, steps: int = STEPS, lr: float = LR):
    """The specification: the same model trained on one device."""
    return sgd(build(family), *batch(family, global_batch), steps, lr)


def numel(family: str) -> int:
    return sum(p.numel() for p in build(family).parameters())

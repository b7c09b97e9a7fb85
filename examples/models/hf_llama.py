"""A tiny Hugging Face Llama (transformers' own LlamaForCausalLM, the model zoo's tiny
config, random weights) for ``inspect``: the README's layer picture is its layer.

    python -m ptdp_compiler inspect examples/models/hf_llama.py --tp 2 --sequence-parallel
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.zoo_models import batch, build as _build_family  # noqa: E402

FAMILY = "llama"   # any causal-LM model_type of transformers works here


def build():
    return _build_family(FAMILY)


example_inputs, example_kwargs = batch(FAMILY, 2)   # input_ids and labels

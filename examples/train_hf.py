"""Train a Hugging Face causal LM, unmodified, on local CPU ranks with ptdp_compiler.

    python examples/train_hf.py --family qwen3                      # dp=2 × tp=2 × pp=2
    python examples/train_hf.py --family mixtral --sequence-parallel --steps 50
    python examples/train_hf.py --config path/to/config.json --tiny --dp 1 --tp 2 --pp 1
    python examples/train_hf.py --list                              # the families there are

``--family`` names any causal-LM ``model_type`` of the installed transformers (llama,
qwen3, gemma3, mixtral, deepseek_v3, ...): its own config class, shrunk to a tiny model by
the model zoo's rule (benchmarks/zoo_models.py: hidden 64, 2 layers, 4 heads, dropout 0)
and built with its own model class from transformers, with random weights; nothing is
downloaded. ``--config`` takes a config.json instead (as is, or shrunk by the same rule
with ``--tiny``). The vocabulary is set to 256 byte tokens, the corpus and the loop are
train_gpt's (examples/_common.py). MFU counts 6·N FLOPs per token (N: parameters).
"""
from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__" and int(os.environ.get("RANK", "0")) == 0:
    print("ptdp | importing torch, transformers and ptdp_compiler ...", file=sys.stderr,
          flush=True)
_T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402

from examples import _common  # noqa: E402


def hf_config(args):
    """The transformers config of ``--family`` (tiny) or ``--config`` (as is, or tiny)."""
    from benchmarks import zoo_models
    if args.family:
        family = zoo_models.ALIASES.get(args.family, args.family)
        if family not in zoo_models.families():
            raise SystemExit(f"--family {args.family}: not a causal-LM model_type of this "
                             "transformers; see --list")
        if family in zoo_models.STATIC_SKIPS:
            raise SystemExit(f"--family {family}: {zoo_models.STATIC_SKIPS[family]}")
        cfg = zoo_models.tiny_config(family)
    else:
        from transformers import AutoConfig
        with open(args.config) as f:
            d = json.load(f)
        family = d.pop("model_type")
        if args.tiny:
            d.update(zoo_models.shrink(d))
        cfg = AutoConfig.for_model(family, **d)
    cfg.vocab_size = _common.VOCAB
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False   # a cache object in the output breaks torch.export
    return family, cfg


def make_job(args) -> _common.Job:
    import transformers as T
    T.logging.set_verbosity_error()
    family, cfg = hf_config(args)
    model = T.AutoModelForCausalLM.from_config(cfg).float()
    model.train()
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    # Hugging Face models shift the labels themselves: labels are the inputs
    return _common.Job(model, inputs=lambda x, y: ((), {"input_ids": x, "labels": x}),
                       flops_per_step=6 * n * args.batch * args.seq,
                       name=f"{family} ({type(model).__name__}, {n / 1e3:.0f}k parameters)")


def train(args) -> dict:
    return _common.train(args, make_job)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--family", help="a causal-LM model_type of transformers, e.g. qwen3")
    src.add_argument("--config", help="a config.json (any causal-LM model_type)")
    src.add_argument("--list", action="store_true", help="print the families and exit")
    p.add_argument("--tiny", action="store_true", help="with --config: shrink it as the zoo does")
    _common.add_layout_args(p, lr=3e-3)
    p.set_defaults(ckpt_dir="checkpoints/train_hf")
    return p.parse_args(argv)


def main():
    args = parse_args()
    if args.list:
        from benchmarks import zoo_models
        print(" ".join(f for f in zoo_models.families() if f not in zoo_models.STATIC_SKIPS))
        return
    from ptdp_compiler import progress
    progress.say(f"imported in {time.perf_counter() - _T0:.1f} s")
    _common.run(args, make_job)


if __name__ == "__main__":
    main()

"""Train a small GPT on local CPU ranks with ptdp_compiler (the README's main job).

    python examples/train_gpt.py                  # dp=2 × pp=2 × tp=2 on 8 local ranks
    python examples/train_gpt.py --dp 1 --pp 2 --virtual-stages 2 --codegen aot_eager
    python examples/train_gpt.py --dp 1 --tp 4 --pp 2 --sequence-parallel

The model (examples/models/gpt.py) is ordinary single-device code; ptdp_compiler
captures it, compiles it and trains it with tensor (+ sequence), interleaved pipeline and
data parallelism on gloo ranks. The corpus is byte-level text (the Zen of Python and this
package's own docstrings), so nothing is downloaded. Rank 0 reports each compile phase
as it finishes (stderr), then a progress bar (stdout) and a one-line summary.
"""
from __future__ import annotations

import os
import sys
import time

# the first word within a second: importing torch alone takes seconds on a loaded machine
if __name__ == "__main__" and int(os.environ.get("RANK", "0")) == 0:
    print("ptdp | importing torch and ptdp_compiler ...", file=sys.stderr, flush=True)
_T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402

from examples import _common  # noqa: E402
from examples.models.gpt import GPT, GPTConfig  # noqa: E402


def gpt_flops(args) -> float:
    """FLOPs of one training step, Narayanan et al. 2021 (eq. 3): 96·B·s·l·h²·(1 + s/6h +
    V/16lh) counts a recomputed forward; without recomputation 3/4 of the layer term:
    72·B·s·l·h²·(1 + s/6h) + 6·B·s·h·V."""
    B, s, l, h, V = args.batch, args.seq, args.layers, args.width, _common.VOCAB
    return 72 * B * s * l * h * h * (1 + s / (6 * h)) + 6 * B * s * h * V


def make_job(args) -> _common.Job:
    cfg = GPTConfig(vocab_size=_common.VOCAB, block_size=args.seq, n_layer=args.layers,
                    n_head=4, n_embd=args.width, dropout=0.0)
    return _common.Job(GPT(cfg), inputs=lambda x, y: ((x,), {"targets": y}),
                       flops_per_step=gpt_flops(args), name="gpt")


def train(args) -> dict:
    return _common.train(args, make_job)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    _common.add_layout_args(p)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.set_defaults(ckpt_dir="checkpoints/train_gpt")
    return p.parse_args(argv)


def main():
    args = parse_args()
    from ptdp_compiler import progress
    progress.say(f"imported in {time.perf_counter() - _T0:.1f} s")
    _common.run(args, make_job)


if __name__ == "__main__":
    main()

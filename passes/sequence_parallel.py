"""Sequence parallelism (Korthikanti et al. 2022) on top of the tensor-parallel rewrite.

With ``sequence_parallel=True`` the propagation in ``tensor_parallel`` treats the
residual stream as sharded along the sequence instead of replicated:

- the partial sums of a row-parallel linear (and of the vocab-parallel embedding) are
  reduce-scattered along the sequence (``ptdp::sp_scatter``) instead of all-reduced;
- a column-parallel linear (and the LM head) all-gathers its input along the sequence
  (``ptdp::sp_gather``, whose backward is the reduce-scatter that replaces f);
- norms, dropout and residual adds run on the local sequence shard (they are
  pointwise in the sequence); replicated operands with a sequence axis (position
  embeddings, token-type embeddings) are sliced to the rank's part;
- a row-parallel linear's bias joins its reduce-scatter (``ptdp::sp_scatter_bias``):
  the backward all-gathers the output gradient anyway, and its row sum is the full bias
  gradient on every rank, so the bias needs no gradient all-reduce (Megatron sums it);
- parameters used on the sequence shard (norm weights and biases, other biases,
  replicated linears such as an MLM transform) see only their shard's
  gradient: they are wrapped in f so their gradients are summed over tp — one
  ``ptdp::tp_f_bucket`` for all of them, whose backward is a single all-reduce.

The sequence dimension is found from dataflow: it is the second-to-last dimension
of the token embedding's output (``[B, T, C]``), carried through views by the same
rank-factor rule as every other shard (``[B*T, C]`` becomes ``Shard(0, blocks=B)``).

Dropout on the sequence shard (as any dropout of a tp-sharded tensor) draws its own
random numbers on each rank (``ptdp::tp_rank_dropout_mask``, runtime/rng.py), as
Megatron's RNG tracker does; dropout of replicated tensors draws the same numbers on
every tp rank.
"""
from __future__ import annotations

import torch


def describe_sequence_parallel(rw) -> str:
    ag = sum(1 for c in rw.collectives if c[0] == "all_gather")
    rs = sum(1 for c in rw.collectives if c[0] == "reduce_scatter")
    params = sorted(p for p in rw.grad_tp_params if p)
    return (f"{ag} all-gathers before column-parallel linears, {rs} reduce-scatters after "
            f"row-parallel linears / the embedding; {len(params)} replicated parameters act on "
            "the sequence shard and get their gradients summed over tp")


def count_tp_collectives(gm, forward_only: bool = True) -> dict:
    """Counts of the tp collective ops in a graph, by kind ('all_reduce', 'all_gather',
    'reduce_scatter', 'f')."""
    from ptdp_compiler.collectives import FORWARD_KIND
    out: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in FORWARD_KIND:
            k = FORWARD_KIND[n.target] or (
                "f_bucket" if n.target is torch.ops.ptdp.tp_f_bucket.default else "f")
            out[k] = out.get(k, 0) + 1
    return out


__all__ = ["describe_sequence_parallel", "count_tp_collectives", "torch"]

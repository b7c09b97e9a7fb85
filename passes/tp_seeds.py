"""Where tensor parallelism starts: the parameter placements the analysis implies, and
the grouping of replicated parameters into one gradient all-reduce per layer."""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ConfigError, ShardingError
from ptdp_compiler.placement import Shard

from . import analyze as _an
from .sharding import PaddedShard, PieceShard, TailShard, moved, padded_size


def initial_seeds(gm, analysis: _an.Analysis, t: int, sp: bool) -> dict:
    """{parameter: placement} of the column- and row-parallel weights, the LM head and the
    vocab-parallel embeddings (Megatron's padding where t does not divide the vocabulary)."""
    seeds = {}

    def check(n, size, what):
        if size % t:
            raise ConfigError(f"tp={t} does not divide {what} ({size}) of '{n.name}' at "
                              f"{source_line(n)}; choose tp dividing it")
    for n in analysis.column:
        lin = analysis.linears[n]
        check(n, lin.out_features,
              "the attention width (heads·head_dim, the hidden size)"
              if analysis.group_kinds.get(analysis.column[n]) == "attention" else
              "the FFN size")
        seeds[_an.param_name(lin.weight)] = Shard(lin.w_out_dim)
        if lin.bias is not None:
            seeds[_an.param_name(lin.bias)] = Shard(0)
    # split by output rows where t divides them (whole otherwise): low-rank down-projections
    # whose output is gathered, and gates on row-parallel outputs
    for n in [*analysis.gathered, *analysis.gates]:
        lin = analysis.linears[n]
        if lin.out_features % t == 0:
            seeds[_an.param_name(lin.weight)] = Shard(lin.w_out_dim)
            if lin.bias is not None:
                seeds[_an.param_name(lin.bias)] = Shard(0)
    for n in analysis.row:
        lin = analysis.linears[n]
        check(n, lin.weight.meta["val"].shape[lin.w_in_dim],
              "the input features (the attention width, the hidden size)"
              if analysis.group_kinds.get(analysis.row[n]) == "attention" else
              "the input features (the FFN size)")
        seeds[_an.param_name(lin.weight)] = Shard(lin.w_in_dim)
    if analysis.head is not None:
        h = analysis.head
        if analysis.vocab % t:   # Megatron's padding: zero rows up to a multiple of t
            pad = padded_size(analysis.vocab, t)

            def vocab(dim):
                return PaddedShard(dim, 1, analysis.vocab, pad)
        else:
            def vocab(dim):
                return Shard(dim)
        seeds[_an.param_name(h.weight)] = vocab(h.w_out_dim)
        if h.bias is not None:
            seeds[_an.param_name(h.bias)] = vocab(0)
        for e in analysis.vocab_embeddings:
            name = _an.param_name(e.args[0])
            rows = e.args[0].meta["val"].shape[0]
            if name not in seeds:
                seeds[name] = vocab(0) if rows == analysis.vocab else _rows_split(rows, t)
            elif seeds[name] != vocab(0):  # tied to a [in, out] head: not supported
                raise ShardingError(f"embedding '{name}' is tied to an LM head stored [in, out]")
        if analysis.embedding_sum is not None:   # position / type tables: rows split
            for e in analysis.embedding_sum.side_tables:
                seeds[_an.param_name(e.args[0])] = _rows_split(e.args[0].meta["val"].shape[0],
                                                               t)
    for e in analysis.side_embeddings:   # vocab-parallel tables of their own ids
        seeds[_an.param_name(e.args[0])] = _rows_split(e.args[0].meta["val"].shape[0], t)
    for ph in gm.graph.find_nodes(op="placeholder"):
        # a parameter the forward never reads (a decoder's cross-attention when there is
        # no encoder) is only stored: split by rows, it costs 1/t on each rank
        v = ph.meta.get("val")
        if ph.meta.get("ptdp_input_kind") == "param" and not ph.users and \
                isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            seeds[_an.param_name(ph)] = _rows_split(v.shape[0], t)
    if sp:
        if analysis.embed_out_shape is None:
            raise ConfigError("sequence_parallel=True: no token embedding was found to split "
                              "the sequence from; use sequence_parallel=False")
        s = analysis.embed_out_shape[-2]
        if s % t:
            raise ConfigError(f"sequence_parallel=True needs tp={t} to divide the sequence "
                              f"length {s}; pad the sequence or change tp")
    return seeds


def _rows_split(rows: int, t: int):
    """Rows split over t ranks, padded with zero rows where t does not divide them."""
    return Shard(0) if rows % t == 0 else PaddedShard(0, 1, rows, padded_size(rows, t))


def _same_in_every_layer(name: str, analysis: _an.Analysis, siblings: bool,
                         learned: set) -> list:
    """``name`` and, with ``siblings``, the weights of the linears at the same place in the
    other layers (the name with its layer indices replaced, and the same shape) that were
    not learned themselves (``learned``): what one layer's walk learned holds for
    identical layers, so a deep model converges in a few walks instead of one per layer.
    The pass re-walks without this if it was wrong."""
    learned.add(name)
    if not siblings:
        return [name]
    pattern = re.sub(r"\.\d+\.", ".#.", name)
    shapes = {_an.param_name(lin.weight): tuple(lin.weight.meta["val"].shape)
              for lin in analysis.linears.values()}
    return [n for n, shape in shapes.items()
            if n == name or (n not in learned and shape == shapes.get(name) and
                             re.sub(r"\.\d+\.", ".#.", n) == pattern)]


def refine_seeds(seeds: dict, analysis: _an.Analysis, ref, siblings: bool = False,
                 learned: Optional[set] = None) -> dict:
    """``ref.param``'s output rows are whole blocks (a fused q/k/v or gate/up projection):
    re-seed it (and its bias) as ``Shard(dim, blocks)`` (``PieceShard`` for unequal
    pieces) so each rank keeps its slice of every block. With ``ref.tail``: the last rows (a multi-query projection's shared key /
    value head) stay whole on every rank, ``TailShard``."""
    seeds = dict(seeds)
    names = set(_same_in_every_layer(ref.param, analysis, siblings,
                                     set() if learned is None else learned))
    for lin in analysis.linears.values():
        if _an.param_name(lin.weight) in names:
            pl = TailShard(lin.w_out_dim, 1, ref.tail) if ref.tail else \
                PieceShard(lin.w_out_dim, 1, ref.pieces, ref.whole) if ref.pieces else \
                Shard(lin.w_out_dim, ref.outer)
            seeds[_an.param_name(lin.weight)] = pl
            if lin.bias is not None:
                seeds[_an.param_name(lin.bias)] = moved(pl, 0)
    return seeds


def keep_replicated(seeds: dict, analysis: _an.Analysis, keep, siblings: bool = False,
                    learned: Optional[set] = None) -> dict:
    """``keep.param`` (and its bias) stays replicated: a key/value projection with fewer
    heads than tp ranks. The reason is kept for ``explain``."""
    seeds = dict(seeds)
    names = set(_same_in_every_layer(keep.param, analysis, siblings,
                                     set() if learned is None else learned))
    for n, lin in analysis.linears.items():
        name = _an.param_name(lin.weight)
        if name in names:
            seeds.pop(name, None)
            if lin.bias is not None:
                seeds.pop(_an.param_name(lin.bias), None)
            analysis.kept_replicated[name] = keep.reason
            n.meta.setdefault("ptdp", {})["role"] = f"replicated linear: {keep.reason}"
    return seeds


def buckets_by_layer(gm: fx.GraphModule, names: list) -> dict:
    """{parameter: key}: parameters read by the same layer (the element of a layer
    container their first reader belongs to) share a bucket; outside the layers, those of
    one module (e.g. the final norm's weight and bias) do. Per layer, so regional
    compilation sees identical layers and no bucket spans two pipeline stages."""
    from ptdp_compiler.graph_utils import layer_key
    wanted = set(names)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        name = ph.meta.get("ptdp_input_name")
        if name not in wanted or ph.meta.get("ptdp_input_kind") != "param":
            continue
        first = min(ph.users, key=order.__getitem__, default=None)
        key = layer_key(first) if first is not None else None
        if key is None and first is not None:   # outside the layers: the reading module
            stack = first.meta.get("nn_module_stack") or {}
            paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
            key = paths[-1] if paths else None
        out[name] = key if key is not None else f"param:{name}"
    return out

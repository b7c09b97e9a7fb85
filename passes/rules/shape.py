"""Views and layout ops: a sharded dimension moves with the layout; a view keeps the rank
factor a whole factor of one output dimension (``sharding.view_rule``), and the view's
shape constant becomes the local shape. Slices, splits, cat and stack are local off the
sharded dimension; along it, pieces that are whole blocks of a fused projection (q/k/v,
gate/up) are local once the producing weight's rows are permuted (``Refine``)."""
from __future__ import annotations

import itertools
import math
import operator

import torch
import torch.fx as fx

from ptdp_compiler.errors import ConfigError
from ptdp_compiler.placement import Shard

from ..sharding import PaddedShard, PieceShard, TailShard, local_shape, moved, view_rule
from . import KeepReplicated, PlaceBuffer, Refine, buffer_key, rule
from . import pieces as _pieces_mod
from .pieces import VIEWS
from ..walk import _written_buffer
from .pieces import producing_weight as _producing_weight
from .pointwise import PASSTHROUGH

aten = torch.ops.aten

SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
          aten.tensor_split.indices}


def _shape(n) -> tuple:
    return tuple(n.meta["val"].shape)


def _heads_kind(node) -> str:
    """'attention heads' or 'key/value heads' when a view's output feeds attention as the
    query or as a key/value (followed through layout ops), else ''."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.target is aten.scaled_dot_product_attention.default:
                return "attention heads" if u.args[0] is n else "key/value heads"
            if u.target in (aten.matmul.default, aten.bmm.default):
                return "attention heads"
            if u.op == "call_function" and len(seen) < 64:
                stack.append(u)
    return ""


def _heads_kind_of(node) -> str:
    """_heads_kind of ``node`` or of the first view that reshapes it into heads."""
    for n in [node] + list(node.users):
        what = _heads_kind(n)
        if what:
            return what
    return ""


def _emit_view(rw, node, p, full_out):
    new = local_shape(full_out, p, rw.t)
    rw.shape_rewrite(node, full_out, new)
    # reshape, not view: a rank's shard can be strided where the full tensor was not
    # (a slice of a fused projection), and so can the gradient AOTAutograd views back
    tgt = aten.reshape.default
    return rw.emit(tgt, (rw.new(node.args[0]), new), pl=p, like=node)


@rule(*VIEWS)
def view(rw, node):
    xp = rw.placement_of(node.args[0])
    full_in, full_out = _shape(node.args[0]), _shape(node)
    if xp is None:   # a replicated tensor viewed as a sharded one's (full) shape
        return rw.emit(aten.reshape.default, (rw.new(node.args[0]), list(full_out)), pl=None,
                       like=node)
    if isinstance(xp, PaddedShard):
        # the padded vocabulary must stay one whole trailing dimension (logits views
        # between the LM head and the loss: [B, T, V] <-> [B·T, V])
        if xp.dim != len(full_in) - 1 or full_out[-1] != full_in[-1]:
            rw.fail(node, f"the view {list(full_in)} -> {list(full_out)} splits the padded "
                          "vocabulary dimension")
        return _emit_view(rw, node, moved(xp, len(full_out) - 1), full_out)
    p = view_rule(full_in, xp, full_out, rw.t)
    if p is None and isinstance(xp, TailShard):
        rw.fail(node, f"the view {list(full_in)} -> {list(full_out)} splits the replicated "
                      f"tail of {xp}")
    if p is None:
        _refuse_view(rw, node, xp, full_in, full_out)
    if not isinstance(p, TailShard) and full_out[p.dim] % rw.t:
        rw.fail(node, f"tp={rw.t} does not divide {full_out[p.dim]} (dimension {p.dim} of "
                      f"{list(full_out)}; e.g. the number of attention heads)", ConfigError)
    return _emit_view(rw, node, p, full_out)


def _refuse_view(rw, node, xp, full_in, full_out):
    t = rw.t
    outer_total = math.prod(full_in[:xp.dim]) * xp.outer
    before = 1
    for i, o in enumerate(full_out):
        if before == outer_total and o % t:
            what = _heads_kind(node)
            rest, hd = math.prod(full_out[i + 1:]), _head_dim(node)
            if hd and rest != hd and xp.outer == 1 and not isinstance(xp, PaddedShard) and \
                    full_in[xp.dim] % (o * t) == 0 and rest % t == 0:
                # [.., 3·E] -> [.., 3, E]: a fused q/k/v whose blocks hold several heads
                # each (nn.MultiheadAttention's in_proj): split every block
                raise Refine(_producing_weight(rw, node.args[0], node), o)
            if what == "key/value heads" and t % o == 0:
                # kv heads < tp (MQA, GQA): replicate them, as Megatron does
                raise KeepReplicated(_producing_weight(rw, node.args[0], node),
                                     f"{o} key/value heads < tp={t}: each rank uses the "
                                     "head its query heads share")
            if what:
                rw.fail(node, f"tp={t} does not divide the {o} {what} (view {list(full_in)} -> "
                              f"{list(full_out)}); tensor parallelism gives each rank whole "
                              f"heads: choose tp dividing {o}", ConfigError)
            rw.fail(node, f"tp={t} does not divide {o}, the leading factor of the split "
                          f"dimension in {list(full_out)}; choose tp dividing it", ConfigError)
        before *= o
    if full_in[xp.dim] % t:
        rw.fail(node, f"tp={t} does not divide dimension {xp.dim} of size {full_in[xp.dim]}",
                ConfigError)
    rw.fail(node, f"the view {list(full_in)} -> {list(full_out)} mixes the sharded "
                  f"dimension {xp} with others")


@rule(aten.transpose.int, aten.t.default, aten.numpy_T.default, aten.permute.default,
      aten.unsqueeze.default,
      aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.select.int)
def layout(rw, node):
    tgt, x = node.target, rw.new(node.args[0])
    xp = rw.placement_of(node.args[0])
    shape = _shape(node.args[0])
    nd, d = len(shape), xp.dim
    args = list(node.args[1:])
    if tgt is aten.transpose.int:
        a, b = args[0] % nd, args[1] % nd
        p = moved(xp, b if d == a else a if d == b else d)
    elif tgt is aten.t.default:
        p = moved(xp, 1 - d) if nd == 2 else xp
    elif tgt is aten.numpy_T.default:
        p = moved(xp, nd - 1 - d)
    elif tgt is aten.permute.default:
        p = moved(xp, [i % nd for i in args[0]].index(d))
    elif tgt is aten.unsqueeze.default:
        u = args[0] % (nd + 1)
        p = moved(xp, d + 1 if u <= d else d)
    elif tgt is aten.select.int:
        s = args[0] % nd
        if s == d:
            rw.fail(node, "select on the sharded dimension")
        p = moved(xp, d - 1 if s < d else d)
    else:   # squeeze
        dims = args[0] if args else [i for i, s in enumerate(shape) if s == 1]
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [i % nd for i in dims if shape[i % nd] == 1]
        if d in dims:
            rw.fail(node, "squeeze of the sharded dimension")
        p = moved(xp, d - sum(1 for i in dims if i < d))
    return rw.emit(tgt, (x, *args), node.kwargs, pl=p, like=node)


@rule(aten.expand.default, aten.expand_as.default)
def expand(rw, node):
    xp = rw.placement_of(node.args[0])
    shape, full_out = _shape(node.args[0]), _shape(node)
    if xp is None:   # expand_as(replicated, sharded): the full shape, replicated
        return rw.emit(aten.expand.default, (rw.new(node.args[0]), list(full_out)), pl=None,
                       like=node)
    p = moved(xp, xp.dim + len(full_out) - len(shape))
    if shape[xp.dim] != full_out[p.dim]:
        rw.fail(node, "expand of the sharded dimension")
    new = local_shape(full_out, p, rw.t)
    rw.shape_rewrite(node, full_out, new)
    return rw.emit(aten.expand.default, (rw.new(node.args[0]), new), pl=p, like=node)


@rule(aten.view_as_complex.default, aten.view_as_real.default)
def complex_view(rw, node):
    """Complex rotary embeddings: the trailing (re, im) pair is folded into / unfolded
    from a complex element; local unless that pair is the sharded dimension."""
    xp = rw.placement_of(node.args[0])
    nd = len(_shape(node.args[0]))
    if node.target is aten.view_as_complex.default and xp.dim == nd - 1:
        rw.fail(node, "view_as_complex of the sharded (re, im) dimension")
    return rw.copy(node, xp)


def _block_slice(rw, node, x, xp, dim, start, end):
    """Placement and local bounds of ``x[start:end]`` along its sharded dimension ``dim``:
    local when [start, end) is a union of whole blocks of the layout (outer, t, inner)."""
    if isinstance(xp, PieceShard):
        return _pieces_mod.cut(rw, node, xp, start, end)
    full = _shape(x)[dim]
    block = full // xp.outer
    if isinstance(xp, PaddedShard):
        rw.fail(node, "a slice of the padded vocabulary dimension")
    if start % block or end % block:
        if x in rw.sequence_split:   # not a fused weight's pieces: the whole-sequence
            rw.fail(node, f"a slice [{start}:{end}] across the ranks' parts of the "  # fallback
                          "sequence")
        _refuse_fused_kv(rw, x, dim)
        need = full // math.gcd(full, start, end)
        if full % (need * rw.t):
            rw.fail(node, f"tp={rw.t} cannot split the piece [{start}:{end}] of the "
                          f"{full} sharded features evenly", ConfigError)
        raise Refine(_producing_weight(rw, x, node), need)
    return moved(xp, dim, (end - start) // block), start // rw.t, end // rw.t


@rule(aten.slice.Tensor)
def slice_(rw, node):
    x = node.args[0]
    xp = rw.placement_of(x)
    shape = _shape(x)
    nd = len(shape)
    dim = (node.args[1] if len(node.args) > 1 else 0) % nd
    if dim != xp.dim:
        return rw.emit(node.target, (rw.new(x), *node.args[1:]), node.kwargs, pl=xp, like=node)
    size = shape[dim]
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    if isinstance(xp, TailShard):
        return _tail_slice(rw, node, x, xp, dim, size, start, end, step)
    if step != 1:
        # every rank's contiguous chunk starts at a multiple of the step: x[start::step]
        # of the whole is, rank by rank, chunk[start::step] (gpt-oss's interleaved gate/up)
        chunk = size // rw.t
        if xp.outer != 1 or isinstance(xp, (PaddedShard, PieceShard)) or chunk % step or \
                not 0 <= start < step or end != size:
            rw.fail(node, f"the strided slice [{start}:{end}:{step}] of the sharded "
                          f"dimension is not the same slice of every rank's chunk")
        return rw.emit(aten.slice.Tensor, (rw.new(x), dim, start, chunk, step), pl=xp,
                       like=node)
    if (start, end) == (0, size):
        return rw.emit(node.target, (rw.new(x), *node.args[1:]), node.kwargs, pl=xp, like=node)
    p, lo, hi = _block_slice(rw, node, x, xp, dim, start, end)
    rw.shape_rewrite(node, (start, end), (lo, hi))
    return rw.emit(aten.slice.Tensor, (rw.new(x), dim, lo, hi), pl=p, like=node)


def _tail_slice(rw, node, x, xp, dim, size, start, end, step):
    """x[start:end] along a TailShard dimension: the split part exactly (the query heads,
    now a plain Shard) or a piece of the replicated tail (the shared key/value head)."""
    n, hl = size - xp.tail, (size - xp.tail) // rw.t
    if step == 1 and (start, end) == (0, n):
        lo, hi, p = 0, hl, Shard(dim)
    elif step == 1 and n <= start <= end <= size:
        lo, hi, p = hl + start - n, hl + end - n, None
    else:
        rw.fail(node, f"the slice [{start}:{end}:{step}] cuts across the split part and the "
                      f"replicated tail of {xp}")
    rw.shape_rewrite(node, (start, end), (lo, hi))
    return rw.emit(aten.slice.Tensor, (rw.new(x), dim, lo, hi), pl=p, like=node)


@rule(aten.narrow.default)
def narrow(rw, node):
    x, dim, start, length = node.args[:4]
    xp = rw.placement_of(x)
    nd = len(_shape(x))
    if dim % nd != xp.dim:
        return rw.emit(node.target, (rw.new(x), *node.args[1:]), pl=xp, like=node)
    p, lo, hi = _block_slice(rw, node, x, xp, dim % nd, start, start + length)
    rw.shape_rewrite(node, (start, start + length), (lo, hi))
    return rw.emit(aten.slice.Tensor, (rw.new(x), dim % nd, lo, hi), pl=p, like=node)


@rule(*SPLITS)
def split(rw, node):
    x = node.args[0]
    xp = rw.placement_of(x)
    nd = len(_shape(x))
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd
    outs = node.meta["val"]
    if dim != xp.dim:
        n = rw.emit(node.target, (rw.new(x), *node.args[1:]), node.kwargs, like=node)
        rw.placement[n] = [xp] * len(outs)
        return n
    full = _shape(x)[dim]
    sizes = [o.shape[dim] for o in outs]
    block = full // xp.outer
    if isinstance(xp, PaddedShard):
        rw.fail(node, "a split of the padded vocabulary dimension")
    if isinstance(xp, TailShard):   # [queries | replicated k, v]: split as they are laid out
        if sizes[0] != full - xp.tail:
            rw.fail(node, f"the split {sizes} cuts across the replicated tail of {xp}")
        local = [sizes[0] // rw.t] + sizes[1:]
        rw.shape_rewrite(node, sizes, local)
        n = rw.emit(aten.split_with_sizes.default, (rw.new(x), local, dim), like=node)
        rw.placement[n] = [moved(Shard(dim), dim)] + [None] * (len(sizes) - 1)
        return n
    if isinstance(xp, PieceShard):
        cuts = [_pieces_mod.cut(rw, node, xp, a, a + s)
                for a, s in zip(itertools.accumulate([0] + sizes[:-1]), sizes)]
        local = [hi - lo for _, lo, hi in cuts]
        rw.shape_rewrite(node, sizes, local)
        n = rw.emit(aten.split_with_sizes.default, (rw.new(x), local, dim), like=node)
        rw.placement[n] = [p for p, _, _ in cuts]
        return n
    if any(s % block for s in sizes):
        _refuse_fused_kv(rw, x, dim)
        parts = _pieces_mod.partition(rw, x, xp, dim, sorted(
            (g for g in node.users if g.target is operator.getitem), key=lambda g: g.args[1]))
        if parts:
            raise Refine(_producing_weight(rw, x, node), 1, pieces=parts[0], whole=parts[1])
        need = full // math.gcd(full, *sizes)
        if full % (need * rw.t):
            rw.fail(node, f"tp={rw.t} cannot split each of the pieces {sizes}", ConfigError)
        raise Refine(_producing_weight(rw, x, node), need)
    local = [s // rw.t for s in sizes]
    rw.shape_rewrite(node, sizes, local)
    n = rw.emit(aten.split_with_sizes.default, (rw.new(x), local, dim), like=node)
    rw.placement[n] = [moved(xp, dim, s // block) for s in sizes]
    return n


@rule(aten.unbind.int)
def unbind(rw, node):
    x = node.args[0]
    xp = rw.placement_of(x)
    nd = len(_shape(x))
    dim = (node.args[1] if len(node.args) > 1 else 0) % nd
    if dim == xp.dim:
        rw.fail(node, "unbind along the sharded dimension")
    n = rw.emit(node.target, (rw.new(x), *node.args[1:]), node.kwargs, like=node)
    rw.placement[n] = [moved(xp, xp.dim - 1 if dim < xp.dim else xp.dim)] * len(node.meta["val"])
    return n


def _pieces(x: fx.Node, dim: int):
    """(piece node, extent along ``dim``) of every cut of ``x`` along ``dim``: slices,
    narrows, index_select-like indexing and split outputs."""
    for u in x.users:
        nd = len(_shape(x))
        if u.target in (aten.slice.Tensor, aten.narrow.default) and \
                (u.args[1] if len(u.args) > 1 else 0) % nd == dim:
            yield u, u.meta["val"].shape[dim]
        elif u.target is aten.index.Tensor and len(u.args[1]) > dim and \
                isinstance(u.args[1][dim], fx.Node):
            yield u, u.args[1][dim].meta["val"].numel()
        elif u.target in SPLITS and (u.args[2] if len(u.args) > 2 else 0) % nd == dim:
            for g in u.users:
                yield g, g.meta["val"].shape[dim]


def _head_dim(node) -> int:
    """The head size of the attention ``node`` flows into (0 if none is found)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen or len(seen) > 64:
                continue
            seen.add(u)
            if u.target is aten.scaled_dot_product_attention.default:
                return u.args[0].meta["val"].shape[-1]
            stack.append(u)
    return 0


def _refuse_fused_kv(rw, x, dim):
    """A fused q/k/v projection whose key/value piece holds fewer heads than tp cannot be
    split by blocks: keep the projection replicated (attention takes each rank's heads)."""
    trailing = math.prod(_shape(x)[dim + 1:])
    for piece, extent in _pieces(x, dim):
        if _heads_kind_of(piece) != "key/value heads":
            continue
        hd = _head_dim(piece)
        heads = extent * trailing // hd if hd else 0
        if hd and heads % rw.t:
            weight = _producing_weight(rw, x, piece)
            tail = _kv_tail(rw, x, dim)
            if tail:   # [q heads | shared k, v]: split the queries, keep k, v whole
                raise Refine(weight, 1, tail=tail * trailing)
            raise KeepReplicated(weight, f"its key/value part has {heads} head(s) < "
                                 f"tp={rw.t}: each rank uses the head its query heads share")


def _kv_tail(rw, x, dim) -> int:
    """Rows of ``x`` along ``dim`` after its query part when the cuts are [0:n] (queries,
    n heads divisible by tp) and pieces of the rows after n; 0 otherwise. Only for
    ``x`` a plain view of a linear's output (its rows map to the weight's rows)."""
    size = _shape(x)[dim]
    src = x    # back through views / unsqueeze / copies to the linear
    while src not in rw.analysis.linears and src.op == "call_function" and \
            src.target in PASSTHROUGH | VIEWS | {aten.unsqueeze.default}:
        src = src.args[0]
    lin = rw.analysis.linears.get(src)
    # x's dims from ``dim`` on must be the linear's output features, laid out as they are
    if lin is None or lin.w_out_dim != 0 or \
            math.prod(_shape(x)[dim:]) != _shape(src)[-1] or \
            math.prod(_shape(x)[:dim]) != math.prod(_shape(src)[:-1]):
        return 0
    n = None
    for u in x.users:     # a split: the first piece is the queries, the rest k and v
        if u.target in SPLITS and (u.args[2] if len(u.args) > 2 else 0) % (dim + 1) == dim:
            n = u.meta["val"][0].shape[dim]
            return size - n if 0 < n < size and n % rw.t == 0 else 0
    for piece, _ in _pieces(x, dim):
        if piece.target is aten.slice.Tensor and (piece.args[2] if len(piece.args) > 2 else 0) \
                in (0, None):
            end = piece.args[3] if len(piece.args) > 3 else size
            n = end + size if end < 0 else min(end, size)
    if not n or n >= size or n % rw.t:
        return 0
    for piece, _ in _pieces(x, dim):
        if piece.target is aten.index.Tensor:
            vals = _small_constant(piece.args[1][dim])
            if vals is None or not bool(((vals % size) >= n).all()):
                return 0
        elif piece.target is aten.slice.Tensor and piece.args[2] not in (0, None):
            start = piece.args[2] + size if piece.args[2] < 0 else piece.args[2]
            if start < n:
                return 0
    return size - n


@rule(operator.getitem)
def getitem(rw, node):
    src, i = node.args
    v = rw.new(src)
    pls = rw.placement.get(v)
    p = pls[i] if isinstance(pls, (list, tuple)) else None
    return rw.emit(operator.getitem, (v, i), pl=p, rg=rw.needs_grad.get(v, False), like=node)


def _joined(rw, node, tensors):
    """The common placement of the sharded pieces of a cat / stack (piece coordinates)."""
    shard = None
    for a in tensors:
        p = rw.placement_of(a)
        if p is not None:
            if shard is not None and p != shard:
                rw.fail(node, f"pieces sharded differently ({shard} vs {p})")
            shard = p
    return shard


def _localized(rw, node, pieces, shard, ndim) -> list:
    """The pieces of a cat / stack on this rank: replicated ones sliced to ``shard``."""
    out = []
    for a in pieces:
        v = rw.new(a)
        if rw.placement.get(v) is None:
            v = rw.localize(v, tuple(a.meta["val"].shape), shard, ndim, node)
        out.append(v)
    return out


@rule(aten.cat.default, aten.concatenate.default)
def cat(rw, node):
    tensors = node.args[0]
    m = node.meta["val"].dim()
    dim = (node.args[1] if len(node.args) > 1 else 0) % m
    shard = _joined(rw, node, tensors)
    pieces = [a for a in tensors if not (a.meta["val"].dim() == 1 and a.meta["val"].numel() == 0)]
    if shard.dim == dim:
        # along the sharded dimension: every piece sharded the same way makes a block layout
        sizes = [a.meta["val"].shape[dim] for a in pieces]
        pls = [rw.placement_of(a) for a in pieces]
        if len(set(sizes)) > 1 or any(isinstance(p, PieceShard) for p in pls):
            out = _pieces_mod.joined(rw, node, pls, sizes, dim)
            return rw.emit(aten.cat.default, ([rw.new(a) for a in pieces], dim), pl=out,
                           like=node)
        if any(p is None for p in pls) or isinstance(shard, PaddedShard):
            rw.fail(node, "cat along the sharded dimension of pieces that are not all "
                          "sharded alike")
        out = moved(shard, dim, shard.outer * len(pieces))
        return rw.emit(aten.cat.default, ([rw.new(a) for a in pieces], dim), pl=out, like=node)
    return rw.emit(aten.cat.default, (_localized(rw, node, pieces, shard, m), dim), pl=shard,
                   like=node)


@rule(aten.stack.default)
def stack(rw, node):
    tensors = node.args[0]
    m = node.meta["val"].dim()
    dim = (node.args[1] if len(node.args) > 1 else 0) % m
    shard = _joined(rw, node, tensors)
    out = moved(shard, shard.dim + 1 if dim <= shard.dim else shard.dim)
    return rw.emit(aten.stack.default, (_localized(rw, node, tensors, shard, m - 1), dim),
                   pl=out, like=node)


@rule(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default,
      aten.new_full.default, aten.new_empty_strided.default)
def new_factory(rw, node):
    """A fresh tensor shaped like the sharded one it is made from (the same extent on the
    sharded dimension) is sharded alike and made at the local shape; any other shape is
    a replicated tensor of its own."""
    x = node.args[0]
    xp = rw.placement_of(x)
    size, full = list(node.args[1]), _shape(x)
    if len(size) == len(full) and size[xp.dim] == full[xp.dim]:
        new = local_shape(size, xp, rw.t)
        rw.shape_rewrite(node, size, new)
        return rw.emit(node.target, (rw.new(x), new, *node.args[2:]), node.kwargs, pl=xp,
                       like=node)
    return rw.emit(node.target, (rw.new(x), *node.args[1:]), node.kwargs, pl=None,
                   like=node)


@rule(aten.copy_.default, aten.copy.default)
def copy_into(rw, node):
    """dst.copy_(src): src takes dst's placement (a replicated src is sliced to it). A
    split src copied into a fresh replicated buffer makes the walk restart with the
    buffer split alike (``PlaceBuffer``)."""
    dst, src = node.args[:2]
    dp, sp = rw.placement_of(dst), rw.placement_of(src)
    if dp is None:
        at = _written_buffer(dst, sp.dim + dst.meta["val"].dim() - src.meta["val"].dim())
        if at is not None and buffer_key(at[0].name) not in rw.seeds and \
                not isinstance(sp, (PieceShard, TailShard)):
            raise PlaceBuffer(at[0].name, moved(sp, at[1]))
        rw.fail(node, f"copying a sharded value ({sp}) into a replicated one")
    nsrc = rw.new(src)
    if sp is not None and rw.sp and src in rw.sequence_split and \
            moved(sp, sp.dim + len(_shape(dst)) - len(_shape(src))) != dp:
        # a replicated projection that ran on the sequence shard (MLA's shared rotary key)
        # copied into head-sharded storage: gather the sequence (the all-gather's backward
        # reduce-scatters each rank's partial gradient)
        nsrc, sp = rw.gathered(nsrc, node, block_input=False), None
    if sp is None:
        nsrc = rw.localize(nsrc, _shape(src), dp, len(_shape(dst)), node)
    elif moved(sp, sp.dim + len(_shape(dst)) - len(_shape(src))) != dp:
        rw.fail(node, f"copying {sp} into {dp}")
    return rw.emit(node.target, (rw.new(dst), nsrc, *node.args[2:]), node.kwargs, pl=dp,
                   like=node)


@rule(aten.index.Tensor)
def index(rw, node):
    """x[..., idx, ...] with one index tensor on a dimension that is not sharded (an
    expert's bias rows, a gathered position): local."""
    x, indices = node.args[0], list(node.args[1])
    xp = rw.placement_of(x)
    if xp is None or any(rw.placement_of(i) is not None for i in indices if
                         isinstance(i, fx.Node)):
        rw.fail(node, "indexing with sharded indices")
    used = [k for k, i in enumerate(indices) if i is not None]
    if isinstance(xp, TailShard) and used == [xp.dim]:
        return _tail_index(rw, node, x, xp, indices)
    if len(used) != 1 or used[0] == xp.dim or indices[used[0]].meta["val"].dim() != 1:
        rw.fail(node, f"indexing dimension(s) {used} of a tensor sharded {xp}")
    new_idx = [rw.new(i) if isinstance(i, fx.Node) else i for i in indices]
    return rw.emit(node.target, (rw.new(x), new_idx), pl=xp, like=node)


def _small_constant(n):
    """The value of a small lifted constant ``n`` is read from (through copies), or None."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in PASSTHROUGH:
        n = n.args[0]
    return n.meta.get("ptdp_small_constant") if isinstance(n, fx.Node) else None


def _tail_index(rw, node, x, xp, indices):
    """x[..., [i], ...] of rows in the replicated tail (Falcon's k = qkv[..., [-2], :]):
    the same rows of this rank's tensor, whose tail is its last ``tail`` rows; the
    result is replicated. Only constant indices can be proven to lie in the tail."""
    idx = indices[xp.dim]
    size = _shape(x)[xp.dim]
    vals = _small_constant(idx)
    if vals is None or vals.dim() != 1 or vals.is_floating_point():
        rw.fail(node, f"indexing {xp} with indices that are not a known constant")
    vals = vals % size
    if not bool(((vals >= size - xp.tail) & (vals < size)).all()):
        rw.fail(node, f"indices {vals.tolist()} reach outside the replicated tail of {xp}")
    # row v of the full tensor (v in the tail) is row v - size of the local one
    rem = rw.emit(aten.remainder.Scalar, (rw.new(idx), size), pl=None, rg=False, like=node)
    local = rw.emit(aten.sub.Scalar, (rem, size), pl=None, rg=False, like=node)
    new_idx = [local if k == xp.dim else (rw.new(i) if isinstance(i, fx.Node) else i)
               for k, i in enumerate(indices)]
    return rw.emit(node.target, (rw.new(x), new_idx), pl=None, like=node)

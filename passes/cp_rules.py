"""Context parallelism's per-op rules: where the sequence split of an op's result lies,
given its inputs' (``Seq(dim, outer)``: dimension ``dim`` laid out as (outer, T, inner),
T/cp positions of it on this rank; ``LOSS``: a reduction over this rank's tokens).

A rule is ``rule(w, node) -> new node`` (``w``: the ``context_parallel.Walker``). It checks
the sequence stays where the op is local, brings whole-sequence operands to this rank's
positions (``w.localize``) or, for attention, keys and values to the whole sequence
(``w.full``), rewrites size constants, and records the result's placement. An op that
mixes tokens and has no rule is refused by the walk, naming it.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ptdp_compiler.placement import Shard

from .sharding import view_rule

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Seq:
    """Dimension ``dim`` laid out as (outer, T, inner); this rank holds T/cp positions."""
    dim: int
    outer: int = 1

    def __str__(self):
        return f"Seq({self.dim})" if self.outer == 1 else f"Seq({self.dim}, blocks={self.outer})"


LOSS = "loss"        # a full reduction over this rank's tokens: only the loss may be one

RULES: dict = {}


def rule(*targets):
    def register(fn):
        for t in targets:
            RULES[t] = fn
        return fn
    return register


def is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _shape(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _named(node) -> dict:
    """The op's arguments by schema name (defaults filled in)."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _seq_in(w, node) -> Seq:
    """The sequence placement of ``node``'s first argument."""
    return w.p(node.args[0])


# ---- ops that keep their input's layout -----------------------------------------------------
SAME = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
        aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
        aten.to.other, aten.lift_fresh_copy.default, aten.dropout.default,
        aten.feature_dropout.default, aten.alpha_dropout.default,
        aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
        aten.full_like.default, aten.rand_like.default, aten.randn_like.default,
        aten._assert_tensor_metadata.default, aten.type_as.default,
        aten.native_dropout.default}
# layout-only ops a whole-sequence K/V is re-made through after its all-gather
CHAIN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
         aten.unsqueeze.default, aten.expand.default, aten.transpose.int, aten.permute.default,
         aten.clone.default, aten.contiguous.default, aten.alias.default,
         aten._to_copy.default, aten.to.dtype, aten.cat.default, aten.squeeze.dim,
         aten.squeeze.dims, aten.squeeze.default, aten.t.default, aten.flatten.using_ints,
         aten.unflatten.int}


@rule(*SAME)
def same(w, node):
    pl = _seq_in(w, node)
    if node.target is aten.native_dropout.default:
        return w.copy(node, [pl, pl])
    return w.copy(node, pl)


@rule("pointwise", aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def pointwise(w, node):
    out = _shape(node)
    tensors = node.all_input_nodes
    if any(w.p(a) == LOSS for a in tensors):
        return loss_arithmetic(w, node)
    m = len(out)
    seqs = {(w.p(a).dim + m - len(_shape(a)), w.p(a).outer)
            for a in tensors if isinstance(w.p(a), Seq)}
    if len(seqs) != 1:
        w.fail(node, f"its operands are split along different dimensions ({seqs})")
    (d, o), = seqs

    def loc(x):
        if not isinstance(x, fx.Node) or isinstance(w.p(x), Seq):
            return w.v(x)
        s = _shape(x)
        if s is None:
            return w.v(x)
        j = d - (m - len(s))
        if j < 0 or s[j] == 1:
            return w.v(x)
        if s[j] != out[d]:
            w.fail(node, f"operand {x.name} {list(s)} does not line up with the sequence")
        return w.localize(x, j, o, node)
    args = fx.node.map_aggregate(node.args, loc)
    kwargs = fx.node.map_aggregate(dict(node.kwargs), loc)
    return w.copy(node, Seq(d, o), args, kwargs)


LINEAR_ON_LOSS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                  aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
                  aten.neg.default}


def loss_arithmetic(w, node):
    """The loss (this rank's tokens' part) scaled or summed with scalars: still a loss."""
    others = [a for a in node.all_input_nodes if w.p(a) != LOSS]
    if node.target not in LINEAR_ON_LOSS or any(
            w.p(a) is not None or (_shape(a) or (0,)) != () for a in others):
        w.fail(node, "the loss over this rank's tokens feeds an op that is not linear in it")
    return w.copy(node, LOSS)


# ---- views and layout -----------------------------------------------------------------------
@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default,
      aten.flatten.using_ints, aten.unflatten.int)
def view(w, node):
    x = node.args[0]
    pl = w.p(x)
    if pl == LOSS:
        return w.copy(node, LOSS)
    out = _shape(node)
    q = view_rule(_shape(x), Shard(pl.dim, pl.outer), out, w.T)
    if q is None:
        w.fail(node, f"the view {list(_shape(x))} -> {list(out)} mixes the sequence with "
                     "another dimension")
    local = list(out)
    local[q.dim] //= w.cp
    target = node.target if node.target in (aten.view.default, aten.reshape.default,
                                            aten._unsafe_view.default) else aten.reshape.default
    return w.emit(target, (w.v(x), local), pl=Seq(q.dim, q.outer), like=node)


@rule(aten.expand.default)
def expand(w, node):
    x, sizes = node.args[0], list(node.args[1])
    pl = w.p(x)
    d = pl.dim + len(sizes) - len(_shape(x))
    if sizes[d] != -1:
        sizes[d] //= w.cp
    return w.emit(node.target, (w.v(x), sizes), node.kwargs, pl=Seq(d, pl.outer), like=node)


@rule(aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
      aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.movedim.int)
def layout(w, node):
    x = node.args[0]
    pl = w.p(x)
    nd = len(_shape(x))
    d, t = pl.dim, node.target
    if t is aten.transpose.int:
        a, b = node.args[1] % nd, node.args[2] % nd
        d = b if d == a else a if d == b else d
    elif t is aten.t.default:
        d = 1 - d if nd == 2 else d
    elif t is aten.permute.default:
        d = [i % nd for i in node.args[1]].index(d)
    elif t is aten.movedim.int:
        src, dst = node.args[1] % nd, node.args[2] % nd
        order = [i for i in range(nd) if i != src]
        order.insert(dst, src)
        d = order.index(d)
    elif t is aten.unsqueeze.default:
        d += node.args[1] % (nd + 1) <= d
    else:   # squeeze: only size-1 dimensions go, never the sequence
        s = _shape(x)
        if t is aten.squeeze.default:
            gone = [i for i in range(nd) if s[i] == 1]
        else:
            dims = node.args[1] if t is aten.squeeze.dims else [node.args[1]]
            gone = [i % nd for i in dims if s[i % nd] == 1]
        d -= sum(1 for i in gone if i < d)
    return w.copy(node, Seq(d, pl.outer))


@rule(aten.slice.Tensor, aten.narrow.default)
def slice_(w, node):
    x = node.args[0]
    pl, s = w.p(x), _shape(x)
    a = _named(node)
    if a["dim"] % len(s) != pl.dim:
        return w.copy(node, pl)
    if _shape(node)[pl.dim] != s[pl.dim]:
        w.fail(node, "it takes part of the sequence (e.g. shifting logits by one token); "
                     "shift the labels instead, as Hugging Face models do")
    return w.copy(node, pl)


@rule(aten.select.int)
def select(w, node):
    x, k = node.args[0], node.args[1] % len(_shape(node.args[0]))
    pl = w.p(x)
    if k == pl.dim:
        w.fail(node, "it picks one position of the sequence (a pooling)")
    return w.copy(node, Seq(pl.dim - (k < pl.dim), pl.outer))


@rule(aten.index.Tensor)
def index(w, node):
    """x[..., idx, ...] with index tensors on other dimensions (Falcon's k = qkv[..., [-2],
    :]): the sequence dimension is not indexed, so it stays (shifted by the index shape)."""
    x, idx = node.args[0], list(node.args[1])
    pl = w.p(x)
    used = [i for i, t in enumerate(idx) if t is not None]
    if pl.dim in used or any(w.p(t) is not None for t in idx if isinstance(t, fx.Node)):
        w.fail(node, "it indexes the sequence")
    if used != list(range(used[0], used[-1] + 1)):
        w.fail(node, "index tensors on non-adjacent dimensions around the sequence")
    bi = max(len(_shape(idx[i])) for i in used)
    d = pl.dim if pl.dim < used[0] else pl.dim - len(used) + bi
    return w.copy(node, Seq(d, pl.outer))


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
      aten.split.sizes, aten.tensor_split.sections)
def split(w, node):
    x = node.args[0]
    pl = w.p(x)
    k = _named(node).get("dim", 0) % len(_shape(x))
    if k == pl.dim:
        w.fail(node, "it splits the sequence")
    d = pl.dim - (k < pl.dim) if node.target is aten.unbind.int else pl.dim
    return w.copy(node, [Seq(d, pl.outer)] * len(node.meta["val"]))


@rule(operator.getitem)
def getitem(w, node):
    pl = w.p(node.args[0])
    return w.copy(node, pl[node.args[1]] if isinstance(pl, list) else pl)


@rule(aten.cat.default, aten.stack.default)
def cat(w, node):
    ts = node.args[0]
    out = _shape(node)
    m = len(out)
    k = _named(node)["dim"] % m
    stack = node.target is aten.stack.default
    seqs = set()
    for a in ts:
        p = w.p(a)
        if isinstance(p, Seq):
            seqs.add((p.dim + (stack and k <= p.dim), p.outer))
    if len(seqs) != 1:
        w.fail(node, f"its operands are split along different dimensions ({seqs})")
    (d, o), = seqs
    if k == d and not stack:
        if any(not isinstance(w.p(a), Seq) and (_shape(a) or (0,)) != (0,) for a in ts):
            w.fail(node, "it joins values along the sequence")
        return w.copy(node, Seq(d, o))
    new = []
    for a in ts:
        s = _shape(a)
        if isinstance(w.p(a), Seq) or s == (0,):
            new.append(w.v(a))
        else:
            new.append(w.localize(a, d - (stack and k <= d), o, node))
    return w.copy(node, Seq(d, o), (new,) + tuple(node.args[1:]))


# ---- reductions, norms --------------------------------------------------------------------------
REDUCE = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
          aten.any.dim, aten.all.dim, aten.any.dims, aten.logsumexp.default,
          aten.var.correction, aten.std.correction, aten.var_mean.correction,
          aten.norm.ScalarOpt_dim, aten.max.dim, aten.min.dim, aten.argmax.default,
          aten.argmin.default, aten.linalg_vector_norm.default, aten.sum.default,
          aten.mean.default, aten.prod.dim_int}
ALONG = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
         aten._log_softmax.default, aten._safe_softmax.default, aten.cumsum.default,
         aten.cumprod.default, aten.sort.default, aten.topk.default, aten.argsort.default}


@rule(*REDUCE)
def reduce(w, node):
    x = node.args[0]
    pl = w.p(x)
    if pl == LOSS:
        w.fail(node, "it reduces the loss of this rank's tokens again")
    nd = len(_shape(x))
    a = _named(node)
    dims = a.get("dim")
    if dims is None or dims == []:
        dims = list(range(nd))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {i % nd for i in dims}
    if pl.dim in dims:
        if _shape(node) == () and node.target in (aten.sum.default, aten.mean.default,
                                                  aten.sum.dim_IntList, aten.mean.dim):
            return w.copy(node, LOSS)
        w.fail(node, "it reduces over the sequence (a pooling / a statistic of all tokens)")
    d = pl.dim if a.get("keepdim") else pl.dim - sum(1 for i in dims if i < pl.dim)
    out = Seq(d, pl.outer)
    return w.copy(node, [out, out] if isinstance(node.meta.get("val"), (tuple, list)) else out)


@rule(*ALONG)
def along(w, node):
    x = node.args[0]
    pl = w.p(x)
    a = _named(node)
    if a.get("dim", -1) % len(_shape(x)) == pl.dim:
        w.fail(node, "it runs along the sequence")
    return w.copy(node, [pl, pl] if isinstance(node.meta.get("val"), (tuple, list)) else pl)


@rule(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
      aten._fused_rms_norm.default)
def norm(w, node):
    x = node.args[0]
    pl = w.p(x)
    if pl.dim >= len(_shape(x)) - len(node.args[1]):
        w.fail(node, "it normalises over the sequence")
    if isinstance(node.meta.get("val"), (tuple, list)):
        return w.copy(node, [pl] * len(node.meta["val"]))
    return w.copy(node, pl)


# ---- linears, matmuls, attention ---------------------------------------------------------------
@rule(aten.linear.default)
def linear(w, node):
    x = node.args[0]
    pl = w.p(x)
    if any(isinstance(w.p(a), Seq) for a in node.args[1:]) or not isinstance(pl, Seq) or \
            pl.dim == len(_shape(x)) - 1:
        w.fail(node, "a linear whose weight or features run along the sequence")
    return w.copy(node, pl)


@rule(aten.addmm.default)
def addmm(w, node):
    bias, x, wt = node.args[:3]
    if isinstance(w.p(bias), Seq) or isinstance(w.p(wt), Seq) or not isinstance(w.p(x), Seq) \
            or w.p(x).dim != 0:
        return matmul(w, node)
    pl = w.p(x)
    b = w.v(bias)
    if len(_shape(bias)) == 2 and _shape(bias)[0] != 1:
        b = w.localize(bias, 0, pl.outer, node)
    return w.copy(node, pl, (b,) + tuple(w.v(a) for a in node.args[1:3]) + tuple(node.args[3:]))


@rule(aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default)
def matmul(w, node):
    """a [.., M, K] @ b [.., K, N]: a sequence-split b (keys: its N or K dimension) is
    all-gathered whole; the result keeps a's split (queries, or a batch dimension)."""
    t = node.target
    bias = None
    if t in (aten.baddbmm.default, aten.addmm.default):
        bias, a, b = node.args[:3]
    else:
        a, b = node.args[:2]
    sa, sb, out = _shape(a), _shape(b), _shape(node)
    na, nb, m = len(sa), len(sb), len(out)
    if na < 2 or nb < 2:
        w.fail(node, "a vector product with a sequence-split operand")
    pa, pb = w.p(a), w.p(b)
    bv = w.v(b)
    if isinstance(pb, Seq) and pb.dim >= nb - 2:
        bv, pb = w.full(b, f"keys / values of {node.name}"), None
    if isinstance(pa, Seq):
        if pa.dim == na - 1:
            w.fail(node, "it contracts over the sequence of its first operand")
        d = m - 2 if pa.dim == na - 2 else pa.dim + m - na
        o = pa.outer
    elif isinstance(pb, Seq):
        d, o = pb.dim + m - nb, pb.outer
    else:
        w.fail(node, "its queries are not split along the sequence but its keys are (an "
                     "attention pooling over the whole sequence)")
    if isinstance(pb, Seq) and (pb.dim + m - nb, pb.outer) != (d, o):
        w.fail(node, "its operands are split along different dimensions")

    def batch_local(x, s, p, cur):
        if isinstance(p, Seq):
            return cur
        j = d - (m - len(s))
        if d >= m - 2 or j < 0 or s[j] == 1:
            return cur
        return w.localize(x, j, o, node)
    av = batch_local(a, sa, pa, w.v(a))
    bv = batch_local(b, sb, pb, bv)
    args = [av, bv]
    if bias is not None:
        s = _shape(bias)
        j = d - (m - len(s))
        bb = w.v(bias) if isinstance(w.p(bias), Seq) or j < 0 or s[j] == 1 else \
            w.localize(bias, j, o, node)
        args = [bb] + args
    return w.copy(node, Seq(d, o), args + list(node.args[len(args):]))


@rule(aten.scaled_dot_product_attention.default)
def sdpa(w, node):
    q, k, v = node.args[:3]
    a = _named(node)
    pq = w.p(q)
    nq = len(_shape(q))
    if not isinstance(pq, Seq) or pq.dim != nq - 2:
        w.fail(node, f"its queries are not split along the sequence ({pq})")
    kv = [w.full(x, f"{'keys' if x is k else 'values'} of {node.name}")
          if isinstance(w.p(x), Seq) else w.v(x) for x in (k, v)]
    mask = a["attn_mask"]
    if isinstance(mask, fx.Node):
        pm, s = w.p(mask), _shape(mask)
        if isinstance(pm, Seq):
            if pm.dim != len(s) - 2:
                w.fail(node, "its mask is split along the key axis")
            mask = w.v(mask)
        elif len(s) >= 2 and s[-2] != 1:
            mask = w.localize(mask, len(s) - 2, 1, node)
        else:
            mask = w.v(mask)
    if a["is_causal"]:
        dev = q.meta["val"].device
        qpos = w.emit(aten.unsqueeze.default, (w.positions(dev, node), 1), like=node)
        kpos = w.emit(aten.arange.default, (w.T,), dict(dtype=torch.int64, device=dev),
                      like=node)
        mask = w.emit(aten.ge.Tensor, (qpos, kpos), like=node)
    kwargs = {"scale": a["scale"]} if a.get("scale") is not None else {}
    if a.get("enable_gqa"):
        kwargs["enable_gqa"] = True
    return w.emit(node.target, (w.v(q), kv[0], kv[1], mask, a["dropout_p"], False), kwargs,
                  pl=Seq(pq.dim), like=node)


@rule(aten.embedding.default)
def embedding(w, node):
    weight, idx = node.args[:2]
    if isinstance(w.p(weight), Seq):
        w.fail(node, "an embedding table split along the sequence")
    return w.copy(node, w.p(idx))


@rule(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default,
      aten.new_full.default, aten.new_empty_strided.default)
def new_tensor(w, node):
    """A fresh tensor of the sizes given (only its dtype / device come from the input). Of
    the input's rank, with the input's sequence length on its sequence dimension, it is
    made at local size (DeepSeek's keys, filled slice by slice): its entries do not depend
    on the position, so that is exactly this rank's part. Otherwise it stays whole (it is
    localized where it meets the sequence split)."""
    x = node.args[0]
    pl, s = w.p(x), _shape(x)
    if isinstance(pl, Seq) and node.target is not aten.new_empty_strided.default and \
            isinstance(node.args[1], (list, tuple)) and len(node.args[1]) == len(s) and \
            node.args[1][pl.dim] == s[pl.dim]:
        sizes = list(node.args[1])
        sizes[pl.dim] //= w.cp
        return w.copy(node, Seq(pl.dim, pl.outer), (w.v(x), sizes) + tuple(node.args[2:]))
    return w.copy(node, None)


# ---- the loss ---# ---- the loss ------------------------------------------------------------------------------------
@rule(aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default)
def token_loss(w, node):
    x, target = node.args[:2]
    pl = w.p(x)
    if not isinstance(pl, Seq) or pl.dim == 1 or len(_shape(x)) < 2:
        w.fail(node, f"the loss's logits are split along {pl}, not a token dimension")
    td = 0 if pl.dim == 0 else pl.dim - 1
    if isinstance(w.p(target), Seq):
        tv = w.v(target)
    else:
        tv = w.localize(target, td, pl.outer, node)
    w.loss_target = (target, td, pl.outer)
    a = _named(node)
    args = [w.v(x), tv] + list(node.args[2:])
    if a["reduction"] == 0:
        return w.copy(node, Seq(td, pl.outer), args)
    w.loss_reduction = a["reduction"]
    return w.copy(node, LOSS, args)


def regathered(nodes) -> set:
    """The K/V all-gathers among ``nodes`` and the layout-only ops (views, a grouped-query
    expand) that lead from each to attention: recomputed in backward from this rank's
    shard (one more all-gather) instead of stored whole, so the activations a rank keeps
    stay 1/cp (the recompute pass tags them as it does SP's re-gathered inputs)."""
    nodes = set(nodes)
    out = set()
    stack = [n for n in nodes if n.op == "call_function"
             and n.target is torch.ops.ptdp.cp_gather.default]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(u for u in n.users if u in nodes and u.target in CHAIN)
    return out

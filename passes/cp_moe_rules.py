"""Context parallelism for routed experts: a mixture-of-experts block sorts *this rank's*
tokens by expert and runs its grouped GEMMs on them, never on the whole sequence.

Hugging Face's MoE blocks (Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, DeepSeek-V3, gpt-oss)
flatten the top-k choices of the N tokens to N·k slots, ``sort`` the slots by expert,
gather the tokens' rows with ``sorted_slot // k``, count each expert's rows (``histc``),
run the grouped GEMMs with the running sum of the counts as offsets, and un-sort with the
inverse permutation (``index_put_(empty, [sorted_slot], arange(N·k))``). Every step works
on any subset of the tokens: run on this rank's N/cp tokens it gives exactly this rank's
rows of the one-device result. Placements beyond ``Seq``:

- ``Bag(key, n)``: dimension 0 holds this rank's rows of an n-row value in a rank-local
  order (the order of the sort ``key``; rows of two Bags line up iff their keys match).
- ``PerRank(key)``: a value of this rank's rows only (the expert counts and their offsets),
  NOT the same on every rank and not a part of the one-device value: it may only flow into
  casts, ``cumsum`` and the grouped GEMMs' offsets. Anything else (an auxiliary load-balance
  loss from the counts) would silently compute another number, so it is refused.
- ``Ref`` (``w.refs``, next to the placement): the value's *entries* are row indices of a
  local array — of ``Seq(0, outer)`` values of n rows (the sort's indices, // k) or of a
  Bag (the inverse permutation). Local indices always address local arrays, because every
  local array is the full one restricted to this rank's tokens in a fixed order, so index
  arithmetic on them stays consistent. Index values may only be indexed with, divided by
  a scalar, inverted or cast to their own dtype: used as data they would differ from one
  device's, so that is refused.

Every refusal here raises ``BagError``; ``context_parallel`` then walks the graph again
with these rules off (the sort runs on the all-gathered whole sequence, warned), because a
Bag has no sequence order to all-gather into: ``Walker.whole`` must never see one.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ContextParallelError

from .analyze import is_grouped_mm
from .cp_rules import ALONG, LOSS, REDUCE, SAME, Seq, _named, _shape, is_pointwise, rule

aten = torch.ops.aten


class BagError(ContextParallelError):
    """The rank-local expert rules met an op they cannot keep local: walk without them."""


@dataclasses.dataclass(frozen=True)
class Bag:
    """Dimension 0: this rank's rows of an ``n``-row value, in the order of sort ``key``."""
    key: str
    n: int

    def __str__(self):
        return f"Bag({self.key}, {self.n} rows)"


@dataclasses.dataclass(frozen=True)
class PerRank:
    """Computed from this rank's rows only (expert counts): differs per rank."""
    key: str


@dataclasses.dataclass(frozen=True)
class Ref:
    """Entries are local row indices: of ``Seq(0, of)`` values of ``n`` rows (kind "seq")
    or of ``Bag(of, n)`` values (kind "bag"); ``perm``: a permutation of all of them."""
    kind: str
    of: object
    n: int
    perm: bool = False


SORTS = {aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable}
SHAPE_ONLY = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
              aten.full_like.default, aten.rand_like.default, aten.randn_like.default}
ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
BAG_RULES: dict = {}


def bag_rule(*targets):
    def register(fn):
        for t in targets:
            BAG_RULES[t] = fn
        return fn
    return register


def fail(node, why: str):
    raise BagError(f"rank-local experts: node '{node.name}' ({node.target}) at "
                   f"{source_line(node)}: {why}")


def bagish(p) -> bool:
    if isinstance(p, list):
        return any(bagish(q) for q in p)
    return isinstance(p, (Bag, PerRank))


def ref(w, a) -> Optional[Ref]:
    return w.refs.get(w.v(a)) if isinstance(a, fx.Node) else None


def _out(w, new, pl, r=None):
    w.P[new] = pl
    if r is not None:
        w.refs[new] = r
    return new


def dispatch(w, node):
    """The new node for ``node`` if a rank-local expert rule owns it, else None (the
    sequence rules do). Ops reading a Bag, a PerRank or index values have to be owned."""
    ins = node.all_input_nodes
    if not any(bagish(w.p(a)) or w.refs.get(w.v(a)) is not None for a in ins):
        if node.target in SORTS:
            return sort(w, node)
        return None
    if any(ref(w, a) is not None for a in ins) and node.target not in REF_OK:
        fail(node, "index values of this rank's tokens are used as data (they differ from "
                   "one device's)")
    if any(isinstance(w.p(a), PerRank) for a in ins) and not (
            node.target in SAME or node.target is aten.cumsum.default or
            is_grouped_mm(node.target)):
        fail(node, "per-rank expert counts (of this rank's tokens only) used other than as "
                   "grouped-GEMM offsets")
    fn = BAG_RULES.get(node.target)
    if fn is None and is_grouped_mm(node.target):
        fn = grouped_mm
    if fn is None and is_pointwise(node.target):
        fn = pointwise
    if fn is None:
        fail(node, "no rule for this op on rank-local rows")
    return fn(w, node)


# ---- the sort: this rank's slots ordered by expert ---------------------------------------------
def sort(w, node):
    x = node.args[0]
    pl, s = w.p(x), _shape(x)
    if not isinstance(pl, Seq) or s is None or len(s) != 1:
        return None
    bag = Bag(node.name, s[0])
    r = Ref("seq", pl.outer, s[0], perm=True)
    if node.target in (aten.argsort.default, aten.argsort.stable):
        return _out(w, w.copy(node), bag, r)
    new = w.copy(node)
    w.refs[new] = [None, r]
    return _out(w, new, [bag, bag])


@bag_rule(operator.getitem)
def getitem(w, node):
    src, i = node.args[0], node.args[1]
    pl, r = w.p(src), w.refs.get(w.v(src))
    return _out(w, w.copy(node), pl[i] if isinstance(pl, list) else pl,
                r[i] if isinstance(r, list) else r)


@bag_rule(*SAME)
def same(w, node):
    x = node.args[0]
    pl, r = w.p(x), ref(w, x)
    if node.target is aten._assert_tensor_metadata.default:
        if "size" in node.kwargs or "stride" in node.kwargs or len(node.args) > 1:
            return _out(w, w.emit(aten.alias.default, (w.v(x),), like=node), pl, r)
        return _out(w, w.copy(node), pl)
    if node.target in SHAPE_ONLY:
        r = None
    elif r is not None and node.meta["val"].dtype != x.meta["val"].dtype:
        fail(node, "index values cast to another dtype (used as data)")
    if node.target is aten.native_dropout.default:
        return _out(w, w.copy(node), [pl, pl])
    return _out(w, w.copy(node), pl, r)


@bag_rule(aten.floor_divide.default, aten.div.Tensor_mode)
def floor_divide(w, node):
    """sorted_slot // k: the slot's token, a row of the [N, ...] tokens (slots are laid out
    (outer, T, inner) with inner a multiple of k, so this rank's slots map to its tokens)."""
    x, k = node.args[0], node.args[1]
    r, pl = ref(w, x), w.p(x)
    if node.target is aten.div.Tensor_mode and node.kwargs.get("rounding_mode") != "floor":
        return pointwise(w, node)
    if r is None:
        return pointwise(w, node)
    if r.kind != "seq" or not isinstance(k, int) or k <= 0 or r.n % k or \
            (r.n // (r.of * w.T)) % k:
        fail(node, "index values divided by something other than their row group")
    return _out(w, w.copy(node), pl, Ref("seq", r.of, r.n // k))


REF_OK = {operator.getitem, aten.floor_divide.default, aten.div.Tensor_mode,
          aten.index.Tensor, aten.index_put_.default, aten.index_put.default} | SAME


# ---- element-wise, layout ---------------------------------------------------------------------
@bag_rule(aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.copy_.default)
def pointwise(w, node):
    out = _shape(node)
    m = len(out)
    bags = set()
    for a in node.all_input_nodes:
        p, s = w.p(a), _shape(a)
        if isinstance(p, Bag):
            if len(s) != m:
                fail(node, "rank-local rows broadcast along another dimension")
            bags.add(p)
        elif p is not None:
            fail(node, f"rank-local rows meet a value placed {p}")
        elif s is not None and len(s) == m and s[0] != 1:
            fail(node, f"a whole value {list(s)} lines up with rank-local rows")
    if len(bags) != 1:
        fail(node, "rows of different sorts meet")
    return _out(w, w.copy(node), bags.pop())


def _bag_in(w, node) -> Bag:
    pl = w.p(node.args[0])
    if not isinstance(pl, Bag):
        fail(node, f"its input is placed {pl}")
    return pl


@bag_rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.flatten.using_ints, aten.unflatten.int, aten.expand.default)
def view(w, node):
    pl = _bag_in(w, node)
    s, out = _shape(node.args[0]), list(_shape(node))
    if not out or out[0] != s[0]:
        fail(node, "a view that mixes the rows with another dimension")
    out[0] //= w.cp
    target = aten.reshape.default if node.target in (aten.flatten.using_ints,
                                                     aten.unflatten.int) else node.target
    return _out(w, w.emit(target, (w.v(node.args[0]), out), like=node), pl)


@bag_rule(aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.transpose.int,
          aten.permute.default, aten.slice.Tensor, aten.narrow.default)
def layout(w, node):
    pl = _bag_in(w, node)
    s, out = _shape(node.args[0]), _shape(node)
    t = node.target
    keeps = bool(out) and out[0] == s[0]
    if t is aten.unsqueeze.default:
        keeps = node.args[1] % (len(s) + 1) != 0
    elif t is aten.transpose.int:
        i, j = node.args[1] % len(s), node.args[2] % len(s)
        keeps = i == j or 0 not in (i, j)
    elif t is aten.permute.default:
        keeps = node.args[1][0] % len(s) == 0
    elif t in (aten.slice.Tensor, aten.narrow.default):
        keeps = _named(node)["dim"] % len(s) != 0 or out[0] == s[0]
    if not keeps:
        fail(node, "it moves or cuts the rank-local rows")
    return _out(w, w.copy(node), pl)


@bag_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def split(w, node):
    pl = _bag_in(w, node)
    if _named(node).get("dim", 0) % len(_shape(node.args[0])) == 0:
        fail(node, "it splits the rank-local rows")
    return _out(w, w.copy(node), [pl] * len(node.meta["val"]))


@bag_rule(*(REDUCE | ALONG))
def reduce(w, node):
    x = node.args[0]
    pl, s = w.p(x), _shape(x)
    if isinstance(pl, PerRank) and node.target is aten.cumsum.default and len(s) == 1:
        return _out(w, w.copy(node), pl)     # the offsets of this rank's expert groups
    pl = _bag_in(w, node)
    dims = _named(node).get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    if not dims or 0 in {d % len(s) for d in dims}:
        fail(node, "it reduces or runs along the rank-local rows")
    many = isinstance(node.meta.get("val"), (tuple, list))
    return _out(w, w.copy(node), [pl, pl] if many else pl)


@bag_rule(aten.linear.default, aten.mm.default)
def linear(w, node):
    pl = _bag_in(w, node)
    if any(w.p(a) is not None for a in node.all_input_nodes if a is not node.args[0]):
        fail(node, "a weight that is not replicated")
    return _out(w, w.copy(node), pl)


# ---- gathers by index, the inverse permutation --------------------------------------------------
@bag_rule(aten.index.Tensor)
def index(w, node):
    """x[idx] on dimension 0 with one index vector: rows of this rank's tokens in the sort's
    order (idx a Bag of token indices), rows of a replicated table picked by expert ids (a
    Bag of data, e.g. gpt-oss's expert biases), or Bag rows put back in token order (idx
    the inverse permutation, Seq)."""
    x, idx = node.args[0], list(node.args[1])
    if len(idx) != 1 or not isinstance(idx[0], fx.Node) or len(_shape(idx[0])) != 1:
        fail(node, "an index other than one vector on the first dimension")
    t = idx[0]
    px, pt, rt = w.p(x), w.p(t), ref(w, t)
    if ref(w, x) is not None or isinstance(px, PerRank) or isinstance(pt, PerRank):
        fail(node, "it indexes index values or per-rank counts")
    n = _shape(x)[0]
    if rt is None:
        if px is not None or not isinstance(pt, Bag):
            fail(node, "rank-local data used to index a split value")
        return _out(w, w.copy(node), pt)
    if rt.kind == "seq":
        if not isinstance(pt, Bag) or px != Seq(0, rt.of) or n != rt.n:
            fail(node, f"token indices of {rt.n} rows index a value placed {px} of {n} rows")
        return _out(w, w.copy(node), pt)
    if not isinstance(pt, Seq) or px != Bag(rt.of, rt.n) or n != rt.n:
        fail(node, f"indices of the rows of sort {rt.of} index a value placed {px}")
    return _out(w, w.copy(node), pt)


@bag_rule(aten.index_put_.default, aten.index_put.default)
def index_put(w, node):
    """out[perm] = values, perm the sort's permutation of this rank's slots: ``out`` is in
    token order again (its Seq). values = arange(n) (the inverse permutation) becomes
    arange(n / cp): positions in this rank's sorted rows."""
    a = _named(node)
    x, idx, vals = a["self"], list(a["indices"]), a["values"]
    if a["accumulate"] or len(idx) != 1 or not isinstance(idx[0], fx.Node):
        fail(node, "an accumulating or multi-index put")
    t = idx[0]
    rt, pt = ref(w, t), w.p(t)
    if rt is None or rt.kind != "seq" or not rt.perm or not isinstance(pt, Bag):
        fail(node, "rows written at indices that are not the sort's permutation")
    px = w.p(x)
    if _shape(x)[0] != rt.n or not (px == pt or px == Seq(0, rt.of)) or ref(w, x) is not None:
        fail(node, "it writes into a value that is not this rank's rows")
    if node.target is aten.index_put_.default and len(x.users) > 1:
        fail(node, "the overwritten buffer is read elsewhere")
    pv, out_ref = w.p(vals), None
    if pv == pt and ref(w, vals) is None:
        v = w.v(vals)
    elif pv is None and vals.op == "call_function" and vals.target in ARANGE and \
            _shape(vals) == (rt.n,) and (vals.target is aten.arange.default or
                                         (vals.args[0] == 0 and vals.args[2:] in ((), (1,)))):
        v = w.emit(aten.arange.default, (rt.n // w.cp,), dict(vals.kwargs), like=vals)
        out_ref = Ref("bag", pt.key, rt.n, perm=True)
    else:
        fail(node, "values that are neither the sorted rows nor a range of them")
    new = w.emit(node.target, (w.v(x), [w.v(t)], v, False), like=node)
    return _out(w, new, Seq(0, rt.of), out_ref)


# ---- expert counts and the grouped GEMMs --------------------------------------------------------
@bag_rule(aten.histc.default)
def counts(w, node):
    pl = _bag_in(w, node)
    if len(_shape(node.args[0])) != 1:
        fail(node, "counts of a multi-dimensional value")
    return _out(w, w.copy(node), PerRank(pl.key))


def grouped_mm(w, node):
    """x [rows, in] sorted by expert (this rank's), W [E, in, out] replicated, offsets of
    this rank's expert groups: this rank's output rows."""
    pl = _bag_in(w, node)
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    if not isinstance(offs, fx.Node) or w.p(offs) != PerRank(pl.key):
        fail(node, "offsets that are not this rank's expert counts")
    if any(w.p(a) is not None for a in node.all_input_nodes if a not in (node.args[0], offs)):
        fail(node, "a weight that is not replicated")
    return _out(w, w.copy(node), pl)


# ---- sequence rules the MoE routers and MLA attention need ---------------------------------------
@rule(aten.gather.default, aten.scatter.value, aten.scatter.src, aten.scatter_.value,
      aten.scatter_.src, aten.scatter_add.default, aten.scatter_add_.default)
def gather_scatter(w, node):
    """gather / scatter along a dimension other than the sequence (DeepSeek's group-limited
    routing picks experts per token): every operand holds this rank's tokens."""
    out = _shape(node)
    m = len(out)
    k = node.args[1] % m
    seqs = {(w.p(a).dim, w.p(a).outer) for a in node.all_input_nodes if isinstance(w.p(a), Seq)}
    if len(seqs) != 1:
        w.fail(node, f"its operands are split along different dimensions ({seqs})")
    (d, o), = seqs
    if d == k:
        w.fail(node, "it gathers or scatters along the sequence")

    def loc(x):
        if not isinstance(x, fx.Node) or isinstance(w.p(x), Seq):
            return w.v(x)
        s = _shape(x)
        if s is None or len(s) != m or s[d] != out[d]:
            w.fail(node, f"operand {x.name} does not line up with the sequence")
        return w.localize(x, d, o, node)
    return w.copy(node, Seq(d, o), fx.node.map_aggregate(node.args, loc))


@rule(aten.copy_.default)
def copy_(w, node):
    """dst.copy_(src) into a sequence-split destination (DeepSeek's key built in a fresh
    tensor, slice by slice): src is brought to this rank's tokens as in an element-wise op."""
    from .cp_rules import pointwise as seq_pointwise
    if not isinstance(w.p(node.args[0]), Seq):
        w.fail(node, "it writes sequence-split values into a whole-sequence buffer")
    return seq_pointwise(w, node)


__all__ = ["Bag", "BagError", "PerRank", "Ref", "dispatch", "LOSS"]

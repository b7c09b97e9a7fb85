"""Tensor parallelism as a graph rewrite: seed placements from the analysis, propagate
them op by op, insert Megatron's f / g (and, with sequence parallelism, the
all-gather / reduce-scatter pair), rewrite every shape constant that depends on a
sharded dimension, and re-check the per-rank graph with FakeTensor at local shapes.

Propagation rules (placement of each value: Replicate = None, or Shard(dim, outer)):

- column-parallel linear: W Shard(out), x Replicate (wrapped in f, or all-gathered
  under SP) -> Shard(last).  row-parallel: W Shard(in), x Shard(last) -> partial
  sums -> g (all-reduce), or reduce-scatter along the sequence under SP; a bias is
  added after the reduction.
- pointwise ops: every sharded operand must agree after broadcasting; a replicated
  operand that has the sharded dimension is sliced to this rank's part.
- views/reshapes: the rank factor must stay a whole factor of one output dim
  (``sharding.view_rule``); the new shape constant is the local shape.
- transpose/permute/unsqueeze/squeeze/expand/slice/select/split/cat/reductions/softmax/
  layer_norm: local unless they touch the sharded dimension; a split along it whose
  pieces are whole blocks (fused q, k, v) is local once the producing weight's rows are
  permuted (the propagation restarts with the weight as Shard(dim, blocks)).
- scaled_dot_product_attention: q, k, v sharded on the heads dim.
- embedding with a vocab-sharded weight: masked local lookup, then g (or a
  reduce-scatter under SP). cross_entropy on vocab-sharded logits: max, sum-exp and
  target-logit reductions across tp; the full-vocabulary logits never exist.
- a replicated value that requires grad and is consumed by an op with a sharded
  result sees only part of its gradient on each rank: it is wrapped in f, whose
  backward sums over tp (the column input; with SP also norm weights, biases and
  position embeddings that act on the rank's sequence shard).

Anything else that receives a sharded value is a ShardingError naming the node and the
model's source line.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx

import ptdp_compiler.collectives  # noqa: F401  (registers the ptdp:: ops)
from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ConfigError, ShardingError
from ptdp_compiler.plan import CollectivePlan, Shard

from . import analyze as _an
from .sharding import local_shape, view_rule

aten = torch.ops.aten
ptdp_ops = torch.ops.ptdp

PASSTHROUGH = {aten.clone.default, aten.contiguous.default, aten.alias.default,
               aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
               aten.to.device, aten.dropout.default, aten.lift_fresh_copy.default,
               aten.detach_.default, aten.type_as.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
           aten._log_softmax.default}
RED_DIMS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
         aten.flatten.using_ints, aten.unflatten.int}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
          aten.unbind.int}


class _Refine(Exception):
    def __init__(self, param: str, outer: int):
        self.param, self.outer = param, outer


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _fail(node, why: str, cls=ShardingError):
    raise cls(f"tensor parallelism cannot shard node '{node.name}' ({node.target}) at "
              f"{source_line(node)}: {why}")


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


class Rewriter:
    def __init__(self, gm, an: _an.Analysis, seeds: dict, t: int, rank: int, group_name: str,
                 sp: bool, requires_grad: dict):
        self.gm, self.an, self.seeds, self.t, self.r = gm, an, seeds, t, rank
        self.gn, self.sp = group_name, sp
        self.requires_grad = requires_grad
        self.g = fx.Graph()
        self.env, self.pl, self.rg = {}, {}, {}
        self.gradok = set()
        self._f, self._gather = {}, {}
        self.collectives = []     # (kind, new node, note, bytes)
        self.rewrites = []        # (node name, old shape, new shape)
        self.grad_tp_params = set()

    # ---- helpers ---------------------------------------------------------------------------
    def emit(self, target, args, kwargs=None, pl=None, rg=None, like: Optional[fx.Node] = None):
        n = self.g.call_function(target, tuple(args), dict(kwargs or {}))
        if like is not None:
            for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if k in like.meta:
                    n.meta[k] = like.meta[k]
        self.pl[n] = pl
        if rg is None:
            rg = any(self.rg.get(a, False) for a in n.all_input_nodes)
        self.rg[n] = rg
        return n

    def f(self, v):
        """v (replicated) as consumed by a sharded computation: gradient summed over tp."""
        if not self.rg.get(v, False) or v in self.gradok:
            return v
        if v not in self._f:
            self._f[v] = self.emit(ptdp_ops.tp_f.default, (v, self.gn, self.t,
                                                         "param" if v.op == "placeholder"
                                                         else "act"), pl=None, rg=True)
            self.gradok.add(self._f[v])
            self.collectives.append(("f", self._f[v], f"f on {v.name}", None))
            if v.op == "placeholder":
                self.grad_tp_params.add(v.meta.get("ptdp_input_name"))
        return self._f[v]

    def gathered(self, v, node):
        """A sequence-sharded value made whole (SP all-gather; its backward reduce-scatters)."""
        p = self.pl[v]
        if p is None:
            return v
        if v not in self._gather:
            n = self.emit(ptdp_ops.sp_gather.default, (v, p.dim, p.outer, self.gn, self.t),
                          pl=None, like=node)
            self.gradok.add(n)
            self._gather[v] = n
            self.collectives.append(("all_gather", n, f"before {node.name}", node))
        return self._gather[v]

    def reduce_partial(self, v, old, node):
        """Partial sums of ``old``'s full shape -> g, or reduce-scatter along the sequence."""
        if self.sp:
            seq = self.seq_placement(tuple(_val(old).shape), node)
            n = self.emit(ptdp_ops.sp_scatter.default, (v, seq.dim, seq.outer, self.gn, self.t),
                          pl=seq, like=node)
            self.collectives.append(("reduce_scatter", n, f"after {node.name}", node))
        else:
            n = self.emit(ptdp_ops.tp_g.default, (v, self.gn, self.t, "act"), pl=None, like=node)
            self.collectives.append(("all_reduce", n, f"after {node.name}", node))
        return n

    def seq_placement(self, full_shape, node) -> Shard:
        e = self.an.embed_out_shape
        if e is None:
            _fail(node, "sequence parallelism needs the token embedding to find the sequence "
                        "dimension; none was found")
        p = view_rule(e, Shard(len(e) - 2), full_shape, self.t)
        if p is None:
            _fail(node, f"cannot place the sequence dimension of {list(e)} in shape "
                        f"{list(full_shape)} for sequence parallelism")
        return p

    def localize(self, v, full_shape, out_pl: Shard, out_ndim: int, node):
        """A replicated operand of a sharded pointwise op: this rank's part of it."""
        k = len(full_shape)
        j = out_pl.dim - (out_ndim - k)
        if j < 0 or full_shape[j] == 1:
            return self.f(v)
        if out_pl.outer != 1:
            _fail(node, "a replicated operand meets a block-sharded one")
        n = full_shape[j]
        v = self.f(v)
        lo = self.r * (n // self.t)
        return self.emit(aten.slice.Tensor, (v, j, lo, lo + n // self.t), pl=None, like=node)

    def shape_rewrite(self, node, old_shape, new_shape):
        if list(old_shape) != list(new_shape):
            self.rewrites.append((node.name, tuple(old_shape), tuple(new_shape)))

    # ---- the walk ---------------------------------------------------------------------------
    def run(self) -> fx.Graph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                n = self.g.placeholder(node.name)
                n.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                v = node.meta.get("val")
                if isinstance(v, torch.Tensor):
                    n.meta["ptdp_full_val"] = torch.empty(v.shape, dtype=v.dtype)
                name = _an.param_name(node)
                self.pl[n] = self.seeds.get(name) if name else None
                self.rg[n] = bool(name and self.requires_grad.get(name, False))
                self.env[node] = n
            elif node.op == "get_attr":
                n = self.g.get_attr(node.target)
                n.meta.update(node.meta)
                self.pl[n], self.rg[n] = None, False
                self.env[node] = n
            elif node.op == "output":
                out = self.g.output(self.margs(node.args[0]))
                if any(self.pl.get(a) is not None for a in out.all_input_nodes):
                    _fail(node, "the model's output is still sharded")
            else:
                self.env[node] = self.call(node)
        return self.g

    def margs(self, a):
        return fx.node.map_arg(a, lambda x: self.env[x])

    def copy(self, node, pl=None):
        n = self.g.node_copy(node, lambda x: self.env[x])
        self.pl[n] = pl
        self.rg[n] = any(self.rg.get(a, False) for a in n.all_input_nodes) and \
            (not isinstance(_val(node), torch.Tensor) or _val(node).is_floating_point())
        if node.target in (aten.detach.default, aten.detach_.default,
                           aten.lift_fresh_copy.default):
            self.rg[n] = False
        return n

    def call(self, node):
        ins = node.all_input_nodes
        pls = [self.pl.get(self.env[i]) for i in ins]
        lin = self.an.linears.get(node)
        if lin is not None:
            return self.linear(node, lin)
        tgt = node.target
        if tgt is aten.embedding.default and self.pl.get(self.env[node.args[0]]) is not None:
            return self.embedding(node)
        if tgt in _an.LOSSES and self.pl.get(self.env[node.args[0]]) is not None:
            return self.cross_entropy(node)
        if all(p is None for p in pls):
            if tgt is operator.getitem and isinstance(self.pl.get(self.env[node.args[0]]), list):
                return self.getitem(node)
            return self.copy(node)
        # some input is sharded
        if tgt is aten._assert_tensor_metadata.default:
            return None
        if tgt is operator.getitem:
            return self.getitem(node)
        x = node.args[0] if node.args else None
        xp = self.pl.get(self.env[x]) if isinstance(x, fx.Node) else None
        if tgt in PASSTHROUGH and xp is not None:
            return self.copy(node, xp)
        if tgt in VIEWS:
            return self.view(node, xp)
        if tgt in (aten.transpose.int, aten.permute.default, aten.t.default,
                   aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
                   aten.slice.Tensor, aten.select.int):
            return self.layout(node, xp)
        if tgt in SPLITS:
            return self.split(node, xp)
        if tgt is aten.cat.default:
            return self.cat(node)
        if tgt is aten.scaled_dot_product_attention.default:
            return self.sdpa(node)
        if tgt in SOFTMAX:
            d = node.args[1] % _val(x).dim()
            if xp is None or d == xp.dim:
                _fail(node, "softmax over the sharded dimension")
            return self.copy(node, xp)
        if tgt in RED_DIMS:
            return self.reduction(node, xp)
        if tgt in (aten.matmul.default, aten.bmm.default):
            return self.batched_matmul(node)
        if tgt is aten.layer_norm.default:
            return self.layer_norm(node, xp)
        if _is_pointwise(tgt) or tgt in (aten.where.self, aten.masked_fill.Scalar,
                                         aten.masked_fill.Tensor):
            return self.pointwise(node)
        _fail(node, f"no sharding rule for {tgt} with sharded inputs "
                    f"({', '.join(str(p) for p in pls)})")

    # ---- rules -----------------------------------------------------------------------------
    def pointwise(self, node):
        out = _val(node)
        m = out.dim()
        shard = None
        for a in node.all_input_nodes:
            p = self.pl.get(self.env[a])
            if p is None:
                continue
            od = p.dim + m - _val(a).dim()
            cand = Shard(od, p.outer)
            if shard is not None and cand != shard:
                _fail(node, f"operands sharded differently ({shard} vs {cand})")
            shard = cand

        def conv(a):
            if not isinstance(a, fx.Node):
                return a
            v = self.env[a]
            if self.pl.get(v) is not None:
                return v
            va = _val(a)
            if not isinstance(va, torch.Tensor):
                return v
            return self.localize(v, tuple(va.shape), shard, m, node)
        args = [conv(a) if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: conv(v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        return self.emit(node.target, args, kwargs, pl=shard, like=node)

    def view(self, node, xp):
        full_in = tuple(_val(node.args[0]).shape)
        full_out = tuple(_val(node).shape)
        p = view_rule(full_in, xp, full_out, self.t)
        if p is None:
            size = full_in[xp.dim]
            outer_total = math.prod(full_in[:xp.dim]) * xp.outer
            before = 1
            for o in full_out:
                if before == outer_total and o % self.t:
                    _fail(node, f"tp={self.t} does not divide {o}, the leading factor of the "
                                f"split dimension in {list(full_out)} (e.g. the number of "
                                "attention heads); choose tp dividing it", ConfigError)
                before *= o
            if size % self.t:
                _fail(node, f"tp={self.t} does not divide dimension {xp.dim} of size {size}",
                      ConfigError)
            _fail(node, f"the view {list(full_in)} -> {list(full_out)} mixes the sharded "
                        f"dimension {xp} with others")
        if full_out[p.dim] % self.t:
            _fail(node, f"tp={self.t} does not divide {full_out[p.dim]} (dimension {p.dim} of "
                        f"{list(full_out)}; e.g. the number of attention heads)", ConfigError)
        new = local_shape(full_out, p, self.t)
        self.shape_rewrite(node, full_out, new)
        tgt = node.target if node.target in (aten.view.default, aten._unsafe_view.default) \
            else aten.reshape.default
        return self.emit(tgt, (self.env[node.args[0]], new), pl=p, like=node)

    def layout(self, node, xp):
        tgt, x = node.target, self.env[node.args[0]]
        nd = _val(node.args[0]).dim()
        d = xp.dim
        args = list(node.args[1:])
        if tgt is aten.transpose.int:
            a, b = args[0] % nd, args[1] % nd
            p = Shard(b if d == a else a if d == b else d, xp.outer)
        elif tgt is aten.t.default:
            p = Shard(1 - d, xp.outer)
        elif tgt is aten.permute.default:
            perm = [i % nd for i in args[0]]
            p = Shard(perm.index(d), xp.outer)
        elif tgt is aten.unsqueeze.default:
            u = args[0] % (nd + 1)
            p = Shard(d + 1 if u <= d else d, xp.outer)
        elif tgt is aten.squeeze.dim:
            s = args[0] % nd
            if s == d:
                _fail(node, "squeeze of the sharded dimension")
            p = Shard(d - 1 if s < d else d, xp.outer)
        elif tgt is aten.expand.default:
            full_out = tuple(_val(node).shape)
            p = Shard(d + len(full_out) - nd, xp.outer)
            if _val(node.args[0]).shape[d] != full_out[p.dim]:
                _fail(node, "expand of the sharded dimension")
            new = local_shape(full_out, p, self.t)
            self.shape_rewrite(node, full_out, new)
            return self.emit(tgt, (x, new), pl=p, like=node)
        elif tgt is aten.slice.Tensor:
            dim = args[0] % nd if args else 0
            if dim == d:
                size = _val(node.args[0]).shape[d]
                start = args[1] if len(args) > 1 else 0
                end = args[2] if len(args) > 2 else None
                step = args[3] if len(args) > 3 else 1
                if (start or 0) != 0 or (end is not None and end < size) or step != 1:
                    _fail(node, "a slice of part of the sharded dimension")
            p = xp
        elif tgt is aten.select.int:
            s = args[0] % nd
            if s == d:
                _fail(node, "select on the sharded dimension")
            p = Shard(d - 1 if s < d else d, xp.outer)
        else:
            _fail(node, "unsupported layout op")
        return self.emit(tgt, (x, *args), node.kwargs, pl=p, like=node)

    def split(self, node, xp):
        x = node.args[0]
        nd = _val(x).dim()
        tgt = node.target
        if tgt is aten.unbind.int:
            dim = (node.args[1] if len(node.args) > 1 else 0) % nd
        else:
            dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd
        outs = _val(node)
        if dim != xp.dim:
            if tgt is aten.unbind.int:
                p = Shard(xp.dim - 1 if dim < xp.dim else xp.dim, xp.outer)
            else:
                p = xp
            n = self.emit(tgt, (self.env[x], *node.args[1:]), node.kwargs, like=node)
            self.pl[n] = [p] * len(outs)
            return n
        if tgt is aten.unbind.int:
            _fail(node, "unbind along the sharded dimension")
        full = _val(x).shape[dim]
        sizes = [o.shape[dim] for o in outs]
        block = full // xp.outer
        if any(s % block for s in sizes):
            need = full // math.gcd(full, *sizes)
            if full % (need * self.t):
                _fail(node, f"tp={self.t} cannot split each of the pieces {sizes}", ConfigError)
            raise _Refine(self._seed_of(x, node), need)
        pls = [Shard(dim, s // block) for s in sizes]
        local = [s // self.t for s in sizes]
        self.shape_rewrite(node, sizes, local)
        n = self.emit(aten.split_with_sizes.default, (self.env[x], local, dim), pl=None, like=node)
        self.pl[n] = pls
        return n

    def _seed_of(self, x, node) -> str:
        m = x
        while True:
            lin = self.an.linears.get(m)
            if lin is not None:
                return _an.param_name(lin.weight)
            if m.op != "call_function" or not m.args or not isinstance(m.args[0], fx.Node) or \
                    m.target not in PASSTHROUGH | {aten.view.default, aten.reshape.default,
                                                   aten._unsafe_view.default}:
                _fail(node, "a split of the sharded dimension into pieces the producing "
                            "weight cannot be permuted for")
            m = m.args[0]

    def getitem(self, node):
        src, i = node.args
        v = self.env[src]
        pls = self.pl.get(v)
        p = pls[i] if isinstance(pls, list) else None
        return self.emit(operator.getitem, (v, i), pl=p,
                         rg=self.rg.get(v, False), like=node)

    def cat(self, node):
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        out = _val(node)
        m = out.dim()
        dim %= m
        shard = None
        for a in tensors:
            p = self.pl.get(self.env[a])
            if p is not None:
                if shard is not None and p != shard:
                    _fail(node, "cat of differently sharded tensors")
                shard = p
        if shard.dim == dim:
            _fail(node, "cat along the sharded dimension")
        new = []
        for a in tensors:
            v = self.env[a]
            va = _val(a)
            if self.pl.get(v) is None and not (va.dim() == 1 and va.shape[0] == 0):
                v = self.localize(v, tuple(va.shape), shard, m, node)
            new.append(v)
        return self.emit(aten.cat.default, (new, dim), pl=shard, like=node)

    def sdpa(self, node):
        q, k, v = node.args[:3]
        ps = [self.pl.get(self.env[a]) for a in (q, k, v)]
        if any(p is None or p.dim != 1 or p.outer != 1 for p in ps):
            _fail(node, f"attention needs q, k, v split on the heads dimension; got "
                        f"{', '.join(str(p) for p in ps)}")
        for a, what in ((q, "attention heads"), (k, "key/value heads")):
            if _val(a).shape[1] % self.t:
                _fail(node, f"tp={self.t} does not divide the {_val(a).shape[1]} {what}",
                      ConfigError)
        args = [self.env[q], self.env[k], self.env[v]]
        rest = list(node.args[3:])
        kwargs = dict(node.kwargs)
        mask = rest[0] if rest else kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            mv = self.env[mask]
            if self.pl.get(mv) is None:
                mv = self.localize(mv, tuple(_val(mask).shape), Shard(1), 4, node)
            elif self.pl.get(mv) != Shard(1):
                _fail(node, "attention mask sharded on another dimension")
            if rest:
                rest[0] = mv
            else:
                kwargs["attn_mask"] = mv
        return self.emit(node.target, args + rest, kwargs, pl=Shard(1), like=node)

    def batched_matmul(self, node):
        a, b = node.args[:2]
        pa, pb = self.pl.get(self.env[a]), self.pl.get(self.env[b])
        va, vb = _val(a), _val(b)
        m = _val(node).dim()
        if pa is None or pb is None or pa.dim + m - va.dim() != pb.dim + m - vb.dim() or \
                pa.dim >= va.dim() - 2 or pa.outer != pb.outer:
            _fail(node, f"matmul of {pa} and {pb}: only a shared batch (heads) dimension may "
                        "be sharded")
        return self.emit(node.target, (self.env[a], self.env[b]), pl=Shard(
            pa.dim + m - va.dim(), pa.outer), like=node)

    def reduction(self, node, xp):
        nd = _val(node.args[0]).dim()
        dims = node.args[1] if len(node.args) > 1 else None
        if dims is None:
            _fail(node, "a full reduction of a sharded tensor")
        dims = [dims] if isinstance(dims, int) else [d % nd for d in dims]
        if xp.dim in dims:
            _fail(node, "a reduction over the sharded dimension")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        d = xp.dim if keep else xp.dim - sum(1 for x in dims if x < xp.dim)
        return self.copy(node, Shard(d, xp.outer))

    def layer_norm(self, node, xp):
        x = node.args[0]
        nd = _val(x).dim()
        if xp.dim >= nd - len(node.args[1]):
            _fail(node, "layer_norm over the sharded dimension")
        args = [self.env[x], node.args[1]] + [
            self.f(self.env[a]) if isinstance(a, fx.Node) else a for a in node.args[2:]]
        return self.emit(node.target, args, node.kwargs, pl=xp, like=node)

    # ---- linears, embedding, loss -----------------------------------------------------------
    def linear(self, node, lin: _an.Linear):
        x, W = self.env[lin.x], self.env[lin.weight]
        b = self.env[lin.bias] if lin.bias is not None else None
        wp, xp = self.pl.get(W), self.pl.get(x)
        xnd = _val(lin.x).dim()
        out_nd = _val(node).dim()
        if wp is not None and wp.dim == lin.w_out_dim:            # column-parallel
            if xp is not None:
                if xp.dim == xnd - 1:
                    _fail(node, "a column-parallel linear got a feature-sharded input")
                x = self.gathered(x, node)
            else:
                x = self.f(x)
            out_pl = Shard(out_nd - 1, wp.outer)
            return self.emit(node.target, self._lin_args(node, lin, x, W, b), pl=out_pl,
                             like=node)
        if wp is not None:                                        # row-parallel
            if xp is None or xp.dim != xnd - 1 or xp.outer != 1:
                _fail(node, f"a row-parallel linear needs its input split on the last "
                            f"dimension; got {xp}")
            mm = self.emit(aten.linear.default if lin.w_out_dim == 0 else
                           (aten.mm.default if node.target is not aten.matmul.default
                            else aten.matmul.default), (x, W), pl=None, like=node)
            out = self.reduce_partial(mm, node, node)
            if b is not None:
                outp = self.pl[out]
                if outp is not None:
                    b = self.localize(b, tuple(_val(lin.bias).shape), outp, out_nd, node)
                out = self.emit(aten.add.Tensor, (out, b), pl=outp, like=node)
            return out
        # replicated weight
        if xp is None:
            return self.copy(node)
        if xp.dim == xnd - 1:
            _fail(node, "a replicated linear got an input split on its features")
        W = self.f(W)
        b = self.f(b) if b is not None else None
        return self.emit(node.target, self._lin_args(node, lin, x, W, b),
                         pl=Shard(xp.dim, xp.outer), like=node)

    @staticmethod
    def _lin_args(node, lin, x, W, b):
        if node.target is aten.linear.default:
            return (x, W) if b is None else (x, W, b)
        if node.target is aten.addmm.default:
            return (b, x, W)
        return (x, W)

    def embedding(self, node):
        W, ids = self.env[node.args[0]], self.env[node.args[1]]
        wp = self.pl[W]
        if wp != Shard(0) or self.pl.get(ids) is not None:
            _fail(node, f"embedding with weight {wp} and ids {self.pl.get(ids)}")
        V = _val(node.args[0]).shape[0]
        vl = V // self.t
        lo = self.r * vl
        rel = self.emit(aten.sub.Tensor, (ids, lo), pl=None, rg=False)
        out_lo = self.emit(aten.lt.Scalar, (rel, 0), pl=None, rg=False)
        out_hi = self.emit(aten.ge.Scalar, (rel, vl), pl=None, rg=False)
        outside = self.emit(aten.logical_or.default, (out_lo, out_hi), pl=None, rg=False)
        safe = self.emit(aten.masked_fill.Scalar, (rel, outside, 0), pl=None, rg=False)
        rest = list(node.args[2:])
        if rest and isinstance(rest[0], int) and rest[0] >= 0:   # padding_idx: local row or none
            rest[0] = rest[0] - lo if lo <= rest[0] < lo + vl else -1
        emb = self.emit(aten.embedding.default, (W, safe, *rest), pl=None, like=node)
        mask = self.emit(aten.unsqueeze.default, (outside, -1), pl=None, rg=False)
        emb = self.emit(aten.masked_fill.Scalar, (emb, mask, 0.0), pl=None, like=node)
        return self.reduce_partial(emb, node, node)

    def cross_entropy(self, node):
        logits, target = node.args[0], node.args[1]
        lg, tg = self.env[logits], self.env[target]
        lp = self.pl[lg]
        if _val(logits).dim() != 2 or lp != Shard(1) or self.pl.get(tg) is not None:
            _fail(node, f"vocab-parallel cross-entropy needs [tokens, vocab] logits split on "
                        f"the vocabulary; got {lp} of shape {list(_val(logits).shape)}")
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
        ignore = node.args[4] if len(node.args) > 4 else node.kwargs.get("ignore_index", -100)
        smoothing = node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing",
                                                                             0.0)
        if weight is not None or smoothing:
            _fail(node, "vocab-parallel cross-entropy supports no class weights or smoothing")
        V = _val(logits).shape[1]
        vl = V // self.t
        lo = self.r * vl
        e = self.emit
        det = e(aten.detach.default, (lg,), pl=None, rg=False)
        mx = e(aten.amax.default, (det, [1], True), pl=None, rg=False)
        mx = e(ptdp_ops.all_reduce_max.default, (mx, self.gn, self.t), pl=None, rg=False)
        self.collectives.append(("all_reduce", mx, "vocab-parallel cross-entropy: max", node))
        z = e(aten.sub.Tensor, (lg, mx), pl=None, like=node)
        se = e(aten.sum.dim_IntList, (e(aten.exp.default, (z,), pl=None), [1]), pl=None)
        se = e(ptdp_ops.tp_g.default, (se, self.gn, self.t, "loss"), pl=None)
        self.collectives.append(("all_reduce", se, "vocab-parallel cross-entropy: sum-exp",
                                 node))
        rel = e(aten.sub.Tensor, (tg, lo), pl=None, rg=False)
        o1 = e(aten.lt.Scalar, (rel, 0), pl=None, rg=False)
        o2 = e(aten.ge.Scalar, (rel, vl), pl=None, rg=False)
        outside = e(aten.logical_or.default, (o1, o2), pl=None, rg=False)
        safe = e(aten.masked_fill.Scalar, (rel, outside, 0), pl=None, rg=False)
        idx = e(aten.unsqueeze.default, (safe, 1), pl=None, rg=False)
        picked = e(aten.squeeze.dim, (e(aten.gather.default, (z, 1, idx), pl=None), 1), pl=None)
        picked = e(aten.masked_fill.Scalar, (picked, outside, 0.0), pl=None)
        picked = e(ptdp_ops.tp_g.default, (picked, self.gn, self.t, "loss"), pl=None)
        self.collectives.append(("all_reduce", picked,
                                 "vocab-parallel cross-entropy: target logit", node))
        per = e(aten.sub.Tensor, (e(aten.log.default, (se,), pl=None), picked), pl=None)
        valid = e(aten.ne.Scalar, (tg, ignore), pl=None, rg=False)
        invalid = e(aten.logical_not.default, (valid,), pl=None, rg=False)
        per = e(aten.masked_fill.Scalar, (per, invalid, 0.0), pl=None)
        if reduction == 0:
            return per
        total = e(aten.sum.default, (per,), pl=None)
        if reduction == 2:
            return total
        cnt = e(aten.sum.dim_IntList, (valid, [0]), {"dtype": _val(logits).dtype}, pl=None,
                rg=False)
        return e(aten.div.Tensor, (total, cnt), pl=None, like=node)


def tensor_parallel(gm: fx.GraphModule, an: _an.Analysis, t: int, rank: int, group_name: str,
                    sp: bool, requires_grad: dict):
    """Returns (new GraphModule, seeds {param: Shard}, rewriter)."""
    seeds = initial_seeds(gm, an, t, sp)
    for _ in range(8):
        rw = Rewriter(gm, an, seeds, t, rank, group_name, sp, requires_grad)
        try:
            g = rw.run()
        except _Refine as ref:
            seeds = _refine(seeds, an, ref)
            continue
        new = fx.GraphModule(gm, g)
        return new, seeds, rw
    raise ShardingError("sharding propagation did not converge (repeated fused-weight splits)")


def _refine(seeds, an, ref: _Refine):
    seeds = dict(seeds)
    for lin in an.linears.values():
        if _an.param_name(lin.weight) == ref.param:
            seeds[ref.param] = Shard(lin.w_out_dim, ref.outer)
            if lin.bias is not None:
                seeds[_an.param_name(lin.bias)] = Shard(0, ref.outer)
    return seeds


def initial_seeds(gm, an: _an.Analysis, t: int, sp: bool) -> dict:
    seeds = {}

    def check(n, size, what):
        if size % t:
            raise ConfigError(f"tp={t} does not divide {what} ({size}) of '{n.name}' at "
                              f"{source_line(n)}; choose tp dividing it")
    for n in an.column:
        lin = an.linears[n]
        check(n, lin.out_features, "the output features (heads·head_dim or FFN size)")
        seeds[_an.param_name(lin.weight)] = Shard(lin.w_out_dim)
        if lin.bias is not None:
            seeds[_an.param_name(lin.bias)] = Shard(0)
    for n in an.row:
        lin = an.linears[n]
        check(n, lin.weight.meta["val"].shape[1 - lin.w_out_dim], "the input features")
        seeds[_an.param_name(lin.weight)] = Shard(1 - lin.w_out_dim)
    if an.head is not None:
        h = an.head
        if an.vocab % t:
            raise ConfigError(
                f"tp={t} does not divide the vocabulary size {an.vocab}: pad the vocabulary to "
                f"a multiple of tp (Megatron pads to a multiple of 128·tp), e.g. "
                f"{-(-an.vocab // (128 * t)) * 128 * t}, or choose tp dividing {an.vocab}")
        seeds[_an.param_name(h.weight)] = Shard(h.w_out_dim)
        if h.bias is not None:
            seeds[_an.param_name(h.bias)] = Shard(0)
        for e in an.vocab_embeddings:
            name = _an.param_name(e.args[0])
            if name not in seeds:
                seeds[name] = Shard(0)
            elif seeds[name] != Shard(0):  # tied to a [in, out] head: not supported
                raise ShardingError(f"embedding '{name}' is tied to an LM head stored [in, out]")
    if sp:
        if an.embed_out_shape is None:
            raise ConfigError("sequence_parallel=True: no token embedding was found to split "
                              "the sequence from; use sequence_parallel=False")
        s = an.embed_out_shape[-2]
        if s % t:
            raise ConfigError(f"sequence_parallel=True needs tp={t} to divide the sequence "
                              f"length {s}; pad the sequence or change tp")
    return seeds


def collective_plans(rw: Rewriter, t: int) -> list:
    out = []
    for kind, n, where, old in rw.collectives:
        v = n.meta.get("val")
        if v is None:
            continue
        nbytes = v.numel() * v.element_size()
        if kind == "f":
            out.append(CollectivePlan("all_reduce", "tp", f"{n.name} ({where})", 0,
                                      f"{list(v.shape)} {v.dtype}; backward only: "
                                      f"{int(2 * (t - 1) * nbytes / t)} bytes per microbatch"))
            continue
        full = nbytes * (t if kind == "all_gather" else 1)
        sent = {"all_reduce": 2 * (t - 1) * nbytes / t, "all_gather": (t - 1) * full / t,
                "reduce_scatter": (t - 1) * nbytes}[kind]
        bwd = {"all_reduce": "backward: none (g)", "all_gather": "backward: reduce-scatter",
               "reduce_scatter": "backward: all-gather"}[kind]
        out.append(CollectivePlan(kind, "tp", f"{n.name} ({where})", int(sent),
                                  f"{list(v.shape)} {v.dtype}; {bwd}"))
    return out

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
import ptdp_compiler.runtime.rng  # noqa: F401  (registers ptdp::tp_rank_dropout_mask)
from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ConfigError, ShardingError
from ptdp_compiler.placement import CollectivePlan, Shard

from . import analyze as _an
from .sharding import PaddedShard, local_shape, moved, padded_size, view_rule

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


def _heads_kind(node) -> str:
    """'attention heads' or 'key/value heads' when a view's output feeds attention as the
    query or as a key/value (followed through layout ops), else ''."""
    stack, seen = [(node, None)], set()
    while stack:
        n, _ = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.target is aten.scaled_dot_product_attention.default:
                return "attention heads" if u.args[0] is n else "key/value heads"
            if u.target in (aten.matmul.default, aten.bmm.default):
                return "attention heads"
            if u.op == "call_function" and len(seen) < 64:
                stack.append((u, None))
    return ""


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
                 sp: bool, requires_grad: dict, bucket: Optional[list] = None):
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
        # {parameter: bucket key}: the parameters of one layer share one f op, emitted at the
        # first use of any of them (so the op never crosses a layer/pipeline-stage boundary)
        self.bucket = dict(bucket or {})
        self.lazy_param_f = []             # parameters that got their own f this run
        self.dropouts = {"sharded": 0, "replicated": 0}

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
        name = v.meta.get("ptdp_input_name") if v.op == "placeholder" else None
        if v not in self._f and name in self.bucket:
            self.emit_bucket(self.bucket[name])
        if v not in self._f:
            self._f[v] = self.emit(ptdp_ops.tp_f.default, (v, self.gn, self.t,
                                                         "param" if v.op == "placeholder"
                                                         else "act"), pl=None, rg=True)
            self.gradok.add(self._f[v])
            self.collectives.append(("f", self._f[v], f"f on {v.name}", None))
            if v.op == "placeholder":
                self.grad_tp_params.add(v.meta.get("ptdp_input_name"))
                self.lazy_param_f.append(v.meta.get("ptdp_input_name"))
        return self._f[v]

    def emit_bucket(self, key):
        """f for every parameter of bucket ``key`` as one op: its backward is a single
        all-reduce of all their gradients (not one per parameter)."""
        names = {n for n, k in self.bucket.items() if k == key}
        phs = [v for v in self.g.nodes if v.op == "placeholder" and
               v.meta.get("ptdp_input_name") in names and v.meta.get("ptdp_input_kind") == "param"]
        if not phs:
            return
        b = self.emit(ptdp_ops.tp_f_bucket.default, (phs, self.gn, self.t), pl=None, rg=True)
        self.collectives.append(("f_bucket", b, f"f on {len(phs)} parameters", None))
        for i, v in enumerate(phs):
            gi = self.emit(operator.getitem, (b, i), pl=None, rg=True)
            self._f[v] = gi
            self.gradok.add(gi)
            self.grad_tp_params.add(v.meta.get("ptdp_input_name"))

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

    def reduce_partial(self, v, old, node, bias=None):
        """Partial sums of ``old``'s full shape -> g, or reduce-scatter along the sequence.
        ``bias`` (SP only): a replicated bias added to the shard by the reduce-scatter op,
        which takes its gradient from the gathered output gradient (no f needed)."""
        if self.sp:
            seq = self.seq_placement(tuple(_val(old).shape), node)
            if bias is None:
                op, args = ptdp_ops.sp_scatter.default, (v,)
            else:
                op, args = ptdp_ops.sp_scatter_bias.default, (v, bias)
            n = self.emit(op, (*args, seq.dim, seq.outer, self.gn, self.t), pl=seq, like=node)
            self.collectives.append(("reduce_scatter", n, f"after {node.name}" +
                                     (" (+ bias)" if bias is not None else ""), node))
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
        if isinstance(out_pl, PaddedShard):
            _fail(node, "a replicated operand meets the padded vocabulary dimension")
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
            if tgt is aten.dropout.default:
                self.dropouts["replicated"] += 1   # shared stream: same mask on every tp rank
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
        if tgt is aten.dropout.default and xp is not None:
            return self.sharded_dropout(node, xp)
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
    def sharded_dropout(self, node, xp):
        """Dropout of a tp-sharded tensor: a keep-mask from this tp rank's own stream
        (runtime/rng.py), scaled as aten.dropout scales."""
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if not train or p == 0 or p >= 1:     # deterministic: no random numbers drawn
            return self.copy(node, xp)
        return self.rank_dropout(self.env[node.args[0]], xp, float(p), node)

    def rank_dropout(self, x, xp, p: float, node):
        self.dropouts["sharded"] += 1
        det = self.emit(aten.detach.default, (x,), pl=xp, rg=False)
        keep = self.emit(ptdp_ops.tp_rank_dropout_mask.default, (det, float(p), self.r),
                         pl=xp, rg=False, like=node)
        y = self.emit(aten.mul.Tensor, (x, keep), pl=xp, like=node)
        return self.emit(aten.mul.Scalar, (y, 1.0 / (1.0 - p)), pl=xp, like=node)

    def pointwise(self, node):
        out = _val(node)
        m = out.dim()
        shard = None
        for a in node.all_input_nodes:
            p = self.pl.get(self.env[a])
            if p is None:
                continue
            od = p.dim + m - _val(a).dim()
            cand = moved(p, od)
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
        if isinstance(xp, PaddedShard):
            # the padded vocabulary must stay one whole trailing dimension (logits views
            # between the LM head and the loss: [B, T, V] <-> [B·T, V])
            if xp.dim != len(full_in) - 1 or full_out[-1] != full_in[-1]:
                _fail(node, f"the view {list(full_in)} -> {list(full_out)} splits the padded "
                            f"vocabulary dimension")
            p = moved(xp, len(full_out) - 1)
            new = local_shape(full_out, p, self.t)
            self.shape_rewrite(node, full_out, new)
            tgt = node.target if node.target in (aten.view.default, aten._unsafe_view.default) \
                else aten.reshape.default
            return self.emit(tgt, (self.env[node.args[0]], new), pl=p, like=node)
        p = view_rule(full_in, xp, full_out, self.t)
        if p is None:
            size = full_in[xp.dim]
            outer_total = math.prod(full_in[:xp.dim]) * xp.outer
            before = 1
            for o in full_out:
                if before == outer_total and o % self.t:
                    what = _heads_kind(node)
                    if what:
                        _fail(node, f"tp={self.t} does not divide the {o} {what} "
                                    f"(view {list(full_in)} -> {list(full_out)}); tensor "
                                    "parallelism gives each rank whole heads (key/value heads "
                                    "are not replicated across ranks): choose tp dividing "
                                    f"{o}", ConfigError)
                    _fail(node, f"tp={self.t} does not divide {o}, the leading factor of the "
                                f"split dimension in {list(full_out)}; choose tp dividing it",
                          ConfigError)
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
            p = moved(xp, b if d == a else a if d == b else d)
        elif tgt is aten.t.default:
            p = moved(xp, 1 - d)
        elif tgt is aten.permute.default:
            perm = [i % nd for i in args[0]]
            p = moved(xp, perm.index(d))
        elif tgt is aten.unsqueeze.default:
            u = args[0] % (nd + 1)
            p = moved(xp, d + 1 if u <= d else d)
        elif tgt is aten.squeeze.dim:
            s = args[0] % nd
            if s == d:
                _fail(node, "squeeze of the sharded dimension")
            p = moved(xp, d - 1 if s < d else d)
        elif tgt is aten.expand.default:
            full_out = tuple(_val(node).shape)
            p = moved(xp, d + len(full_out) - nd)
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
            p = moved(xp, d - 1 if s < d else d)
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
                p = moved(xp, xp.dim - 1 if dim < xp.dim else xp.dim)
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
        names = ("attn_mask", "dropout_p", "is_causal", "scale")
        opts = {k: (rest[i] if i < len(rest) else kwargs.get(k)) for i, k in enumerate(names)}
        opts["mask_is_bool"] = isinstance(mask, fx.Node) and _val(mask).dtype == torch.bool
        if opts["dropout_p"]:
            return self.attention_with_rank_dropout(node, *args, opts,
                                                    kwargs.get("enable_gqa", False))
        return self.emit(node.target, args + rest, kwargs, pl=Shard(1), like=node)

    def attention_with_rank_dropout(self, node, q, k, v, opts, gqa):
        """Attention with dropout on head-sharded q, k, v, written out so the dropout of the
        attention probabilities draws this tp rank's own numbers (the fused op would draw
        the same numbers on every rank, for different heads)."""
        e, pl = self.emit, Shard(1)
        qv, kv = _val(node.args[0]), _val(node.args[1])
        L, S, E = qv.shape[-2], kv.shape[-2], qv.shape[-1]
        if gqa and qv.shape[1] != kv.shape[1]:
            rep = qv.shape[1] // kv.shape[1]
            k = e(aten.repeat_interleave.self_int, (k, rep, 1), pl=pl, like=node)
            v = e(aten.repeat_interleave.self_int, (v, rep, 1), pl=pl, like=node)
        scale = opts["scale"] if opts["scale"] is not None else 1.0 / math.sqrt(E)
        kt = e(aten.transpose.int, (k, -2, -1), pl=pl, like=node)
        sc = e(aten.mul.Scalar, (e(aten.matmul.default, (q, kt), pl=pl, like=node), scale),
               pl=pl, like=node)
        if opts["is_causal"]:
            ones = e(aten.ones.default, ([L, S],), {"dtype": torch.bool, "device": qv.device},
                     pl=None, rg=False)
            hide = e(aten.logical_not.default, (e(aten.tril.default, (ones,), pl=None, rg=False),),
                     pl=None, rg=False)
            sc = e(aten.masked_fill.Scalar, (sc, hide, float("-inf")), pl=pl, like=node)
        mask = opts["attn_mask"]
        if isinstance(mask, fx.Node):
            if opts["mask_is_bool"]:
                hide = e(aten.logical_not.default, (mask,), pl=self.pl.get(mask), rg=False)
                sc = e(aten.masked_fill.Scalar, (sc, hide, float("-inf")), pl=pl, like=node)
            else:
                sc = e(aten.add.Tensor, (sc, mask), pl=pl, like=node)
        a = e(aten._softmax.default, (sc, -1, False), pl=pl, like=node)
        a = self.rank_dropout(a, pl, float(opts["dropout_p"]), node)
        return e(aten.matmul.default, (a, v), pl=pl, like=node)

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
        return self.copy(node, moved(xp, d))

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
            out_pl = moved(wp, out_nd - 1)
            return self.emit(node.target, self._lin_args(node, lin, x, W, b), pl=out_pl,
                             like=node)
        if wp is not None:                                        # row-parallel
            if xp is None or xp.dim != xnd - 1 or xp.outer != 1:
                _fail(node, f"a row-parallel linear needs its input split on the last "
                            f"dimension; got {xp}")
            mm = self.emit(aten.linear.default if lin.w_out_dim == 0 else
                           (aten.mm.default if node.target is not aten.matmul.default
                            else aten.matmul.default), (x, W), pl=None, like=node)
            if self.sp and b is not None and self.pl.get(b) is None and \
                    tuple(_val(lin.bias).shape) == tuple(_val(node).shape[-1:]):
                # the bias joins the reduce-scatter: its gradient comes from the gathered
                # output gradient, so it needs no f (collectives.sp_scatter_bias)
                return self.reduce_partial(mm, node, node, bias=b)
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
                         pl=moved(xp, xp.dim), like=node)

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
        if wp is None or wp.dim != 0 or wp.outer != 1 or self.pl.get(ids) is not None:
            _fail(node, f"embedding with weight {wp} and ids {self.pl.get(ids)}")
        vl = local_shape(_val(node.args[0]).shape, wp, self.t)[0]   # padded rows included
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
        if _val(logits).dim() != 2 or lp is None or lp.dim != 1 or lp.outer != 1 or \
                self.pl.get(tg) is not None:
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
        vl = local_shape(_val(logits).shape, lp, self.t)[1]   # padded columns included
        lo = self.r * vl
        e = self.emit
        if lo + vl > V:
            # vocabulary padding: this rank's columns past V are no tokens; -inf logits
            # never win the max, add nothing to the sum of exponentials, and pass no
            # gradient back to the zero rows that produced them
            cols = e(aten.arange.start, (lo, lo + vl), {"device": _val(logits).device},
                     pl=None, rg=False)
            pad = e(aten.ge.Scalar, (cols, V), pl=None, rg=False)
            lg = e(aten.masked_fill.Scalar, (lg, pad, float("-inf")), pl=None, like=node)
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
                    sp: bool, requires_grad: dict, bucket_param_f: bool = True):
    """Returns (new GraphModule, seeds {param: Shard}, rewriter).

    The rewrite runs again when it learns something: a fused projection's split (the
    weight is re-seeded as block-sharded), or the replicated parameters that need f
    (their gradients, partial over tp, are then summed by one bucketed all-reduce)."""
    seeds = initial_seeds(gm, an, t, sp)
    bucket = None
    for _ in range(10):
        rw = Rewriter(gm, an, seeds, t, rank, group_name, sp, requires_grad, bucket)
        try:
            g = rw.run()
        except _Refine as ref:
            seeds = _refine(seeds, an, ref)
            continue
        if rw.lazy_param_f and bucket is None and bucket_param_f:
            bucket = _buckets_by_layer(gm, rw.lazy_param_f)
            continue
        new = fx.GraphModule(gm, g)
        return new, seeds, rw
    raise ShardingError("sharding propagation did not converge (repeated fused-weight splits)")


def _buckets_by_layer(gm: fx.GraphModule, names: list) -> dict:
    """{parameter: key}: parameters read by the same layer (the element of a layer
    container their first reader belongs to, from nn_module_stack) share a bucket; outside
    the layers, those of one module (e.g. the final norm's weight and bias) do. Per layer,
    so regional compilation sees identical layers and no bucket spans two pipeline stages."""
    from .pipeline_split import _layer_key
    wanted = set(names)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        name = ph.meta.get("ptdp_input_name")
        if name not in wanted or ph.meta.get("ptdp_input_kind") != "param":
            continue
        first = min(ph.users, key=order.__getitem__, default=None)
        key = _layer_key(first) if first is not None else None
        if key is None and first is not None:   # outside the layers: the reading module
            stack = first.meta.get("nn_module_stack") or {}
            paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
            key = paths[-1] if paths else None
        out[name] = key if key is not None else f"param:{name}"
    return out


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
        check(n, lin.out_features,
              "the attention width (heads·head_dim, the hidden size)"
              if an.group_kinds.get(an.column[n]) == "attention" else "the FFN size")
        seeds[_an.param_name(lin.weight)] = Shard(lin.w_out_dim)
        if lin.bias is not None:
            seeds[_an.param_name(lin.bias)] = Shard(0)
    for n in an.row:
        lin = an.linears[n]
        check(n, lin.weight.meta["val"].shape[1 - lin.w_out_dim],
              "the input features (the attention width, the hidden size)"
              if an.group_kinds.get(an.row[n]) == "attention" else
              "the input features (the FFN size)")
        seeds[_an.param_name(lin.weight)] = Shard(1 - lin.w_out_dim)
    if an.head is not None:
        h = an.head
        if an.vocab % t:   # Megatron's padding: zero rows up to a multiple of t
            pad = padded_size(an.vocab, t)

            def vocab(dim):
                return PaddedShard(dim, 1, an.vocab, pad)
        else:
            def vocab(dim):
                return Shard(dim)
        seeds[_an.param_name(h.weight)] = vocab(h.w_out_dim)
        if h.bias is not None:
            seeds[_an.param_name(h.bias)] = vocab(0)
        for e in an.vocab_embeddings:
            name = _an.param_name(e.args[0])
            if name not in seeds:
                seeds[name] = vocab(0)
            elif seeds[name] != vocab(0):  # tied to a [in, out] head: not supported
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
        if kind == "f_bucket":
            nbytes = sum(x.numel() * x.element_size() for x in v)
            out.append(CollectivePlan("all_reduce", "tp", f"{n.name} ({where})", 0,
                                      f"gradient bucket of {nbytes} bytes; backward only: one "
                                      f"all-reduce, {int(2 * (t - 1) * nbytes / t)} bytes "
                                      "per microbatch"))
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

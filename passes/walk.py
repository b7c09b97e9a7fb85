"""The forward walk from a linear's output that ``analyze`` builds blocks from: where the
column split lands in every value it reaches (``split_dim``), which ops mix the split
features (barriers), and which norm statistics over the split width the tensor-parallel
rules sum over tp instead. Reads the graph, never edits it."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.placement import Shard

aten = torch.ops.aten

_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.flatten.using_ints, aten.unflatten.int}

NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
         aten.group_norm.default, aten.batch_norm.default}
LOSSES = {aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
              aten.var.correction, aten.std.correction, aten.var.dim, aten.std.dim,
              aten.mean.default, aten.sum.default,
              aten.logsumexp.default, aten.norm.ScalarOpt_dim,
              aten.linalg_vector_norm.default}
# ops along one dimension (arg 1 is that dim; topk's is arg 2): a router's top-k over its
# experts mixes what a column split would separate
ALONG_DIM = {aten.max.dim, aten.min.dim, aten.sort.default, aten.argmax.default,
             aten.argmin.default, aten.cumsum.default, aten.topk.default}
_CONVS = {aten.conv1d.default, aten.conv2d.default}
_FACTORIES = {aten.zeros.default, aten.ones.default, aten.empty.memory_format,
              aten.full.default}
_NEW_FACTORIES = {aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default,
                  aten.new_full.default}
_PADS = {aten.pad.default, aten.constant_pad_nd.default}
# ops that mark a block as attention (its column width is heads·head_dim)
ATTENTION = {aten.scaled_dot_product_attention.default, aten.softmax.int,
             aten._softmax.default, aten._safe_softmax.default}


def _reduced_dims(n: fx.Node) -> Optional[list]:
    """The dimensions a reduction or norm ``n`` mixes (of its first input), None if ``n`` is
    neither."""
    if n.target not in NORMS and n.target not in REDUCTIONS and n.target not in ALONG_DIM:
        return None
    val = n.args[0].meta.get("val") if n.args and isinstance(n.args[0], fx.Node) else None
    nd = val.dim() if isinstance(val, torch.Tensor) else 1
    if n.target in ALONG_DIM:
        i = 2 if n.target is aten.topk.default else 1
        d = n.args[i] if len(n.args) > i else n.kwargs.get("dim", -1)
        return list(range(nd)) if d is None else [d % nd]
    if n.target in (aten.group_norm.default, aten.batch_norm.default):
        return list(range(nd))
    if n.target in NORMS:
        k = len(n.args[1]) if len(n.args) > 1 and isinstance(n.args[1], (list, tuple)) else 1
        return list(range(nd - k, nd))
    if n.target is aten.linalg_vector_norm.default:   # (x, ord, dim, keepdim)
        dims = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        if dims is None or dims == []:
            return list(range(nd))
        return [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
    if n.target in REDUCTIONS:
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None or dims == []:
            return list(range(nd))
        return [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
    return None


def _smallest_factor(n: int) -> int:
    return next((p for p in range(2, int(n ** 0.5) + 1) if n % p == 0), n)


def _split_dim(u: fx.Node, src: fx.Node, d: Optional[int], probe: int) -> Optional[int]:
    """Where the column split (dimension ``d`` of ``src``, a factor ``probe`` of it) lands in
    ``u``'s output; None when it cannot be followed (the walk then assumes the worst)."""
    from .sharding import view_rule
    if d is None:
        return None
    if u.target in _SPLITS or u.target is operator.getitem or u.target in (
            aten.slice.Tensor, aten.cat.default, aten.concatenate.default, aten.narrow.default):
        return d              # the pieces keep their dimensions
    uv, sv = u.meta.get("val"), src.meta.get("val")
    if not isinstance(uv, torch.Tensor) or not isinstance(sv, torch.Tensor):
        return None
    nd, m = sv.dim(), uv.dim()
    args = u.args[1:]
    if u.target in _VIEWS:
        pl = view_rule(tuple(sv.shape), Shard(d), tuple(uv.shape), probe)
        return pl.dim if pl is not None else None
    if u.target is aten.transpose.int:
        a, b = args[0] % nd, args[1] % nd
        return b if d == a else a if d == b else d
    if u.target is aten.permute.default:
        return [i % nd for i in args[0]].index(d)
    if u.target is aten.unsqueeze.default:
        return d + 1 if args[0] % (nd + 1) <= d else d
    if u.target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        gone = [i for i in range(nd) if sv.shape[i] == 1 and (
            u.target is aten.squeeze.default or
            i in {k % nd for k in (args[0] if isinstance(args[0], (list, tuple))
                                   else [args[0]])})]
        return None if d in gone else d - sum(1 for i in gone if i < d)
    mixed = _reduced_dims(u) if u.target in REDUCTIONS and u.args[0] is src else None
    if mixed is not None and d not in mixed:
        # a reduction over other dimensions (ZAYA's mean over the query heads sharing a key
        # head, a per-head norm): the split stays, shifted past the dimensions it drops
        return d if m == nd else d - sum(1 for k in mixed if k < d)
    if u.target in _NEW_FACTORIES and u.args[0] is src:
        # a fresh buffer shaped like the split value (filled by copies of it: DeepSeek's
        # key built in new_empty storage) is laid out like it
        return d if m == nd and uv.shape[d] == sv.shape[d] else None
    if u.target is aten.stack.default:
        k = (u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)) % m
        return d + (k <= d)   # a new dimension before or after the split one
    if u.target is aten.select.int:
        return None if args[0] % nd == d else d - (args[0] % nd < d)
    if u.target in _CONVS and u.args[0] is src and d == 1 and \
            (u.args[6] if len(u.args) > 6 else 1) > 1 and uv.shape[1] == sv.shape[1]:
        return 1              # a depthwise or grouped conv's channels (Mamba's short conv)
    if u.target is aten.repeat.default:
        return d + m - nd     # tiles: the split dimension stays where it is
    if u.target is aten.repeat_interleave.self_int and len(args) > 1 and args[1] is not None:
        return d              # kv heads repeated for the value heads sharing them
    if u.target in _PADS and d < nd - len(u.args[1]) // 2:
        return d              # padding of other (trailing) dimensions
    if m == nd and tuple(uv.shape) == tuple(sv.shape) or u.target in (aten.expand.default,) or \
            (isinstance(u.target, torch._ops.OpOverload) and torch.Tag.pointwise in u.target.tags):
        return d + m - nd     # same layout (pointwise, broadcast, casts, rope)
    if u.target in (aten.matmul.default, aten.bmm.default) and d < nd - 2:
        return d + m - nd     # a batch (heads) dimension
    return None


def _walk(lin, linears: dict):
    """Forward closure of a linear's output: (region nodes, rows reached, barriers).

    The walk follows where the column split lands (``_split_dim``): a norm or reduction
    over other dimensions (a per-head q/k norm over head_dim) is local and no barrier. A
    norm statistic over the whole split width is allowed when what it normalises flows
    on to attention without another linear (OLMo-2's q/k norm), or on into linears' inputs
    only when it is a norm over groups (Mamba-2's gated norm) or lies past the block's
    attention or gated product (BitNet's sub-norms): the tensor-parallel rule sums the
    statistic over tp. Anything else that mixes the split features is a barrier."""
    probe = _smallest_factor(lin.out_features)
    region, rows, barriers = set(), set(), []
    if lin.out_features == 1:   # a scalar gate per token (Qwen2-MoE's shared-expert gate)
        return region, rows, [lin.node]
    start = lin.out_at if lin.out_at is not None else lin.node.meta["val"].dim() - 1
    stack = [(lin.node, start, False)]
    while stack:
        n, d, inside = stack.pop()
        for u in n.users:
            if u in region:
                continue
            ul = linears.get(u)
            if ul is not None and ul.x is n and d is not None and \
                    d < n.meta["val"].dim() - 1 and not ul.grouped and ul.out_at is None \
                    and _view_of(n, lin.node):
                # split on another dimension than its features (heads): a whole weight
                # acts on each rank's part (Inkling's per-head relative logits)
                region.add(u)
                stack.append((u, d, inside))
                continue
            if ul is not None:
                if ul.x is n:
                    rows.add(u)
                else:
                    barriers.append(u)
                continue
            if u.op == "output" or u.target in LOSSES or u.target is aten.embedding.default:
                barriers.append(u)
                continue
            if u.target is aten.select.int and u.args[0] is n and d is not None and \
                    u.args[1] % n.meta["val"].dim() == d:
                # one entry of the split dimension (Gemma 4's per-layer inputs, [.., L, e]
                # read one layer at a time): every rank would need it whole
                barriers.append(u)
                continue
            mixed = _reduced_dims(u)
            if mixed is not None and u.args[0] is n:
                # where the split cannot be followed, assume it is the last dimension
                split = d if d is not None else n.meta["val"].dim() - 1
                if split in mixed and not _statistic_to_attention(u, linears) and \
                        not _group_norm_statistic(u, linears) and \
                        not (inside and _statistic_to_linear(u, linears)):
                    barriers.append(u)
                    continue
            region.add(u)
            if u.target in (aten.copy_.default, aten.copy.default) and u.args[1] is n and \
                    d is not None:
                # written into a buffer: the walk goes on from the buffer's readers
                buf = _written_buffer(u.args[0], d + u.meta["val"].dim() - n.meta["val"].dim())
                if buf is not None and buf[0] not in region:
                    region.add(buf[0])
                    stack.append((buf[0], buf[1], inside))
            past = inside or u.target in ATTENTION or (   # attention, or the gated product
                u.target is aten.mul.Tensor and any(_from_linear(a, linears)
                                                    for a in u.all_input_nodes if a is not n))
            stack.append((u, _split_dim(u, n, d, probe), past))
    return region, rows, barriers


def _written_buffer(dst: fx.Node, d: int):
    """(buffer, its dimension) that dimension ``d`` of ``dst`` is, when ``dst`` is a
    fresh buffer (``torch.zeros``) or a slice / select of one along other dimensions."""
    while dst.op == "call_function" and dst.target in (aten.slice.Tensor, aten.select.int,
                                                       aten.alias.default):
        x = dst.args[0]
        k = dst.args[1] % x.meta["val"].dim() if len(dst.args) > 1 else None
        if dst.target is aten.slice.Tensor and k == d:
            return None
        if dst.target is aten.select.int and k <= d:
            d += 1
        dst = x
    if dst.op == "call_function" and dst.target in _FACTORIES and not dst.all_input_nodes:
        return dst, d
    return None


def _gate_of_row(lin, rows: dict, linears: dict):
    """(product, row linear) when ``lin``'s output, through one-input element-wise ops,
    multiplies a row-parallel linear's output (through the same), else None."""
    def chain_to_mul(a):
        for _ in range(4):
            users = list(a.users)
            if len(users) != 1:
                return None, None
            u = users[0]
            if u.target is aten.mul.Tensor:
                return u, a
            if not (isinstance(u.target, torch._ops.OpOverload) and
                    torch.Tag.pointwise in u.target.tags and len(u.all_input_nodes) == 1):
                return None, None
            a = u
        return None, None
    mul, mine = chain_to_mul(lin.node)
    if mul is None or lin.out_features != mul.meta["val"].shape[-1]:
        return None
    for r in rows:
        if r is not lin.node and chain_to_mul(r)[0] is mul and \
                tuple(r.meta["val"].shape) == tuple(mul.meta["val"].shape):
            return mul, r
    return None


_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default,
          aten.contiguous.default, aten.alias.default}


def _view_of(n: fx.Node, src: fx.Node) -> bool:
    """``n`` is ``src`` through views, casts and element-wise ops that keep its shape
    (Inkling-2's per-head scale and L2 clip), each step's other operands broadcast to it:
    the split is known exactly there (a matmul or a merged batch dimension would lose it)."""
    for _ in range(64):
        if n is src:
            return True
        if n.op != "call_function":
            return False
        if n.target in _VIEWS or n.target in _CASTS:
            n = n.args[0]
            continue
        shape = tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) \
            else None
        same = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
                and tuple(a.meta["val"].shape) == shape]
        if not (isinstance(n.target, torch._ops.OpOverload) and
                torch.Tag.pointwise in n.target.tags) or len(same) != 1:
            return False
        n = same[0]
    return False


def _from_linear(a: fx.Node, linears: dict) -> bool:
    """``a`` is a linear's output, through at most three one-input ops (the up-projection
    beside a gated MLP's activated gate)."""
    for _ in range(4):
        if a in linears:
            return True
        if a.op != "call_function" or len(a.all_input_nodes) != 1:
            return False
        a = a.all_input_nodes[0]
    return False


def _statistic_to_attention(u: fx.Node, linears: dict) -> bool:
    """A mean / sum statistic (a decomposed RMSNorm's mean square) whose users reach
    attention before any linear or barrier."""
    if u.target not in (aten.mean.dim, aten.sum.dim_IntList):
        return False
    stack, seen, attention = [u], set(), False
    while stack:
        n = stack.pop()
        for w in n.users:
            if w in seen:
                continue
            seen.add(w)
            if w in linears or w.op == "output" or w.target in LOSSES or \
                    w.target in NORMS or len(seen) > 400:
                return False
            if w.target in ATTENTION:
                attention = True
                continue
            stack.append(w)
    return attention


def _group_norm_statistic(u: fx.Node, linears: dict) -> bool:
    """The mean square of a norm over groups of the block's features (Mamba-2's gated
    RMSNorm: features viewed [.., groups, size] just before), whose result flows on into a
    linear's input before any other barrier: the tensor-parallel rule sums the statistic
    over tp when the split falls inside a group (fewer groups than ranks)."""
    if u.target not in (aten.mean.dim, aten.sum.dim_IntList):
        return False
    m = u.args[0]
    for _ in range(4):   # back through the square (pow, casts) to the grouping view
        if not isinstance(m, fx.Node) or m.op != "call_function":
            return False
        if m.target in _VIEWS:
            ins, outs = m.args[0].meta["val"].shape, m.meta["val"].shape
            if len(outs) != len(ins) + 1 or tuple(outs[:-2]) != tuple(ins[:-1]) or \
                    outs[-2] * outs[-1] != ins[-1]:
                return False
            break
        m = m.args[0]
    else:
        return False
    return _statistic_to_linear(u, linears)


def _statistic_to_linear(u: fx.Node, linears: dict) -> bool:
    """What the statistic ``u`` scales flows into linears' inputs only, before any other
    barrier. Inside a block (past its attention or its gated product: BitNet's sub-norms
    before o_proj and down_proj) such a norm over the split width is summed over tp."""
    if u.target not in (aten.mean.dim, aten.sum.dim_IntList):
        return False
    stack, seen = [u], set()
    while stack:
        n = stack.pop()
        for w in n.users:
            if w in seen:
                continue
            seen.add(w)
            lin = linears.get(w)
            if lin is not None:
                if lin.x is not n:
                    return False
                continue
            if w.op == "output" or w.target in LOSSES or w.target in NORMS or len(seen) > 200:
                return False
            stack.append(w)
    return True

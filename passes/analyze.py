"""Roles from dataflow: which linears form Megatron column/row pairs, which embedding and
LM head are vocab-parallel. Parameter and module names are never consulted.

A *linear* is ``aten.linear(x, W[out,in], b)``, ``aten.addmm(b, x, W[in,out])``
(Hugging Face ``Conv1D``), or ``aten.mm``/``aten.matmul(x, W)`` with ``W`` a parameter.

From each linear's output the analysis walks forward through every consumer. The walk
stops at another linear's *input* (a row-parallel candidate) and fails at a
*barrier*: an op that mixes the features a column split would separate (a norm, a
reduction over the last dimension, an embedding, the loss, the graph output). Walks
that meet (q, k and v at the attention core; gate and up at their product) are
united into one group. A group whose walk reaches at least one linear and no barrier
is a tensor-parallel block: its starting linears are column-parallel, the linears it
reaches are row-parallel. Whether every op in between is really local on the split
dimension is then proved (or refuted with a ShardingError) by the sharding
propagation in ``tensor_parallel``.

A linear whose walk reaches only the loss, through ops that keep the last dimension
(views, casts, slices of other dims), is the LM head: vocab-parallel, with the
cross-entropy computed vocab-parallel. An embedding is vocab-parallel when it shares
its weight with the LM head (tied) or has as many rows as the head has outputs and is
indexed by user-input token ids.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import ancestors  # noqa: F401  (re-exported)
from ptdp_compiler.placement import Shard

from .embedding_sum import find as _embedding_sum

aten = torch.ops.aten
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.flatten.using_ints, aten.unflatten.int}

NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
         aten.group_norm.default, aten.batch_norm.default}
LOSSES = {aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
              aten.var.correction, aten.std.correction, aten.mean.default, aten.sum.default,
              aten.logsumexp.default, aten.norm.ScalarOpt_dim}
# ops along one dimension (arg 1 is that dim; topk's is arg 2): a router's top-k over its
# experts mixes what a column split would separate
ALONG_DIM = {aten.max.dim, aten.min.dim, aten.sort.default, aten.argmax.default,
             aten.argmin.default, aten.cumsum.default, aten.topk.default}
GROUPED_MM = {aten._grouped_mm.default}
_CONVS = {aten.conv1d.default, aten.conv2d.default}
_PADS = {aten.pad.default, aten.constant_pad_nd.default}


def is_grouped_mm(target) -> bool:
    """Grouped (per-expert) matmuls: x [tokens, in] sorted by expert, W [experts, in, out],
    offsets of each expert's tokens: aten's, and the fallback transformers registers once
    it is imported (looked up then; a graph cannot hold it before)."""
    if target in GROUPED_MM:
        return True
    if isinstance(target, torch._ops.OpOverload) and \
            target._schema.name == "transformers::grouped_mm_fallback":
        GROUPED_MM.add(target)
        return True
    return False
# ops that mark a block as attention (its column width is heads·head_dim)
ATTENTION = {aten.scaled_dot_product_attention.default, aten.softmax.int,
             aten._softmax.default, aten._safe_softmax.default}
# ops allowed between the LM head and the loss (they keep the vocabulary dimension whole)
HEAD_TO_LOSS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                aten.flatten.using_ints, aten.unflatten.int,
                aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default,
                aten.clone.default, aten.slice.Tensor, aten.alias.default,
                aten._assert_tensor_metadata.default}


@dataclasses.dataclass
class Linear:
    node: fx.Node
    x: fx.Node
    weight: fx.Node            # placeholder
    bias: Optional[fx.Node]    # placeholder or None
    w_out_dim: int             # 0: W is [out, in] (nn.Linear); 1: W is [in, out] (Conv1D)
    # routed experts (grouped_mm): W is [experts, out, in] (w_out_dim 1) or [experts, in,
    # out] (w_out_dim 2), read through a transpose or directly; tokens arrive sorted by
    # expert, so partial sums are all-reduced, never reduce-scattered along a sequence
    grouped: bool = False
    # an einsum with a parameter (XLNet's "ibh,hnd->ibnd"): W's dimension read by the
    # input features, and where the output's split features (W's first kept index) land
    in_dim: Optional[int] = None
    out_at: Optional[int] = None

    @property
    def out_features(self) -> int:
        return self.weight.meta["val"].shape[self.w_out_dim]

    @property
    def in_features(self) -> int:
        return self.weight.meta["val"].shape[self.w_in_dim]

    @property
    def w_in_dim(self) -> int:
        if self.in_dim is not None:
            return self.in_dim
        nd = self.weight.meta["val"].dim()
        return 1 - self.w_out_dim if nd == 2 else 3 - self.w_out_dim


@dataclasses.dataclass
class Analysis:
    linears: dict                                   # node -> Linear
    column: dict = dataclasses.field(default_factory=dict)    # node -> group id
    row: dict = dataclasses.field(default_factory=dict)       # node -> group id
    head: Optional[Linear] = None                   # vocab-parallel LM head
    vocab_embeddings: list = dataclasses.field(default_factory=list)  # embedding nodes
    vocab: int = 0
    groups: list = dataclasses.field(default_factory=list)    # [(columns, rows)]
    replicated: dict = dataclasses.field(default_factory=dict)  # linear node -> reason
    embed_out_shape: Optional[tuple] = None         # the residual stream's [B, T, C]
    group_kinds: dict = dataclasses.field(default_factory=dict)  # group id -> attention | mlp
    kept_replicated: dict = dataclasses.field(default_factory=dict)  # param -> why (kv < tp)
    # attention cores inside tensor-parallel blocks: each rank computes its own heads even
    # when q, k, v arrive replicated (a projection kept whole, kv heads < tp)
    block_attention: set = dataclasses.field(default_factory=set)
    # the token embedding plus the position / type embeddings added to it, reduced once
    embedding_sum: Optional[object] = None
    # row-parallel ends whose output flows back into their own block (Mamba's x_proj):
    # all-reduced, never reduce-scattered along the sequence (the block needs it whole)
    inner_rows: set = dataclasses.field(default_factory=set)
    # linears split by output rows whose output is all-gathered at once (low rank, normed)
    gathered: set = dataclasses.field(default_factory=set)
    # gate linear -> (the product with a row-parallel output, that row linear)
    gates: dict = dataclasses.field(default_factory=dict)


def param_name(node) -> Optional[str]:
    if isinstance(node, fx.Node) and node.op == "placeholder" and \
            node.meta.get("ptdp_input_kind") == "param":
        return node.meta["ptdp_input_name"]
    return None


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def _transposed_param(w) -> Optional[fx.Node]:
    """The parameter ``w`` is the transpose of (W.t(), W.T, W.transpose(-2, -1), the
    last two dims swapped), or None."""
    if not isinstance(w, fx.Node) or w.target not in _TRANSPOSES or not param_name(w.args[0]):
        return None
    nd = w.args[0].meta["val"].dim()
    if w.target is aten.transpose.int:
        ok = sorted(d % nd for d in w.args[1:3]) == [nd - 2, nd - 1]
    elif w.target is aten.permute.default:
        ok = [d % nd for d in w.args[1]] == list(range(nd - 2)) + [nd - 1, nd - 2]
    else:
        ok = nd == 2
    return w.args[0] if ok else None


def as_linear(n: fx.Node) -> Optional[Linear]:
    if n.op != "call_function":
        return None
    if n.target is aten.linear.default:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if param_name(w) and w.meta["val"].dim() == 2 and (b is None or param_name(b)):
            return Linear(n, x, w, b, 0)
    elif n.target is aten.addmm.default and len(n.args) == 3 and not n.kwargs:
        b, x, w = n.args
        if param_name(w) and param_name(b) and w.meta["val"].dim() == 2:
            return Linear(n, x, w, b, 1)
    elif n.target in (aten.mm.default, aten.matmul.default):
        x, w = n.args[:2]
        if param_name(w) and w.meta["val"].dim() == 2:
            return Linear(n, x, w, None, 1)
        p = _transposed_param(w)
        if p is not None and p.meta["val"].dim() == 2:   # x @ W.T (Falcon's linear)
            return Linear(n, x, p, None, 0)
    elif n.target is aten.einsum.default and len(n.args[1]) == 2 and \
            param_name(n.args[1][1]) and "." not in n.args[0] and "->" in n.args[0]:
        return _einsum_linear(n)
    elif (is_grouped_mm(n.target) or n.target is aten.bmm.default) and len(n.args) >= 2:
        # bmm: every expert's tokens [E, T, in] times its 3-D weight (Llama 4's experts)
        x, w = n.args[:2]
        if param_name(w) and w.meta["val"].dim() == 3:
            return Linear(n, x, w, None, 2, grouped=True)
        p = _transposed_param(w)
        if p is not None and p.meta["val"].dim() == 3:
            return Linear(n, x, p, None, 1, grouped=True)
    return None


def _einsum_linear(n: fx.Node) -> Optional[Linear]:
    """``einsum(eq, x, W)``: W's indices are some contracted with x's trailing ones (its
    input features) and the rest appended to x's others in the output (its output
    features), e.g. "ibh,hnd->ibnd" (a projection to heads) or "ibnd,hnd->ibh" (back)."""
    (xs, ws), out = [part for part in n.args[0].replace(" ", "").split("->")[0].split(",")], \
        n.args[0].replace(" ", "").split("->")[1]
    kept = [c for c in ws if c in out]
    summed = [c for c in ws if c not in out]
    if not kept or not summed or any(c not in xs for c in summed) or \
            xs[-len(summed):] != "".join(c for c in xs if c in summed) or \
            out != "".join(c for c in xs if c not in summed) + "".join(kept) or \
            len(set(ws)) != len(ws):
        return None
    return Linear(n, n.args[1][0], n.args[1][1], None, ws.index(kept[0]),
                  in_dim=ws.index(summed[0]), out_at=out.index(kept[0]))


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
            aten.slice.Tensor, aten.cat.default, aten.narrow.default):
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
    if u.target is aten.select.int:
        return None if args[0] % nd == d else d - (args[0] % nd < d)
    if u.target in _CONVS and u.args[0] is src and d == 1 and \
            (u.args[6] if len(u.args) > 6 else 1) == sv.shape[1]:
        return 1              # a depthwise conv's channels (Mamba's short conv)
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


def _walk(lin: Linear, linears: dict):
    """Forward closure of a linear's output: (region nodes, rows reached, barriers).

    The walk follows where the column split lands (``_split_dim``): a norm or reduction
    over other dimensions (a per-head q/k norm over head_dim) is local and no barrier. A
    norm statistic over the whole split width (OLMo-2's q/k norm) is allowed when what
    it normalises flows on to attention without another linear: the tensor-parallel
    rule sums the statistic over tp. Anything else that mixes the split features is a
    barrier."""
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
            inside = inside or u.target in ATTENTION or (
                u.target is aten.mul.Tensor and any(_from_linear(a, linears)
                                                    for a in u.all_input_nodes if a is not n))
            stack.append((u, _split_dim(u, n, d, probe), inside))
    return region, rows, barriers


def _gate_of_row(lin: Linear, rows: dict, linears: dict):
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


def _view_of(n: fx.Node, src: fx.Node) -> bool:
    """``n`` is ``src`` through views only (the split is known exactly there)."""
    while n is not src:
        if n.op != "call_function" or n.target not in _VIEWS:
            return False
        n = n.args[0]
    return True


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


def _scalar_pointwise(u: fx.Node, n: fx.Node) -> bool:
    """``u`` acts on ``n`` element by element with only scalars beside it (x · s, x / s,
    tanh(x)): every logit is scaled alike, so the vocabulary stays whole per position."""
    if not (isinstance(u.target, torch._ops.OpOverload) and torch.Tag.pointwise in u.target.tags):
        return False
    others = [a for a in u.all_input_nodes if a is not n]
    return all(isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].numel() == 1
               for a in others) and u.meta["val"].shape == n.meta["val"].shape


def _reaches_loss_only(lin: Linear) -> Optional[fx.Node]:
    """The loss node if the linear's output reaches only a loss through HEAD_TO_LOSS ops."""
    stack, loss = [lin.node], None
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.target in LOSSES and u.args[0] is n:
                loss = u
            elif u.target in HEAD_TO_LOSS:
                if u.target is aten.slice.Tensor and u.args[1] % n.meta["val"].dim() == \
                        n.meta["val"].dim() - 1:
                    return None
                stack.append(u)
            elif _scalar_pointwise(u, n):   # logit scaling, soft-capping (tanh)
                stack.append(u)
            else:
                return None
    return loss


def _from_user_inputs(n: fx.Node) -> bool:
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "placeholder":
            if m.meta.get("ptdp_input_kind") == "user":
                return True
            continue
        stack.extend(m.all_input_nodes)
    return False


def analyze(gm: fx.GraphModule) -> Analysis:
    linears = {}
    for n in gm.graph.nodes:
        lin = as_linear(n)
        if lin is not None:
            linears[n] = lin
    an = Analysis(linears)
    walks = {n: _walk(lin, linears) for n, lin in linears.items()}
    # union walks whose regions meet
    parent = {n: n for n in linears}

    def find(a):
        while parent[a] is not a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # a linear whose own output is mixed (a barrier) stays replicated and joins no block:
    # its replicated output may still feed a block (MLA's shared rotary key, a low-rank
    # projection), where the rules slice it to each rank's part
    owner = {}
    for n, (region, _, barriers) in walks.items():
        if barriers:
            continue
        for r in region:
            if r in owner:
                parent[find(n)] = find(owner[r])
            else:
                owner[r] = n
    groups: dict = {}
    for n in linears:
        groups.setdefault(find(n), []).append(n)
    for members in groups.values():
        rows = set().union(*(walks[m][1] for m in members))
        # a start the block also ends at (Mamba's x_proj: row-parallel on the split
        # channels, its all-reduced dt / B / C rejoin the block's scan) is an end only
        members = [m for m in members if m not in rows] or members
        # a linear met inside another's region (a whole weight on head-split values) is
        # no start: it runs on each rank's heads
        inside = {m for m in members if any(m in walks[o][0] for o in members if o is not m)}
        members = [m for m in members if m not in inside] or members
        for m in inside:
            an.replicated[m] = "a whole weight applied to each rank's part of a block " \
                "(split on another dimension than its features)"
        rows = set().union(*(walks[m][1] for m in members))
        barriers = [b for m in members for b in walks[m][2]]
        if rows & set(members):   # a block may not end at one of its own starts
            barriers = barriers or [min(rows & set(members), key=_order(gm))]
        if rows and not barriers:
            gid = len(an.groups)
            an.groups.append((sorted(members, key=_order(gm)), sorted(rows, key=_order(gm))))
            region = set().union(*(walks[m][0] for m in members))
            an.group_kinds[gid] = "attention" if any(r.target in ATTENTION for r in region) \
                else "mlp"
            an.block_attention |= {r for r in region
                                   if r.target is aten.scaled_dot_product_attention.default}
            for m in members:
                an.column[m] = gid
            for r in rows:
                an.row.setdefault(r, gid)
            an.inner_rows.update(r for r in rows if walks[r][0] & region)
        else:
            for m in members:
                an.replicated[m] = "its output has one feature: nothing to split" \
                    if linears[m].out_features == 1 else \
                    ("its output reaches " + (barriers[0].name if barriers else
                     "no other linear") + " before any linear consumes it")
    # a linear cannot be both the end of one block and the start of another
    for n in list(an.column):
        if n in an.row and n in an.column:   # (an earlier conflict may have removed it)
            gid, why = an.column[n], f"{n.name} is both a block's end and start"
            down = [m for m, g in an.column.items() if g == an.row[n]]
            if down and all(linears[m].out_features < linears[m].in_features for m in down) \
                    and linears[n].in_features < linears[n].out_features:
                # n is the up-projection of a low-rank bottleneck (Kimi's gate a -> b, as
                # MLA's): the down-projection stays whole, n starts its own block
                gid, why = an.row[n], f"a low-rank down-projection, {n.name} its " \
                    "up-projection is column-parallel"
            for m in [m for m, g in an.column.items() if g == gid]:
                an.column.pop(m)
                an.replicated[m] = why
            for r in [r for r, g in an.row.items() if g == gid]:   # its ends are no ends
                an.row.pop(r)
    # LM head: a replicated linear feeding only the loss
    for n, lin in linears.items():
        if n in an.column or n in an.row:
            continue
        if _reaches_loss_only(lin) is not None:
            an.head = lin
            an.replicated.pop(n, None)
            an.vocab = lin.out_features
            break
    if an.head is not None:
        hname = param_name(an.head.weight)
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is aten.embedding.default:
                w = n.args[0]
                # tied to the head, or a table of (at least) the vocabulary's rows looked
                # up by the user's ids (its width may differ from the head's: RemBERT; it
                # may hold more rows: CPM-Ant's prompt tokens)
                shape = tuple(w.meta["val"].shape)
                width = an.head.weight.meta["val"].shape[an.head.w_in_dim]
                if param_name(w) == hname or (
                        param_name(w) and len(shape) == 2 and _from_user_inputs(n.args[1])
                        and (shape[0] == an.vocab or
                             (shape[0] > an.vocab and shape[1] == width))):
                    an.vocab_embeddings.append(n)
        if an.vocab_embeddings:
            an.embed_out_shape = tuple(an.vocab_embeddings[0].meta["val"].shape)
        if len(an.vocab_embeddings) == 1:
            an.embedding_sum = _embedding_sum(an.vocab_embeddings[0], an.head.weight)
    # a low-rank down-projection normalised right after (MLA's q_a / kv_a): split by rows
    # and its output all-gathered (Megatron's ColumnParallelLinear with gather_output)
    for n, lin in linears.items():
        barriers = walks[n][2]
        if n in an.replicated and n not in an.column and n not in an.row and \
                not lin.grouped and lin.out_features < lin.in_features and barriers and \
                all(b.target in NORMS or b.target in (aten.mean.dim, aten.sum.dim_IntList)
                    for b in barriers):
            an.gathered.add(n)
    # a gate on a row-parallel output (RWKV's sigmoid(receptance(x)) * value(k)): split too,
    # the row's partial sums reduce-scattered over the features, the product gathered
    for n, lin in linears.items():
        if n in an.replicated and n not in an.gathered and not walks[n][1]:
            gate = _gate_of_row(lin, an.row, linears)
            if gate is not None:
                an.gates[n] = gate
                an.replicated[n] = f"a gate on {gate[1].name}'s output: split only without " \
                    "sequence parallelism"
    for n in gm.graph.nodes:
        role = None
        if n in an.gates:
            role = f"column-parallel gate of {an.gates[n][1].name}'s output (no SP)"
        elif n in an.gathered:
            role = "column-parallel, output all-gathered (a low-rank down-projection " \
                "normalised next)"
        elif n in an.column:
            role = f"column-parallel (block {an.column[n]})"
        elif n in an.row:
            role = f"row-parallel (block {an.row[n]})"
        elif an.head is not None and n is an.head.node:
            role = "LM head (vocab-parallel)"
        elif n in an.vocab_embeddings:
            role = "token embedding (vocab-parallel)"
        elif an.embedding_sum is not None and n in an.embedding_sum.side_tables:
            role = "position / type embedding (rows split, summed with the token embedding)"
        elif n in an.replicated:
            role = "replicated linear: " + an.replicated[n]
        if role:
            n.meta.setdefault("ptdp", {})["role"] = role
    return an


def _order(gm):
    idx = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: idx[n]

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
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import ancestors  # noqa: F401  (re-exported)

from .embedding_sum import find as _embedding_sum
# (the walk's op sets and helpers are re-exported: the rules and cp passes read them here)
from .walk import (_SPLITS, _VIEWS, ALONG_DIM, ATTENTION, LOSSES, NORMS,  # noqa: F401
                   REDUCTIONS, _gate_of_row, _reduced_dims, _split_dim, _walk)

aten = torch.ops.aten
GROUPED_MM = {aten._grouped_mm.default}
# a weight this large left replicated is warned about (tp_coverage); a lookup table this
# large is split by rows even when its lookup then needs an all-reduce of its own
LARGE_BYTES = 1 << 20
LARGE_FRACTION = 0.02


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
    # lookups of other tables split by rows, each all-reduced (Megatron's
    # VocabParallelEmbedding): tables of the user's own ids (RoCBert's glyph and pinyin
    # ids) or large ones
    side_embeddings: list = dataclasses.field(default_factory=list)


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
    sums = an.embedding_sum.side_tables if an.embedding_sum is not None else []
    total = sum(ph.meta["val"].numel() * ph.meta["val"].element_size()
                for ph in gm.graph.find_nodes(op="placeholder") if param_name(ph))
    for n in gm.graph.find_nodes(op="call_function", target=aten.embedding.default):
        w = n.args[0]
        if n in an.vocab_embeddings or n in sums or not param_name(w) or \
                len(w.users) != 1 or w.meta["val"].dim() != 2 or \
                (an.head is not None and w is an.head.weight):
            continue
        size = w.meta["val"].numel() * w.meta["val"].element_size()
        if _from_user_inputs(n.args[1]) or size >= LARGE_BYTES or size >= LARGE_FRACTION * total:
            an.side_embeddings.append(n)
    # a low-rank down-projection normalised right after (MLA's q_a / kv_a): split by rows
    # and its output all-gathered (Megatron's ColumnParallelLinear with gather_output);
    # what follows the gather sees the whole output, as if the linear were replicated
    for n, lin in linears.items():
        if n in an.replicated and n not in an.column and n not in an.row and \
                not lin.grouped and lin.out_features < lin.in_features and \
                _normed_next(n, walks[n][2]):
            an.gathered.add(n)
    # a gate on a row-parallel output (RWKV's sigmoid(receptance(x)) * value(k)): split too,
    # the row's partial sums reduce-scattered over the features, the product gathered (or
    # under SP sent back to the sequence split by an all-to-all)
    for n, lin in linears.items():
        if n in an.replicated and n not in an.gathered and not walks[n][1]:
            gate = _gate_of_row(lin, an.row, linears)
            if gate is not None:
                an.gates[n] = gate
                an.replicated[n] = f"a gate on {gate[1].name}'s output: split only where tp " \
                    "divides its features"
    for n in gm.graph.nodes:
        role = None
        if n in an.gates:
            role = f"column-parallel gate of {an.gates[n][1].name}'s output"
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
        elif n in an.side_embeddings:
            role = "embedding of its own ids (vocab-parallel: rows split, lookup all-reduced)"
        elif an.embedding_sum is not None and n in an.embedding_sum.side_tables:
            role = "position / type embedding (rows split, summed with the token embedding)"
        elif n in an.replicated:
            role = "replicated linear: " + an.replicated[n]
        if role:
            n.meta.setdefault("ptdp", {})["role"] = role
    return an


def _normed_next(n: fx.Node, barriers: list) -> bool:
    """Every barrier ``n``'s walk met is a norm statistic, or one of them is a statistic
    of ``n``'s own features (through casts and squares)."""
    if barriers and all(b.target in NORMS or b.target in (aten.mean.dim, aten.sum.dim_IntList)
                        for b in barriers):
        return True
    for b in barriers:
        if b.target not in NORMS and b.target not in (aten.mean.dim, aten.sum.dim_IntList):
            continue
        a = b.args[0]
        for _ in range(6):   # (a split of the output: MLA's [latent | rotary key])
            if a is n:
                return True
            if not isinstance(a, fx.Node) or a.op != "call_function" or \
                    len(a.all_input_nodes) != 1:
                break
            a = a.all_input_nodes[0]
    return False


def _order(gm):
    idx = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: idx[n]

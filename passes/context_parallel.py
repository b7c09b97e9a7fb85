"""Context parallelism (``cp``) as a graph rewrite: every activation is sharded along the
sequence for the whole model; only attention talks across the cp ranks.

What the per-rank graph does (found by dataflow, never by names):

- **Sequence sources.** Every cp rank receives the same full-length batch. Values that
  depend only on user inputs, buffers and constants (token ids, labels, position ids,
  rotary tables, causal / sliding / padding masks, ALiBi biases) are computed as the
  model computes them; where such a value first meets the model's computation (an
  embedding lookup, a product with a weight, the rotary product with q, a mask added to
  the scores, the labels of the loss) it is *localized*: indexed with this rank's token
  positions on the dimension that lines up with the sequence (``cp_ops.local_positions``:
  chunks r and 2·cp-1-r of 2·cp, the causal load balance). The slicing is pushed up
  through the element-wise / broadcasting ops that built it, so a causal mask is made
  directly as [local queries, all keys] from two position vectors, never [T, T].
- **Per-token ops run unchanged on the local tokens.** Placements ``Seq(dim, outer)``
  (dimension ``dim`` laid out as ``(outer, T, inner)``, this rank holding T/cp of the T
  positions) are propagated op by op with small rules (element-wise with broadcasting,
  views — ``[B, T, C]`` ↔ ``[B·T, C]`` ↔ ``[B, T, H, D]`` — transposes, norms and
  reductions over other dims, linears, embeddings, slices / splits / cats of other dims,
  the loss). View / expand constants are rewritten to local sizes.
- **Attention gets the whole K and V.** A matmul whose second operand is sequence-sharded
  on its contraction or output dimension (Q·Kᵀ, P·V) and ``scaled_dot_product_attention``
  all-gather that operand over cp (``ptdp::cp_gather``) into natural order; the gather is
  placed at the smallest value of the layout-only chain that leads to it (before a
  grouped-query ``repeat_kv`` expand), and the chain is replayed on the whole sequence.
  Masks keep their key axis whole and are localized on the query axis; ``is_causal``
  becomes an explicit mask ``q_pos >= k_pos`` from positions. The gathered K/V is not
  stored for backward: the recompute pass re-gathers it there (``cp_rules.regathered``,
  as it re-gathers SP's linear inputs), so a rank keeps 1/cp of the activations. Per
  layer a rank sends 3·2·(cp−1)/cp·B·T·h_kv·d elements: K and V all-gathered forward,
  re-gathered backward, dK and dV reduce-scattered (benchmarks/context_parallel.py
  measures both against these formulas).
- **Routed experts run on this rank's tokens** (``cp_moe_rules``). A mixture-of-experts
  block (Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, DeepSeek-V3, gpt-oss) sorts this rank's
  N/cp·k token slots by expert, gathers their rows, counts them per expert and runs its
  grouped GEMMs with this rank's offsets, then un-sorts with the inverse permutation (its
  ``arange(N·k)`` made ``arange(N·k/cp)``): this rank's rows of one device's result, with
  no collective (placements ``Bag``: this rank's rows in a sort's order, ``PerRank``: the
  per-rank expert counts, which may only become offsets). If such a block meets an op
  those rules cannot keep local (an auxiliary loss from the counts, index values used as
  data) the walk is redone without them and the block runs on the whole sequence below.
- **Ops without a rule run on the whole sequence** (``Walker.whole``): their inputs are
  all-gathered, the op is replicated, its result localized again; correct, warned
  (``WholeSequenceWarning``), refused under ``strict=True``.
- **Composition.** The pass runs before tensor parallelism, which then splits a model of
  T/cp tokens (heads over tp; under SP the local tokens over tp); pipeline stages pass
  sequence-sharded activations; gradients of the (replicated) weights are partial per cp
  rank and summed over dp × cp by the runtime's buckets; the loss weight counts only this
  rank's targets (``local_count_graph``), so the weighted sum over the "batch" group is
  the full batch's token mean.

Why all-gather and not ring attention: the gathered K/V of one layer is 2·B·h_kv·T·d
elements — with grouped-query attention (every family of the model zoo but GPT-2) far
less than the activations the layer keeps anyway; the gather is one collective per
tensor that NCCL and gloo run at bus bandwidth, its backward (the reduce-scatter of dK,
dV) is exact by construction and fuses into AOTAutograd's joint graph, and it works for
every attention form the compiler finds (SDPA, explicit softmax attention with any mask,
ALiBi, soft-capping, sliding windows) without re-deriving an online-softmax merge for
each. Ring attention's advantage — never holding the whole K/V — matters only when
2·T·h_kv·d per layer no longer fits, beyond the sizes this compiler targets
(Megatron-Core's all-gather CP, "a2a+p2p" hierarchies aside, makes the same choice for
GQA models).

Refusals (``ContextParallelError``, naming the op and the model's source line): an op
mixing tokens that no rule covers (a cumulative sum or a convolution along the sequence,
a slice or select of the sequence of an activation, a pooling over it), attention whose
queries are not sequence-sharded. The sequence length must divide into 2·cp chunks
(``InputShapeError`` with the padding needed).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ContextParallelError, InputShapeError
from ptdp_compiler.graph_utils import input_only
from ptdp_compiler.placement import CollectivePlan

from . import cp_ops
from .rules import context as _tp_rule  # noqa: F401  (tp's rule for cp_gather)
from .cp_rules import LOSS, RULES, SAME, Seq, is_pointwise
from . import cp_moe_rules
from .cp_moe_rules import BagError

aten = torch.ops.aten


class WholeSequenceWarning(UserWarning):
    """Some ops ran on the whole sequence (replicated over cp): see the message."""


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _shape(n) -> Optional[tuple]:
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


class Walker:
    """One walk over the captured graph, building this cp rank's graph."""

    def __init__(self, gm: fx.GraphModule, T: int, cp: int, rank: int, group_name: str,
                 bags: bool = True):
        self.gm, self.T, self.cp, self.rank, self.group_name = gm, T, cp, rank, group_name
        self.graph = fx.Graph()
        self.env: dict = {}             # captured node -> new node
        self.P: dict = {}               # new node -> Seq | None | LOSS | list of them
        self.inputs_only = input_only(gm)
        self.sources = self._sequence_sources()
        self._local: dict = {}          # (captured node, dim, outer) -> localized new node
        self._full: dict = {}           # captured node -> its whole-sequence new node
        self._positions: dict = {}
        self.gathers: list = []         # (new gather node, captured node it gathers, why)
        self.attention_gathers = 0
        self.wholes: list = []          # (captured node, why): ops run on the whole sequence
        self.strict = False
        self.localized: list = []       # (captured node, dim, outer)
        self.loss_target = None         # (captured target node, dim, outer) of a token loss
        self.loss_reduction = None
        self.override: dict = {}        # captured node -> (new node, placement), one op
        self.bags = bags                # rank-local expert rules (cp_moe_rules) on
        self.refs: dict = {}            # new node -> cp_moe_rules.Ref: its entries are indices
        self.bag_fallback = None        # why the walk with rank-local experts was abandoned

    # ---- lookups -------------------------------------------------------------------------
    def v(self, a):
        """The new value of captured ``a`` as this op reads it (a non-node: itself)."""
        if not isinstance(a, fx.Node):
            return a
        if a in self.override:
            return self.override[a][0]
        return self.env[a]

    def p(self, a):
        """Placement of captured ``a``'s value on this rank."""
        if not isinstance(a, fx.Node):
            return None
        if a in self.override:
            return self.override[a][1]
        return self.P.get(self.env[a])

    def fail(self, node, why: str):
        raise ContextParallelError(
            f"context parallelism cannot run node '{node.name}' ({node.target}) at "
            f"{source_line(node)} on sequence chunks: {why}. Use cp=1 for this model, or "
            "report the op")

    def _sequence_sources(self) -> set:
        """Input-only values that carry the sequence: derived from a user input or from a
        range (positions), not from buffers / constants alone (inverse frequencies)."""
        out = set()
        for n in self.gm.graph.nodes:
            if n not in self.inputs_only:
                continue
            if n.op == "placeholder":
                if n.meta.get("ptdp_input_kind", "user") == "user":
                    out.add(n)
            elif n.op == "call_function" and (
                    n.target in (aten.arange.default, aten.arange.start, aten.arange.start_step)
                    or any(a in out for a in n.all_input_nodes)):
                out.add(n)
        return out

    # ---- emitting ------------------------------------------------------------------------
    def emit(self, target, args, kwargs=None, pl=None, like=None):
        n = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        if like is not None:
            for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if k in like.meta:
                    n.meta[k] = like.meta[k]
        self.P[n] = pl
        return n

    def copy(self, node, pl=None, args=None, kwargs=None):
        """``node`` with its inputs mapped (``args`` / ``kwargs``: replaced ones)."""
        n = self.graph.node_copy(node, self.v)
        if args is not None:
            n.args = tuple(args)
        if kwargs is not None:
            n.kwargs = dict(kwargs)
        self.P[n] = pl
        return n

    def positions(self, device, like=None):
        """This rank's token positions (natural order of the sequence), an int64 vector."""
        key = str(device)
        if key not in self._positions:
            c = self.T // (2 * self.cp)
            r = self.rank
            a = self.emit(aten.arange.start, (r * c, (r + 1) * c),
                          dict(dtype=torch.int64, device=device), like=like)
            b = self.emit(aten.arange.start, ((2 * self.cp - 1 - r) * c, (2 * self.cp - r) * c),
                          dict(dtype=torch.int64, device=device), like=like)
            self._positions[key] = self.emit(aten.cat.default, ([a, b], 0), like=like)
        return self._positions[key]

    # ---- localizing a whole-sequence value -------------------------------------------------
    def localize(self, a, dim: int, outer: int, like=None):
        """This rank's part of captured ``a`` (whole along the sequence) on ``dim`` laid out
        as (outer, T, inner). Input-only values are localized at their sources (pushed up
        through element-wise and broadcasting ops)."""
        shape = _shape(a)
        dim = dim % len(shape)
        key = (a, dim, outer)
        if key in self._local:
            return self._local[key]
        n = None
        if a in self.inputs_only and outer == 1 and shape[dim] == self.T:
            n = self._pushed(a, dim, like)
        if n is None:
            n = self._index(self.v(a), shape, dim, outer, _val(a).device, like)
            self.localized.append((a, dim, outer))
        self._local[key] = n
        self.P[n] = None
        return n

    def _index(self, x, shape, dim, outer, device, like):
        idx = self.positions(device, like)
        n = shape[dim]
        inner = n // (outer * self.T)
        if outer == 1 and inner == 1:
            return self.emit(aten.index_select.default, (x, dim, idx), like=like)
        s = list(shape)
        y = self.emit(aten.reshape.default, (x, s[:dim] + [outer, self.T, inner] + s[dim + 1:]),
                      like=like)
        y = self.emit(aten.index_select.default, (y, dim + 1, idx), like=like)
        return self.emit(aten.reshape.default, (y, s[:dim] + [n // self.cp] + s[dim + 1:]),
                         like=like)

    def _pushed(self, a, dim, like):
        """``a`` (input-only, whole sequence T on ``dim``) made from this rank's positions
        where its producers allow: a range of T becomes the positions; element-wise ops,
        unsqueeze, expand and casts localize their operands instead. None: index ``a``."""
        if a.op != "call_function":
            return None
        t = a.target
        shape = _shape(a)
        if t is aten.arange.default and len(a.args) == 1 and a.args[0] == self.T and \
                _val(a).dtype == torch.int64:
            return self.positions(_val(a).device, like)
        if t in (aten.arange.start, aten.arange.start_step) and a.args[0] == 0 and \
                a.args[1] == self.T and (len(a.args) < 3 or a.args[2] == 1) and \
                _val(a).dtype == torch.int64:
            return self.positions(_val(a).device, like)
        if t is aten.unsqueeze.default:
            d = a.args[1] % len(shape)
            if d == dim:
                return None
            src = self.localize(a.args[0], dim - (d < dim), 1, like)
            return self.emit(t, (src, a.args[1]), like=a)
        if t is aten.expand.default:
            src = a.args[0]
            k = len(_shape(src))
            j = dim - (len(shape) - k)
            sizes = list(a.args[1])
            sizes[dim] = shape[dim] // self.cp
            if j >= 0 and _shape(src)[j] == self.T:
                return self.emit(t, (self.localize(src, j, 1, like), sizes), like=a)
            return self.emit(t, (self.v(src), sizes), like=a)
        if t in SAME and len(a.all_input_nodes) == 1:
            src = a.args[0]
            args = (self.localize(src, dim, 1, like),) + tuple(a.args[1:])
            return self.emit(t, args, a.kwargs, like=a)
        if is_pointwise(t):
            m = len(shape)

            def loc(x):
                if not isinstance(x, fx.Node):
                    return x
                s = _shape(x)
                if s is None:
                    return self.v(x)
                j = dim - (m - len(s))
                if j < 0 or s[j] == 1:
                    return self.v(x)
                return self.localize(x, j, 1, like)
            args = tuple(fx.node.map_aggregate(a.args, loc))
            kwargs = dict(fx.node.map_aggregate(dict(a.kwargs), loc))
            return self.emit(t, args, kwargs, like=a)
        return None

    # ---- the whole sequence for attention ----------------------------------------------------
    def full(self, a, why: str, attention: bool = True):
        """Captured ``a`` (sequence-sharded) whole, in natural order: all-gathered at the
        smallest value of the layout-only chain leading to it, the chain replayed.
        ``attention``: keys / values (else a whole-sequence op's input)."""
        if a in self._full:
            return self._full[a]
        from .cp_rules import CHAIN
        chain = [a]
        n = a
        while n.op == "call_function" and n.target in CHAIN:
            acts = [x for x in n.all_input_nodes if self.p(x) is not None]
            others = [x for x in n.all_input_nodes if x not in acts]
            if len(acts) != 1 or any(_val(x) is None or _val(x).numel() for x in others) \
                    or not isinstance(self.p(acts[0]), Seq):
                break
            n = acts[0]
            chain.append(n)
        best = min(range(len(chain)), key=lambda i: (_val(chain[i]).numel(), i))
        g = chain[best]
        pl = self.p(g)
        gathered = self.emit(torch.ops.ptdp.cp_gather.default,
                             (self.v(g), pl.dim, pl.outer, self.group_name, self.cp), like=g)
        self.gathers.append((gathered, g, why))
        self.attention_gathers += attention
        self._full[g] = gathered
        for node in reversed(chain[:best]):
            self._full[node] = self.graph.node_copy(
                node, lambda x: self._full[x] if x in self._full else self.v(x))
            self.P[self._full[node]] = None
        return self._full[a]

    # ---- the walk ------------------------------------------------------------------------
    def run(self) -> fx.Graph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                n = self.graph.placeholder(node.name)
                n.meta.update(node.meta)
                self.env[node], self.P[n] = n, None
            elif node.op == "get_attr":
                n = self.graph.get_attr(node.target)
                n.meta.update(node.meta)
                self.env[node], self.P[n] = n, None
            elif node.op == "output":
                out = self.graph.output(fx.node.map_arg(node.args[0], self.v))
                for a in node.all_input_nodes:
                    if cp_moe_rules.bagish(self.p(a)) or self.refs.get(self.v(a)) is not None:
                        raise BagError("the model's output holds rank-local expert rows")
                    if isinstance(self.p(a), Seq):
                        self.fail(node, "the model's output is still split along the sequence")
                out.meta.update(node.meta)
            else:
                self.override = {}
                self.env[node] = self.call(node)
        return self.graph

    def call(self, node):
        if node in self.inputs_only:
            return self.copy(node)
        tensors = [a for a in node.all_input_nodes]
        if not any(self.p(a) is not None for a in tensors):
            seeds = [a for a in tensors if a in self.sources and self._seq_dim(a) is not None]
            if not seeds:
                return self.copy(node)
            for a in seeds:
                d = self._seq_dim(a)
                self.override[a] = (self.localize(a, d, 1, node), Seq(d))
        if self.bags:
            new = cp_moe_rules.dispatch(self, node)
            if new is not None:
                return new
        if node.target is aten._assert_tensor_metadata.default and \
                ("size" in node.kwargs or len(node.args) > 1):
            return self.emit(aten.alias.default, (self.v(node.args[0]),), like=node)
        rule = RULES.get(node.target)
        if rule is None and is_pointwise(node.target):
            rule = RULES["pointwise"]
        if rule is None:
            pls = ", ".join(f"{a.name}: {self.p(a)}" for a in tensors)
            why = (f"no context-parallel rule for this op with sequence-sharded inputs "
                   f"({pls}); it may mix tokens across the sequence")
            if self.strict:
                self.fail(node, why)
            return self.whole(node, why)
        try:
            return rule(self, node)
        except ContextParallelError as e:
            if self.strict or isinstance(e, BagError):
                raise
            return self.whole(node, str(e))

    def whole(self, node, why: str):
        """An op that mixes tokens in a way no rule covers (a cumulative sum; a
        mixture-of-experts block whose rank-local rules gave up) runs on the whole sequence, as
        sequence parallelism runs Megatron's MoE: its sequence-split inputs are all-gathered
        (``cp_gather``: the gradients of the replicated computation, partial per rank
        because each rank's result is later cut to its own tokens, are reduce-scattered
        back), the op is replicated, and its result is localized where it meets the
        sequence split again. Recorded (``wholes``), warned about; ``strict=True`` refuses."""
        def whole_of(x):
            p = self.p(x) if isinstance(x, fx.Node) else None
            if cp_moe_rules.bagish(p) or isinstance(x, fx.Node) and \
                    self.refs.get(self.v(x)) is not None:
                raise BagError(f"{node.name} ({node.target}) at {source_line(node)} reads "
                               f"rank-local expert rows and has no rule ({why})")
            if p == LOSS or isinstance(p, list) and any(q is not None for q in p):
                self.fail(node, why)
            if isinstance(p, Seq):
                return self.full(x, f"whole sequence for {node.name}", attention=False)
            return self.v(x)
        n = self.graph.node_copy(node, whole_of)
        val = node.meta.get("val")
        self.P[n] = [None] * len(val) if isinstance(val, (tuple, list)) else None
        self.wholes.append((node, why))
        return n

    def _seq_dim(self, a) -> Optional[int]:
        """Which dimension of a sequence source is the sequence: [B, T, ...] -> 1, [T, ...]
        -> 0 (the batch leads every user input; a position vector has no batch)."""
        s = _shape(a)
        if not s:
            return None
        if len(s) >= 2 and s[1] == self.T:
            return 1
        if s[0] == self.T:
            return 0
        return None


# ---- the pass --------------------------------------------------------------------------------
def sequence_length(gm: fx.GraphModule, cp: int) -> int:
    """T: dimension 1 of the first user input with two or more dimensions ([B, T, ...])."""
    for n in gm.graph.find_nodes(op="placeholder"):
        if n.meta.get("ptdp_input_kind") == "user":
            s = _shape(n)
            if s is not None and len(s) >= 2:
                T = s[1]
                if T % (2 * cp):
                    need = -T % (2 * cp)
                    raise InputShapeError(
                        f"cp={cp} splits the sequence into 2·cp = {2 * cp} chunks (causal load "
                        f"balance), but the sequence length is {T}: pad the inputs by {need} "
                        f"token(s) to {T + need} (labels with the ignore index), or choose a cp "
                        f"with {T} divisible by 2·cp")
                return T
    raise ContextParallelError("context parallelism found no user input with a sequence "
                               "dimension ([batch, sequence, ...])")


def context_parallel(gm: fx.GraphModule, cp: int, rank: int, group_name: str,
                     strict: bool = False):
    T = sequence_length(gm, cp)
    w = Walker(gm, T, cp, rank, group_name)
    w.strict = strict
    try:
        g = w.run()
    except BagError as e:
        # a routed-expert block met an op its rank-local rules cannot keep local: walk
        # again without them (its sort runs on the all-gathered whole sequence, warned)
        w = Walker(gm, T, cp, rank, group_name, bags=False)
        w.strict, w.bag_fallback = strict, str(e)
        g = w.run()
    g.eliminate_dead_code()
    new = fx.GraphModule(gm, g)
    if not w.attention_gathers:
        whole = f" ({len(w.wholes)} op(s) ran on the whole sequence: " + ", ".join(
            f"{n.name} ({n.target})" for n, _ in w.wholes[:4]) + ")" if w.wholes else ""
        raise ContextParallelError(
            "context parallelism found no attention (no matmul or "
            "scaled_dot_product_attention reading keys / values of other tokens): the model "
            f"mixes no tokens, or does so in an op the compiler does not know{whole}; use cp=1")
    _refresh_values(new)
    return new, w, T


def _refresh_values(gm: fx.GraphModule):
    """Re-run the graph with FakeTensor at the local shapes (fills node.meta['val'])."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        v = ph.meta.get("val")
        inputs.append(mode.from_tensor(torch.empty_strided(
            tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device="meta"))
            if isinstance(v, torch.Tensor) else v)
    try:
        with mode:
            inputs = [torch.empty_like(x, device=ph.meta["val"].device)
                      if isinstance(x, torch.Tensor) else x
                      for x, ph in zip(inputs, gm.graph.find_nodes(op="placeholder"))]
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as e:
        raise ContextParallelError(f"the context-parallel graph does not type-check at local "
                                   f"shapes: {type(e).__name__}: {e}") from e


def local_count_graph(gm: fx.GraphModule, lw, w: Walker):
    """The loss weight's count under cp: the targets of this rank's tokens only (the sum
    over the cp ranks is the sequence's count)."""
    if lw.kind == "numel":
        lw.numel = lw.numel // w.cp
        return lw
    if lw.kind != "target_count" or w.loss_target is None:
        return lw
    from ptdp_compiler.graph_utils import ancestors
    target, dim, outer = w.loss_target
    cone = ancestors([target])
    g = fx.Graph()
    env = {}
    for p in gm.graph.find_nodes(op="placeholder"):
        if p.meta.get("ptdp_input_kind") == "user":
            env[p] = g.placeholder(p.name)
    for n in gm.graph.nodes:
        if n in cone and n.op == "call_function":
            env[n] = g.node_copy(n, lambda a: env[a])
    x = env[target]
    shape = _shape(target)
    c = w.T // (2 * w.cp)
    r = w.rank
    dev = _val(target).device
    a = g.call_function(aten.arange.start, (r * c, (r + 1) * c), dict(dtype=torch.int64,
                                                                      device=dev))
    b = g.call_function(aten.arange.start, ((2 * w.cp - 1 - r) * c, (2 * w.cp - r) * c),
                        dict(dtype=torch.int64, device=dev))
    idx = g.call_function(aten.cat.default, ([a, b], 0))
    s = list(shape)
    inner = s[dim] // (outer * w.T)
    y = g.call_function(aten.reshape.default, (x, s[:dim] + [outer, w.T, inner] + s[dim + 1:]))
    y = g.call_function(aten.index_select.default, (y, dim + 1, idx))
    ne = g.call_function(aten.ne.Scalar, (y, lw.ignore_index))
    g.output(g.call_function(aten.sum.default, (ne,)))
    lw.count_graph = fx.GraphModule(gm, g)
    return lw


def context_parallel_pass(gm: fx.GraphModule, cfg, coords, plan, lw):
    """The captured graph -> this cp rank's graph, and the loss weight counting this
    rank's targets. Runs before tensor parallelism, which then splits a model of T/cp
    tokens (sequence parallelism splits the local tokens further)."""
    cp = cfg.cp
    group = coords.group("cp") if coords is not None else None
    group_name = group.group_name if group is not None else "cp"
    rank = getattr(coords, "cp_rank", 0)
    new, w, T = context_parallel(gm, cp, rank, group_name, getattr(cfg, "strict", False))
    lw = local_count_graph(gm, lw, w)
    if w.wholes:
        ops = sorted({str(n.target) for n, _ in w.wholes})
        msg = (f"cp={cp}: {len(w.wholes)} op(s) that mix tokens in a way context parallelism "
               f"has no rule for ({', '.join(ops)}; first: {w.wholes[0][0].name} at "
               f"{source_line(w.wholes[0][0])}) run on the all-gathered whole sequence, "
               "replicated on every cp rank (correct, but neither their activations nor their "
               "compute shrink with cp); strict=True refuses instead")
        if w.bag_fallback:
            msg += (f"; the routed experts were not kept on this rank's tokens: "
                    f"{w.bag_fallback}")
        plan.pass_log.append(("context_parallel", msg))
        if getattr(coords, "rank", 0) == 0:
            warnings.warn(msg, WholeSequenceWarning, stacklevel=2)
    for n, g, why in w.gathers:
        v = n.meta.get("val")
        nbytes = v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0
        plan.collectives.append(CollectivePlan(
            "all_gather", "cp", f"{n.name} ({why})", int(nbytes * (cp - 1) / cp),
            f"{list(v.shape) if v is not None else '?'} {getattr(v, 'dtype', '')}; backward: "
            "re-gathered (the same bytes again), then the gradient reduce-scattered (the same "
            "bytes)"))
    if lw.kind == "target_count":
        plan.loss_weighting += "; under cp each rank counts the targets of its own chunks"
    plan.pass_log.append(("context_parallel", (
        f"cp={cp}: sequence of {T} in {2 * cp} chunks, this rank holds positions of chunks "
        f"{rank} and {2 * cp - 1 - rank}; {w.attention_gathers} K/V all-gathers; "
        f"{len(w.localized)} whole-sequence values indexed to local positions")))
    plan.cp = dict(T=T, cp=cp, rank=rank, positions=cp_ops.local_positions(T, cp, rank),
                   gathers=[(n.name, g.name) for n, g, _ in w.gathers])
    return new, lw


__all__ = ["Seq", "LOSS", "WholeSequenceWarning", "Walker", "context_parallel", "context_parallel_pass",
           "sequence_length"]

"""Tensor parallelism as a graph rewrite (Shoeybi et al. 2019; sequence parallelism after
Korthikanti et al. 2022).

The pass seeds placements from the analysis (column/row-parallel linears, the
vocab-parallel LM head and embedding; ``tp_seeds``), then walks the graph once, op by op.
Each op with a sharded input is handed to its rule in the registry ``passes/rules``,
which checks the input placements it accepts, emits the per-rank op(s) and says the
placement of the result. An op without a rule is a ``ShardingError`` naming the op, its
placements and the model's source line: nothing is replicated silently.

Placements: ``None`` is replicated; ``Shard(dim, outer)`` splits ``dim`` laid out as
``(outer, t, n/(outer·t))`` (``sharding.py``). Partial sums never leave the op that makes
them: a row-parallel matmul is followed at once by g (all-reduce) or, under sequence
parallelism, a reduce-scatter. One exception: the token embedding's partial lookup is
first summed with the position / type embeddings added to it (``embedding_sum.py``), so
their row-split tables cost no collective of their own.

Megatron's f and g:

- a replicated value that requires grad and meets a sharded computation sees only part
  of its gradient on each rank: it is wrapped in f (identity forward, all-reduce
  backward). Parameters of one layer share one ``ptdp::tp_f_bucket``, whose backward is
  a single all-reduce of all their gradients.
- a row-parallel linear's partial sums go through g (all-reduce forward).

Sequence parallelism (``sequence_parallel=True``) is a mode of the same walk: the
residual stream is sharded along the sequence instead of replicated.

- a row-parallel linear (and the vocab-parallel embedding) reduce-scatters its partial
  sums along the sequence (``ptdp::sp_scatter``) instead of all-reducing them; its
  bias joins the reduce-scatter (``ptdp::sp_scatter_bias``), whose backward row-sums
  the gathered output gradient, so the bias needs no gradient all-reduce;
- a column-parallel linear (and the LM head) all-gathers its input along the sequence
  (``ptdp::sp_gather``, whose backward is the reduce-scatter that replaces f);
- norms, dropout and residual adds run on the local sequence shard; replicated operands
  with a sequence axis (position embeddings) are sliced to the rank's part;
- parameters used on the sequence shard (norm weights, biases) see only their shard's
  gradient and are wrapped in f (one bucket per layer).

The sequence dimension is found from dataflow: the second-to-last dimension of the token
embedding's output ``[B, T, C]``, carried through views by the same rank-factor rule as
every other shard (``[B*T, C]`` becomes ``Shard(0, blocks=B)``). Dropout of a sharded
tensor draws this tp rank's own random numbers (``ptdp::tp_rank_dropout_mask``), as
Megatron's RNG tracker does; dropout of a replicated tensor draws the same numbers on
every tp rank.

After the walk the per-rank graph is re-run with FakeTensor at local shapes.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

import ptdp_compiler.collectives  # noqa: F401  (registers the ptdp:: ops)
import ptdp_compiler.ops  # noqa: F401  (registers ptdp::tp_rank_dropout_mask)
from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ShardingError
from ptdp_compiler.placement import CollectivePlan, Shard

from . import analyze as _an
from . import tp_coverage, tp_gather_weights, tp_sliced_params
from .rules import RULES, KeepReplicated, PlaceBuffer, Refine, buffer_key, find_rule
from .rules.linear import gated_product
from .sharding import PaddedShard, PieceShard, local_shape, moved, view_rule
from .tp_fake_check import fake_check
from .tp_seeds import buckets_by_layer, initial_seeds, keep_replicated, refine_seeds

aten = torch.ops.aten
ptdp_ops = torch.ops.ptdp


def value(n):
    """The fake value a captured node computes (full shapes), or None."""
    return n.meta.get("val") if isinstance(n, fx.Node) else None


class Rewriter:
    """One walk over the captured graph, building this rank's graph.

    ``placement[new_node]`` is the tp placement of a value of the new graph (a list for
    ops returning several tensors); ``needs_grad[new_node]`` whether it requires grad."""

    def __init__(self, gm, analysis: _an.Analysis, seeds: dict, t: int, rank: int,
                 group_name: str, sp: bool, requires_grad: dict,
                 bucket: Optional[dict] = None):
        self.gm, self.analysis, self.seeds = gm, analysis, seeds
        self.t, self.rank, self.group_name, self.sp = t, rank, group_name, sp
        self.requires_grad = requires_grad
        self.graph = fx.Graph()
        self.env, self.placement, self.needs_grad = {}, {}, {}
        self.full_shape = {}              # new node -> the captured value's full shape
        self.grad_summed = set()          # new nodes whose gradient is already complete
        self._f, self._gathered = {}, {}
        self.collectives = []             # (kind, new node, note, captured node)
        self.rewrites = []                # (node name, old shape, new shape)
        self.grad_tp_params = set()
        # {parameter: bucket key}: the parameters of one layer share one f op, emitted at the
        # first use of any of them (so the op never crosses a layer/pipeline-stage boundary)
        self.bucket = dict(bucket or {})
        self.params_with_own_f = []
        self.localized = []               # (value, dim, placement there, captured op)
        self.sliced_params = {}           # what tp_sliced_params learned from the walk before
        self.dropouts = {"sharded": 0, "replicated": 0}
        self.sequence_gathered = []       # ops run on the whole sequence under SP
        self.sequence_split, self.scattered = set(), set()

    # ---- lookups -------------------------------------------------------------------------
    def new(self, old):
        """The new graph's node for captured node ``old``."""
        return self.env[old]

    def placement_of(self, old):
        """Placement of captured node ``old``'s value on this rank (None: replicated)."""
        return self.placement.get(self.env[old]) if isinstance(old, fx.Node) else None

    def fail(self, node, why: str, cls=ShardingError):
        raise cls(f"tensor parallelism cannot shard node '{node.name}' ({node.target}) at "
                  f"{source_line(node)}: {why}")

    # ---- emitting ------------------------------------------------------------------------
    def emit(self, target, args, kwargs=None, pl=None, rg=None, like: Optional[fx.Node] = None):
        """Append ``target(*args, **kwargs)`` with placement ``pl``; ``rg``: requires grad
        (default: any input does); ``like``: the captured node it stands for (source info)."""
        n = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        if like is not None:
            for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if k in like.meta:
                    n.meta[k] = like.meta[k]
        self.placement[n] = pl
        if rg is None:
            rg = any(self.needs_grad.get(a, False) for a in n.all_input_nodes)
        self.needs_grad[n] = rg
        return n

    def copy(self, node, pl=None):
        """The captured op unchanged, its result placed ``pl``."""
        n = self.graph.node_copy(node, lambda x: self.env[x])
        self.placement[n] = pl
        val = value(node)
        self.needs_grad[n] = any(self.needs_grad.get(a, False) for a in n.all_input_nodes) and \
            (not isinstance(val, torch.Tensor) or val.is_floating_point())
        if node.target in (aten.detach.default, aten.detach_.default,
                           aten.lift_fresh_copy.default):
            self.needs_grad[n] = False
        return n

    def f(self, v):
        """v (replicated) as consumed by a sharded computation: gradient summed over tp."""
        if not self.needs_grad.get(v, False) or v in self.grad_summed:
            return v
        name = v.meta.get("ptdp_input_name") if v.op == "placeholder" else None
        if v not in self._f and name in self.bucket:
            self.emit_bucket(self.bucket[name])
        if v not in self._f:
            kind = "param" if v.op == "placeholder" else "act"
            self._f[v] = self.emit(ptdp_ops.tp_f.default, (v, self.group_name, self.t, kind),
                                   pl=None, rg=True)
            self.grad_summed.add(self._f[v])
            self.collectives.append(("f", self._f[v], f"f on {v.name}", None))
            if v.op == "placeholder":
                self.grad_tp_params.add(name)
                self.params_with_own_f.append(name)
        return self._f[v]

    def emit_bucket(self, key):
        """f for every parameter of bucket ``key`` as one op: its backward is a single
        all-reduce of all their gradients (not one per parameter)."""
        names = {n for n, k in self.bucket.items() if k == key}
        phs = [v for v in self.graph.nodes if v.op == "placeholder" and
               v.meta.get("ptdp_input_name") in names and
               v.meta.get("ptdp_input_kind") == "param"]
        if not phs:
            return
        b = self.emit(ptdp_ops.tp_f_bucket.default, (phs, self.group_name, self.t), pl=None,
                      rg=True)
        self.collectives.append(("f_bucket", b, f"f on {len(phs)} parameters", None))
        for i, v in enumerate(phs):
            item = self.emit(operator.getitem, (b, i), pl=None, rg=True)
            self._f[v] = item
            self.grad_summed.add(item)
            self.grad_tp_params.add(v.meta.get("ptdp_input_name"))

    def all_reduce(self, v, node, what: str):
        """Sum of ``v`` over tp (g): a statistic of a sharded dimension (a norm's mean
        square) that every rank then uses on its own shard. Like every replicated value
        its gradient is complete (f wherever it meets a sharded value), so the backward
        is the identity."""
        s = self.emit(ptdp_ops.tp_g.default, (v, self.group_name, self.t, "act"), pl=None,
                      like=node)
        self.collectives.append(("all_reduce", s, what, node))
        return s

    def gathered(self, v, node, block_input: bool = True):
        """A sharded value made whole (all-gather; its backward reduce-scatters the partial
        gradients): a sequence shard under SP, or heads split inside each head at the
        attention (``rules.attention.heads_of``). ``block_input``: it is a column-parallel
        linear's input, whose layout the block's row-parallel end reduce-scatters back to."""
        p = self.placement[v]
        if p is None:
            return v
        if isinstance(p, PieceShard):
            self.fail(node, f"an all-gather of a value split by pieces ({p})")
        if v not in self._gathered:
            n = self.emit(ptdp_ops.sp_gather.default, (v, p.dim, p.outer, self.group_name,
                                                      self.t), pl=None, like=node)
            self.grad_summed.add(n)
            self._gathered[v] = n
            self.collectives.append(("all_gather", n, f"before {node.name}", node))
        if block_input:
            # the layout the block's input was sequence-sharded in: its row-parallel end
            # reduce-scatters back to the same layout (MHA works on [T, B, E])
            self.last_gathered = (p, self.full_shape.get(v))
        return self._gathered[v]

    def reduce_partial(self, v, node, bias=None, scatter: bool = True):
        """Partial sums of ``node``'s full shape -> g, or reduce-scatter along the sequence
        (SP, unless ``scatter`` is False). ``bias`` (SP only): a replicated bias added to
        the shard by the reduce-scatter op, which takes its gradient from the gathered
        output gradient (no f needed)."""
        if self.sp and scatter:
            seq = self.block_seq_placement(tuple(value(node).shape), node)
            if bias is None:
                op, args = ptdp_ops.sp_scatter.default, (v,)
            else:
                op, args = ptdp_ops.sp_scatter_bias.default, (v, bias)
            n = self.emit(op, (*args, seq.dim, seq.outer, self.group_name, self.t), pl=seq,
                          like=node)
            self.scattered.add(n)
            self.collectives.append(("reduce_scatter", n, f"after {node.name}" +
                                     (" (+ bias)" if bias is not None else ""), node))
        else:
            n = self.emit(ptdp_ops.tp_g.default, (v, self.group_name, self.t, "act"), pl=None,
                          like=node)
            self.collectives.append(("all_reduce", n, f"after {node.name}", node))
        return n

    def block_seq_placement(self, full_shape, node) -> Shard:
        """Where a block's output keeps the sequence split: the layout of the input its
        column-parallel linears gathered, carried to ``full_shape``; else the embedding's."""
        p, shape = getattr(self, "last_gathered", (None, None))
        if p is not None and shape is not None:
            q = view_rule(shape, p, full_shape, self.t)
            if q is not None:
                return q
            if len(shape) == len(full_shape) and p.dim < len(shape) - 1 and \
                    tuple(shape[:-1]) == tuple(full_shape[:-1]):
                return p   # another width (a low-rank projection): the same token dims
        return self.seq_placement(full_shape, node)

    def seq_placement(self, full_shape, node) -> Shard:
        e = self.analysis.embed_out_shape
        if e is None:
            self.fail(node, "sequence parallelism needs the token embedding to find the "
                            "sequence dimension; none was found")
        p = view_rule(e, Shard(len(e) - 2), full_shape, self.t)
        if p is None and len(e) == len(full_shape) and tuple(e[:-1]) == tuple(full_shape[:-1]):
            p = Shard(len(e) - 2)   # another width, the same token dims
        if p is None:
            self.fail(node, f"cannot place the sequence dimension of {list(e)} in shape "
                            f"{list(full_shape)} for sequence parallelism")
        return p

    def localize(self, v, full_shape, out_pl: Shard, out_ndim: int, node):
        """A replicated operand (full shape ``full_shape``) of an op whose result is placed
        ``out_pl``: this rank's part of it, broadcasting like the op does."""
        k = len(full_shape)
        j = out_pl.dim - (out_ndim - k)
        if j < 0 or full_shape[j] == 1:
            return self.f(v)
        if isinstance(out_pl, PaddedShard):
            self.fail(node, "a replicated operand meets the padded vocabulary dimension")
        n, o, t = full_shape[j], out_pl.outer, self.t
        self.localized.append((v, j, moved(out_pl, j), node))
        v = self.f(v)
        if isinstance(out_pl, PieceShard):   # this rank's slice of every piece, in order
            parts = [self.emit(aten.slice.Tensor, (v, j, f, f + length), pl=None, like=node)
                     for _, f, length in out_pl.runs(n, t, self.rank)]
            return self.emit(aten.cat.default, (parts, j), pl=None, like=node)
        if o == 1:
            lo = self.rank * (n // t)
            return self.emit(aten.slice.Tensor, (v, j, lo, lo + n // t), pl=None, like=node)
        # block layout (outer, t, inner): keep index `rank` of the middle factor
        shape = list(full_shape)
        blocks = self.emit(aten.reshape.default, (v, shape[:j] + [o, t, n // (o * t)] +
                                               shape[j + 1:]), pl=None, like=node)
        mine = self.emit(aten.select.int, (blocks, j + 1, self.rank), pl=None, like=node)
        return self.emit(aten.reshape.default, (mine, shape[:j] + [n // t] + shape[j + 1:]),
                         pl=None, like=node)

    def shape_rewrite(self, node, old_shape, new_shape):
        if list(old_shape) != list(new_shape):
            self.rewrites.append((node.name, tuple(old_shape), tuple(new_shape)))

    # ---- the walk ------------------------------------------------------------------------
    def run(self) -> fx.Graph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                n = self.graph.placeholder(node.name)
                n.meta.update({k: v for k, v in node.meta.items() if k != "val"})
                v = node.meta.get("val")
                if isinstance(v, torch.Tensor):
                    n.meta["ptdp_full_val"] = torch.empty(v.shape, dtype=v.dtype)
                name = _an.param_name(node)
                self.placement[n] = self.seeds.get(name) if name else None
                self.needs_grad[n] = bool(name and self.requires_grad.get(name, False))
                self.env[node] = n
            elif node.op == "get_attr":
                n = self.graph.get_attr(node.target)
                n.meta.update(node.meta)
                self.placement[n], self.needs_grad[n] = None, False
                self.env[node] = n
            elif node.op == "output":
                out = self.graph.output(fx.node.map_arg(node.args[0], lambda x: self.env[x]))
                if any(self.placement.get(a) is not None for a in out.all_input_nodes):
                    self.fail(node, "the model's output is still sharded")
            else:
                self.env[node] = new = self.call(node)
                self.note_sequence_split(node, new)
                if isinstance(value(node), torch.Tensor):
                    self.full_shape[new] = tuple(value(node).shape)
        return self.graph

    def call(self, node):
        es = self.analysis.embedding_sum
        if es is not None and node in es.nodes:
            return RULES["embedding_sum"](self, node)
        lin = self.analysis.linears.get(node)
        if lin is not None:
            if lin.out_at is not None:   # an einsum with a parameter: its own rule
                return RULES[aten.einsum.default](self, node)
            return RULES["linear"](self, node, lin)
        placements = [self.placement_of(i) for i in node.all_input_nodes]
        if node in self.analysis.block_attention:
            return RULES[node.target](self, node)
        if all(p is None for p in placements):
            buffer = self.seeds.get(buffer_key(node.name))
            if buffer is not None:   # a fresh buffer filled with split values
                size = list(node.args[0])
                local = local_shape(size, buffer, self.t)
                self.shape_rewrite(node, size, local)
                return self.emit(node.target, (local, *node.args[1:]), node.kwargs,
                                 pl=buffer, like=node)
            if node.target is aten.dropout.default:
                self.dropouts["replicated"] += 1   # shared stream: same mask on every tp rank
            return self.copy(node)
        if node.target is aten._assert_tensor_metadata.default:
            return None                            # full-shape metadata check: dropped
        rule = find_rule(node.target)
        try:
            if rule is None:
                self.fail(node, f"no sharding rule for {node.target} with sharded inputs "
                                f"({', '.join(str(p) for p in placements)}); it is not "
                                "local on the sharded dimension as far as the compiler knows")
            new = rule(self, node)
            return gated_product(self, node, new) if self.analysis.gates else new
        except ShardingError:
            if not self.sequence_sharded_only(node):
                raise
        return self.on_whole_sequence(node)

    def sequence_sharded_only(self, node) -> bool:
        """Under SP: every sharded input of ``node`` is split along the sequence (derived
        from a reduce-scatter by ops that kept the token split, not from a weight's)."""
        sharded = [a for a in node.all_input_nodes if self.placement_of(a) is not None]
        return self.sp and bool(sharded) and all(a in self.sequence_split for a in sharded)

    def note_sequence_split(self, node, new):
        """Track which captured values are split along the sequence (for the fallback
        above): a reduce-scatter's result, and what ops make of such values alone."""
        if new is None or self.placement.get(new) is None:
            return
        sharded = [a for a in node.all_input_nodes if self.placement_of(a) is not None]
        if new in self.scattered or (sharded and all(a in self.sequence_split
                                                     for a in sharded)):
            self.sequence_split.add(node)

    def on_whole_sequence(self, node):
        """An op that mixes tokens across the sequence (a mixture-of-experts block sorting
        and gathering tokens): its sequence-sharded inputs are all-gathered and it runs
        replicated, as Megatron's MoE all-gathers under SP. Recorded for explain."""
        def whole(a):
            v = self.env[a]
            p = self.placement.get(v)
            if p is None:
                return v
            if ("whole", v) not in self._gathered:
                n = self.emit(ptdp_ops.sp_gather_whole.default,
                              (v, p.dim, p.outer, self.group_name, self.t, self.rank),
                              pl=None, like=node)
                self._gathered[("whole", v)] = n
                self.collectives.append(("all_gather", n, f"whole sequence for {node.name}",
                                         node))
            return self._gathered[("whole", v)]
        n = self.graph.node_copy(node, whole)
        self.placement[n] = None
        self.needs_grad[n] = any(self.needs_grad.get(a, False) for a in n.all_input_nodes)
        self.sequence_gathered.append(node)
        return n


def tensor_parallel(gm: fx.GraphModule, analysis: _an.Analysis, t: int, rank: int,
                    group_name: str, sp: bool, requires_grad: dict):
    """Returns (new GraphModule, seeds {param: Shard}, rewriter).

    The walk runs again when it learns something: a fused projection's split (the weight
    is re-seeded as block-sharded, and so are its namesakes in the other layers), or the
    replicated parameters that need f (their gradients, partial over tp, are then summed
    by one bucketed all-reduce per layer)."""
    seeds = initial_seeds(gm, analysis, t, sp)
    bucket, siblings, guessed, learned = None, True, False, set()
    sliced, before_sliced = None, None    # tp_sliced_params: learned once, dropped if wrong
    for _ in range(10 + 2 * len(analysis.linears)):
        rw = Rewriter(gm, analysis, seeds, t, rank, group_name, sp, requires_grad, bucket)
        try:
            g = rw.run()
        except Refine as ref:
            seeds = refine_seeds(seeds, analysis, ref, siblings, learned)
            guessed |= siblings
            continue
        except PlaceBuffer as buf:
            seeds = {**seeds, buffer_key(buf.node): buf.placement}
            continue
        except KeepReplicated as keep:
            seeds = keep_replicated(seeds, analysis, keep, siblings, learned)
            guessed |= siblings
            continue
        except ShardingError:
            if sliced:   # a parameter seeded split by its slices broke the walk: keep it whole
                seeds, sliced, bucket = before_sliced, {}, None
                continue
            if not guessed:
                raise
            # a layer learned from its namesake in another layer differs: learn each alone
            analysis.kept_replicated.clear()
            seeds, bucket, siblings, guessed = initial_seeds(gm, analysis, t, sp), None, \
                False, False
            learned.clear()
            sliced = None
            continue
        if sliced is None:
            sliced = tp_sliced_params.learn(gm, rw, seeds)
            if sliced:
                before_sliced, seeds = seeds, {**seeds, **sliced}
                continue
        if rw.params_with_own_f and bucket is None:
            bucket = buckets_by_layer(gm, rw.params_with_own_f)
            continue
        rw.sliced_params = sliced or {}
        return fx.GraphModule(gm, g), seeds, rw
    raise ShardingError("sharding propagation did not converge (repeated fused-weight splits)")


def tensor_parallel_pass(gm: fx.GraphModule, cfg, coords, params: dict, plan) -> fx.GraphModule:
    """The captured (full-size) graph -> this tp rank's graph.

    Guarantees afterwards: every parameter's placement and local shape are in
    ``plan.params``; every value's tp placement is in ``node.meta["ptdp_placement"]``
    (the pipeline split reads boundary placements); the graph type-checks with
    FakeTensor at local shapes (``node.meta["val"]`` holds local values)."""
    t = cfg.tp
    group = coords.group("tp")
    group_name = group.group_name if group is not None else "tp"
    analysis = _an.analyze(gm)
    requires_grad = {n: p.requires_grad for n, p in params.items()}
    try:
        new, seeds, rw = tensor_parallel(gm, analysis, t, coords.tp_rank, group_name,
                                         cfg.sequence_parallel, requires_grad)
    except ShardingError as e:
        raise ShardingError(
            f"{e}\nWhat to change: train this model without tensor parallelism (tp=1: pp, dp "
            "and dp_shard need no sharding rule), or report the op and the line above "
            "so a rule can be added") from e
    for name, pp in plan.params.items():
        pl = seeds.get(name)
        if pl is not None:
            pp.placement = pl
            pp.local_shape = tuple(local_shape(pp.full_shape, pl, t))
        pp.grad_tp_reduce = name in rw.grad_tp_params
    for n in gm.graph.nodes:
        name = _an.param_name(n)
        if name and not n.users and name in seeds:
            plan.params[name].role = "not read by the forward: stored split by rows"
        if name in rw.sliced_params:
            plan.params[name].role = tp_sliced_params.ROLE
        if name and not plan.params[name].role:
            for u in n.users:
                r = u.meta.get("ptdp", {}).get("role")
                if r:
                    plan.params[name].role = r
                    break
    for n in new.graph.nodes:
        n.meta["ptdp_placement"] = rw.placement.get(n)
    plan.coverage = tp_coverage.coverage(gm, analysis, plan, params)
    tp_gather_weights.gather_pass(new, cfg, coords.tp_rank, group_name, plan)
    tp_coverage.check(plan.coverage, t, strict=getattr(cfg, "strict", False),
                      warn=getattr(coords, "rank", 0) == 0)
    fake_check(new, params, plan)
    plan.collectives.extend(collective_plans(rw, t))
    plan.tp_rewrites = rw.rewrites
    plan.analysis = analysis
    _log(plan, analysis, seeds, rw, t, cfg.sequence_parallel)
    return new


def _log(plan, analysis, seeds, rw, t, sp):
    plan.pass_log.append(("analyze", f"{len(analysis.groups)} tensor-parallel blocks "
                          f"({len(analysis.column)} column-, {len(analysis.row)} row-parallel "
                          f"linears); LM head: "
                          f"{analysis.head.node.name if analysis.head else 'none'}; "
                          f"vocab-parallel embeddings: "
                          f"{[e.name for e in analysis.vocab_embeddings]}"))
    plan.pass_log.append(("tensor_parallel", f"tp={t}: {len(seeds)} sharded parameters, "
                          f"{sum(1 for c in rw.collectives if c[0] != 'f')} forward "
                          f"collectives, {sum(1 for c in rw.collectives if c[0] == 'f')} f "
                          f"operators, {len(rw.rewrites)} shape constants rewritten"))
    if sp:
        plan.pass_log.append(("sequence_parallel", describe_sequence_parallel(rw)))
    if rw.sequence_gathered:
        ops = sorted({str(n.target) for n in rw.sequence_gathered})
        plan.pass_log.append(("sequence_parallel", (
            f"{len(rw.sequence_gathered)} op(s) that mix tokens across the sequence "
            f"({', '.join(ops)}) run on the all-gathered sequence, as Megatron's "
            "mixture-of-experts does under SP; their results are sliced back where they "
            "meet the sequence shard")))
    for size, pad in sorted({(pl.size, pl.padded) for pl in seeds.values()
                             if isinstance(pl, PaddedShard)}):
        plan.pass_log.append(("vocabulary padding", (
            f"tp={t} does not divide the vocabulary of {size}: the embedding / LM-head rows "
            f"are padded with zeros to {pad} ({pad // t} per rank, Megatron-style); the "
            f"{pad - size} padded logits are masked to -inf in the vocab-parallel "
            "cross-entropy (they never win and get no gradient), and full_grads() / "
            "full_state_dict() return the original shapes")))
    if rw.dropouts["sharded"] or rw.dropouts["replicated"]:
        plan.pass_log.append(("dropout", (
            f"{rw.dropouts['sharded']} dropout(s) on tp-sharded tensors draw a different mask "
            f"on each tp rank; {rw.dropouts['replicated']} on replicated tensors draw the "
            "same mask on every tp rank")))


def collective_plans(rw: Rewriter, t: int) -> list:
    """What each inserted collective moves, for ``explain``."""
    out = []
    for kind, n, where, _ in rw.collectives:
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
                "reduce_scatter": (t - 1) * nbytes, "all_to_all": (t - 1) * nbytes / t}[kind]
        bwd = {"all_reduce": "backward: none (g)", "all_gather": "backward: reduce-scatter",
               "reduce_scatter": "backward: all-gather",
               "all_to_all": "backward: the inverse all-to-all"}[kind]
        out.append(CollectivePlan(kind, "tp", f"{n.name} ({where})", int(sent),
                                  f"{list(v.shape)} {v.dtype}; {bwd}"))
    return out


def describe_sequence_parallel(rw: Rewriter) -> str:
    ag = sum(1 for c in rw.collectives if c[0] == "all_gather")
    rs = sum(1 for c in rw.collectives if c[0] == "reduce_scatter")
    params = sorted(p for p in rw.grad_tp_params if p)
    return (f"{ag} all-gathers before column-parallel linears, {rs} reduce-scatters after "
            f"row-parallel linears / the embedding; {len(params)} replicated parameters act on "
            "the sequence shard and get their gradients summed over tp")


def count_tp_collectives(gm) -> dict:
    """Counts of the tp collective ops in a graph, by kind ('all_reduce', 'all_gather',
    'reduce_scatter', 'f', 'f_bucket')."""
    from ptdp_compiler.collectives import FORWARD_KIND
    out: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in FORWARD_KIND:
            k = FORWARD_KIND[n.target] or (
                "f_bucket" if n.target is ptdp_ops.tp_f_bucket.default else "f")
            out[k] = out.get(k, 0) + 1
    return out


__all__ = ["Rewriter", "tensor_parallel", "tensor_parallel_pass", "collective_plans",
           "describe_sequence_parallel", "count_tp_collectives"]

"""Cut the forward graph into p·v pipeline chunks along the residual stream.

A *cut* after position i of the topological order is legal when exactly one
activation is live across it: the residual stream. Values that depend only on the
model's inputs (attention masks, position ids, rotary cos/sin: no parameter and no
activation in their cone) are not activations — each chunk that needs them
recomputes them instead of receiving them. Among the legal cuts the pass picks
p·v−1 that balance a per-node cost (FLOPs of matmul-like ops from their fake
shapes, bytes for the rest), so embedding and LM head weigh what they cost, not a
layer count. Module paths (``nn_module_stack``) only break ties toward cuts between
two different modules of the same container (layer boundaries); they never decide
legality.

Guarantees afterwards: ``SplitResult.chunks[k].gm`` computes chunk k from its
``inputs`` (original placeholders by name, plus boundary tensors from chunk k−1)
and returns its boundary tensors (the last chunk returns the loss); running the
chunks in order reproduces the original graph's output; every original node except
input-only ones lives in exactly one chunk.

As a pass (``pipeline_split_pass``, last in ``passes.run_passes`` when pp > 1) it also
records the boundary tensors (shape, dtype, whether they are replicated over tp, read
from the ``node.meta["ptdp_placement"]`` the tensor-parallel pass wrote), the parameters
each chunk reads, and ``plan.pipeline``: chunk k runs on pipeline rank k mod p, and a
parameter read by chunks on several ranks (tied embedding / LM head) is listed as tied.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from ptdp_compiler.errors import ConfigError
from ptdp_compiler.graph_utils import input_only as _input_only
from ptdp_compiler.graph_utils import layer_key, legal_cuts, node_flops, shape as _shape

# the name tensor_parallel.py still imports; the layer detector is graph_utils.layer_key
_layer_key = layer_key


@dataclasses.dataclass
class Boundary:
    """A tensor crossing a cut."""
    name: str                        # the node that computes it
    shape: Optional[tuple]           # None: no fake value known
    dtype: Optional[torch.dtype]
    tp_replicated: bool              # no tensor-parallel placement: equal on every tp rank


def _boundary(n: fx.Node) -> Boundary:
    v = n.meta.get("val")
    known = isinstance(v, torch.Tensor)
    return Boundary(n.name, tuple(v.shape) if known else None, v.dtype if known else None,
                    n.meta.get("ptdp_placement") is None)


@dataclasses.dataclass
class Chunk:
    index: int
    gm: fx.GraphModule
    inputs: list          # ("graph", placeholder name) | ("boundary", i)
    num_boundary_out: int
    cost: float
    in_boundaries: list = dataclasses.field(default_factory=list)    # Boundary per input i
    out_boundaries: list = dataclasses.field(default_factory=list)   # Boundary per output


@dataclasses.dataclass
class SplitResult:
    chunks: list
    cut_after: list       # original node names after which the graph was cut
    boundary_shapes: list  # per cut: shapes of the tensors crossing it
    # filled by pipeline_split_pass: per chunk the parameters it reads, and per parameter
    # the pipeline ranks holding it (chunk k on rank k mod p)
    chunk_params: list = dataclasses.field(default_factory=list)
    owners: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        costs = [c.cost for c in self.chunks]
        tot = sum(costs) or 1.0
        parts = ", ".join(f"chunk {c.index}: {100 * c.cost / tot:.0f}%" for c in self.chunks)
        return f"{len(self.chunks)} chunks cut after {self.cut_after} ({parts} of forward FLOPs)"


def split(gm: fx.GraphModule, num_chunks: int) -> SplitResult:
    if num_chunks == 1:
        cuts = []
    else:
        cuts = choose_cuts(gm, num_chunks)
    return build_chunks(gm, cuts)


def choose_cuts(gm: fx.GraphModule, num_chunks: int) -> list:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    cand = legal_cuts(gm)
    if len(cand) < num_chunks - 1:
        raise ConfigError(
            f"the model's graph has {len(cand)} legal pipeline cut points along the residual "
            f"stream, too few for pp·virtual_stages = {num_chunks} chunks; lower pp or "
            "virtual_stages (each chunk needs at least one layer)")
    cost = [node_flops(n) for n in nodes]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    total = prefix[-1]
    # prefer cuts between two elements of a layer container; fall back to any legal cut
    def boundary(i):
        a, b = layer_key(nodes[i]), layer_key(nodes[i + 1])
        return a is not None and b is not None and a != b
    preferred = [c for c in cand if boundary(c[0])]
    if preferred and len(preferred) < num_chunks - 1:
        raise ConfigError(
            f"pp·virtual_stages = {num_chunks} chunks, but the model has only "
            f"{len(preferred) + 1} layers; choose pp·virtual_stages <= {len(preferred) + 1}")
    pool = preferred or cand
    # dynamic programming: minimise the most expensive chunk
    best = _min_max_partition([c[0] for c in pool], prefix, num_chunks)
    return [nodes[i].name for i in best]


def _min_max_partition(positions: list, prefix: list, k: int) -> list:
    """Choose k−1 of `positions` (cut after that node index) minimising the largest chunk cost."""
    n_nodes = len(prefix) - 1
    pts = sorted(positions)
    INF = float("inf")
    # dp[j][c]: min over placements of (max chunk cost) for first j cuts ending at pts[c]
    dp = [[INF] * len(pts) for _ in range(k - 1)]
    back = [[-1] * len(pts) for _ in range(k - 1)]
    for c, p in enumerate(pts):
        dp[0][c] = prefix[p + 1]
    for j in range(1, k - 1):
        for c, p in enumerate(pts):
            for d in range(c):
                v = max(dp[j - 1][d], prefix[p + 1] - prefix[pts[d] + 1])
                if v < dp[j][c]:
                    dp[j][c], back[j][c] = v, d
    best_c, best_v = -1, INF
    for c, p in enumerate(pts):
        v = max(dp[k - 2][c], prefix[n_nodes] - prefix[p + 1])
        if v < best_v:
            best_c, best_v = c, v
    chosen, j, c = [], k - 2, best_c
    while j >= 0:
        chosen.append(pts[c])
        c = back[j][c]
        j -= 1
    return sorted(chosen)


def build_chunks(gm: fx.GraphModule, cut_names: list) -> SplitResult:
    """Cut ``gm`` after the nodes named ``cut_names`` (see the module's guarantees)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    names = [n.name for n in nodes]
    bounds = [names.index(c) for c in cut_names] + [len(nodes) - 1]
    inputs_only = _input_only(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    owner = {}
    start = 0
    for k, end in enumerate(bounds):
        for n in nodes[start:end + 1]:
            if n not in inputs_only:
                owner[n] = k
        start = end + 1
    chunks, boundary_shapes = [], []
    incoming: list = []   # nodes of earlier chunks live into this chunk
    # boundary placeholders must not reuse an input's name (e.g. re-splitting a chunk)
    taken = {n.target for n in gm.graph.nodes if n.op == "placeholder"}
    prefix = "boundary"
    while any(t.startswith(prefix + "_") for t in taken):
        prefix = "_" + prefix
    for k in range(len(bounds)):
        g = fx.Graph()
        env, inputs = {}, []

        def fetch(a, g=g, env=env, inputs=inputs):
            if a in env:
                return env[a]
            if a.op == "placeholder":
                ph = g.placeholder(a.name)
                ph.meta.update(a.meta)
                inputs.append(("graph", a.name))
                env[a] = ph
                return ph
            if a.op == "get_attr":
                env[a] = g.node_copy(a)
                return env[a]
            if a in inputs_only:  # recompute mask/position/rotary values here
                new = g.node_copy(a, lambda x: fetch(x))
                env[a] = new
                return new
            raise AssertionError(f"{a.name} crosses a cut but is not a boundary value")

        for i, b in enumerate(incoming):
            ph = g.placeholder(f"{prefix}_{i}")
            ph.meta.update(b.meta)
            inputs.append(("boundary", i))
            env[b] = ph
        mine = [n for n in nodes if owner.get(n) == k]
        for n in mine:
            env[n] = g.node_copy(n, lambda x: fetch(x))
        carried = set(incoming) | set(mine)
        if k == len(bounds) - 1:
            g.output(tuple(fetch(a) for a in output.args[0]))
            outgoing = []
        else:
            later = [n for n in nodes if owner.get(n, -1) > k]
            outgoing = []
            for n in nodes:
                if n in carried and any(u in later or (u.op == "output") for u in n.users):
                    outgoing.append(n)
            g.output(tuple(env[n] for n in outgoing))
            boundary_shapes.append([_shape(n) for n in outgoing])
        chunk_gm = fx.GraphModule(gm, g)
        cost = sum(node_flops(n) for n in mine)
        chunks.append(Chunk(k, chunk_gm, inputs, len(outgoing), cost,
                            [_boundary(b) for b in incoming], [_boundary(b) for b in outgoing]))
        incoming = outgoing
    return SplitResult(chunks, list(cut_names), boundary_shapes)


def chunk_params(chunk: Chunk) -> list:
    """The canonical names of the parameters ``chunk`` reads, sorted."""
    return sorted({n.meta["ptdp_input_name"] for n in chunk.gm.graph.find_nodes(op="placeholder")
                   if n.meta.get("ptdp_input_kind") == "param"})


def pipeline_split_pass(gm: fx.GraphModule, cfg, plan) -> SplitResult:
    """The pass: cut ``gm`` into pp·virtual_stages chunks and record the split in ``plan``
    (``plan.pipeline`` and the pass log)."""
    p, v = cfg.pp, cfg.virtual_stages
    result = split(gm, p * v)
    result.chunk_params = params = [chunk_params(ch) for ch in result.chunks]
    result.owners = owners = {}
    for k, names in enumerate(params):
        for n in names:
            owners.setdefault(n, set()).add(k % p)
    total = sum(c.cost for c in result.chunks) or 1
    plan.pipeline = {
        "chunks": [{"chunk": ch.index, "pp_rank": ch.index % p, "cost_share": ch.cost / total,
                    "params": len(params[ch.index])} for ch in result.chunks],
        "cut_after": result.cut_after,
        "boundary_shapes": result.boundary_shapes,
        "tied": sorted(n for n, s in owners.items() if len(s) > 1),
        "schedule": f"{cfg.schedule} p={p} v={v} m={cfg.microbatches}",
    }
    plan.pass_log.append(("pipeline_split", result.describe()))
    return result


def run_sequential(result: SplitResult, graph_inputs: dict) -> list:
    """Reference executor: run the chunks one after another (tests, debugging)."""
    boundary: tuple = ()
    for ch in result.chunks:
        args = [graph_inputs[name] if kind == "graph" else boundary[name]
                for kind, name in ch.inputs]
        boundary = ch.gm(*args)
    return list(boundary)

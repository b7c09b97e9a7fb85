"""Read-only utilities over a captured ATen FX graph, shared by the passes, codegen and the
planner (they sit below all three; nothing here edits a graph).

- **Values and op identity**: ``val``/``shape``/``numel`` of a node's fake value;
  ``packet(target)`` (an op overload's packet, so ``aten.add.Tensor`` and
  ``aten.add.Scalar`` are one op) and ``is_op(node, *ops)``. Ops are recognised by
  identity, never by their printed names.
- **Dataflow**: ``ancestors`` (the cone a value is computed from), ``input_only`` (values
  computed from user inputs, buffers and constants only: masks, position ids, rotary
  tables), ``legal_cuts`` (positions along the residual stream where exactly one
  activation is live).
- **Layers**: ``layer_key(node)`` (the transformer layer a node belongs to, from
  ``nn_module_stack``) and ``layer_spans(gm)``, THE layer segmentation: the residual-stream
  segments between legal cuts, grouped by layer. Pipeline splitting, recomputation,
  regional compilation and the planner's cost model all use it.
- **Cost of a node**: ``node_cost(node)`` (forward FLOPs and bytes from its fake values,
  its kind, GEMM dimensions) and ``node_flops(node)``, THE FLOP model.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten


# ---- values ---------------------------------------------------------------------------------
def val(x):
    """The fake value a node carries (``node.meta["val"]``), None for non-nodes."""
    return x.meta.get("val") if isinstance(x, fx.Node) else None


def shape(x) -> Optional[tuple]:
    """Shape of a node's tensor value, None when it has none."""
    v = val(x)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _hint(d) -> int:
    try:
        return int(d)
    except Exception:   # a symbolic size: its hint
        return int(d.node.hint)


def numel(v) -> int:
    """Elements of a tensor value (a symbolic size counts at its hint)."""
    return int(math.prod(_hint(d) for d in v.shape))


# ---- op identity ------------------------------------------------------------------------------
def packet(target):
    """The op a call_function target is, independent of its overload: an OpOverload's
    packet (``aten.view``), anything else (``operator.getitem``, a higher-order op) itself."""
    return getattr(target, "overloadpacket", target)


def is_op(node, *ops) -> bool:
    """Is ``node`` a call of one of ``ops`` (overloads match exactly, packets match any of
    their overloads)?"""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    return t in ops or packet(t) in ops


def op_name(node) -> str:
    """Readable name of a node's op (``linear``, ``sp_gather``, ``getitem``) for reports
    and messages; never compare it to decide what an op is, use ``is_op``."""
    t = node.target
    p = packet(t)
    return getattr(p, "__name__", str(p)).split(".")[0]


def _packets(*names, ns=aten) -> frozenset:
    return frozenset(p for p in (getattr(ns, n, None) for n in names) if p is not None)


# ---- dataflow ---------------------------------------------------------------------------------
def readers(n: fx.Node) -> list:
    """Users of ``n`` that compute something (export's dtype / device asserts do not)."""
    return [u for u in n.users if u.target is not aten._assert_tensor_metadata.default]


def ancestors(roots) -> set:
    """Every node the values ``roots`` are computed from, ``roots`` included."""
    seen, stack = set(), [r for r in roots if isinstance(r, fx.Node)]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def input_only(gm: fx.GraphModule) -> set:
    """Nodes computed from user inputs, buffers and constants only (no param, no activation)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.meta.get("ptdp_input_kind", "user") != "param":
                out.add(n)
        elif n.op == "get_attr":  # submodules of higher-order ops (e.g. rotary under no_grad)
            out.add(n)
        elif n.op == "call_function" and all(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def legal_cuts(gm: fx.GraphModule) -> list:
    """``(i, live)``: positions i (in the list of compute nodes) after which exactly one
    activation, ``live``, is live — the residual stream."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    pos = {n: i for i, n in enumerate(nodes)}
    inputs_only = input_only(gm)
    last_use = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a in pos:
                last_use[a] = max(last_use.get(a, -1), pos[n])
    cuts = []
    live: set = set()
    for i, n in enumerate(nodes[:-1]):
        if n not in inputs_only and last_use.get(n, -1) > i:
            live.add(n)
        live = {a for a in live if last_use[a] > i}
        if len(live) == 1:
            cuts.append((i, next(iter(live))))
    return cuts


# ---- layers -----------------------------------------------------------------------------------
def layer_key(node: fx.Node) -> Optional[str]:
    """The module path of the layer ``node`` belongs to: the element of the outermost
    numbered container (``ModuleList`` / ``Sequential``) on its ``nn_module_stack``, e.g.
    ``model.transformer.h.3``. Containers nested inside a layer (an MoE's expert list) are
    parts of that layer. None outside any layer, or without module metadata."""
    stack = node.meta.get("nn_module_stack") or {}
    for v in stack.values():
        path = v[0] if isinstance(v, tuple) else str(v)
        parts = path.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[:i + 1])
    return None


def layer_spans(gm: fx.GraphModule) -> list:
    """THE layer segmentation: ``(nodes, output)`` per transformer layer, in order — its
    compute nodes and the residual-stream value it hands to the next layer (the one
    activation live at its last cut).

    The graph is cut at every residual-stream cut (``legal_cuts``); each segment takes the
    layer most of its nodes belong to (``layer_key``), consecutive segments of one layer
    join, and segments in no layer (embedding, final norm, head, loss) belong to none.
    Without module metadata, each segment that holds a matmul of parameters (and no
    embedding or loss) counts as a layer."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if not nodes:
        return []
    live_at = dict(legal_cuts(gm))
    cuts = sorted(live_at)
    bounds, start = [], 0
    for c in cuts + [len(nodes) - 1]:
        bounds.append(nodes[start:c + 1])
        start = c + 1
    keyed = any(layer_key(n) for n in nodes)
    spans: list = []
    last_key = None
    for seg in bounds:
        if not seg:
            continue
        if keyed:
            keys = [k for k in (layer_key(n) for n in seg) if k]
            key = max(set(keys), key=keys.count) if keys else None
            if key is None:
                last_key = None
                continue
            if key == last_key:
                spans[-1].extend(seg)
            else:
                spans.append(list(seg))
            last_key = key
        else:
            has_linear = any(is_op(n, aten.linear, aten.addmm, aten.mm) for n in seg)
            has_loss = any(is_op(n, *LOSS_OPS) for n in seg)
            if has_linear and not has_loss and not any(is_op(n, *EMBED_OPS) for n in seg):
                spans.append(list(seg))
    pos = {n: i for i, n in enumerate(nodes)}
    return [(span, live_at.get(pos[span[-1]], span[-1])) for span in spans]


# ---- the cost of a node -----------------------------------------------------------------------
GEMM_OPS = _packets("linear", "mm", "addmm", "bmm", "matmul", "baddbmm", "addbmm", "_scaled_mm")
ATTN_OPS = _packets("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                    "_scaled_dot_product_efficient_attention", "_flash_attention_forward")
NORM_OPS = _packets("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
                    "group_norm", "batch_norm", "native_batch_norm")
SOFTMAX_OPS = _packets("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
LOSS_OPS = _packets("cross_entropy_loss", "nll_loss", "nll_loss_forward", "nll_loss_nd",
                    "nll_loss2d", "nll_loss2d_forward", "binary_cross_entropy",
                    "binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "smooth_l1_loss",
                    "huber_loss", "kl_div", "soft_margin_loss", "multi_margin_loss",
                    "multilabel_margin_loss", "margin_ranking_loss", "hinge_embedding_loss",
                    "cosine_embedding_loss", "poisson_nll_loss", "triplet_margin_loss",
                    "ctc_loss")
EMBED_OPS = _packets("embedding", "embedding_bag")
DROPOUT_OPS = _packets("dropout", "dropout_", "native_dropout", "feature_dropout",
                       "feature_dropout_", "alpha_dropout", "alpha_dropout_",
                       "feature_alpha_dropout", "feature_alpha_dropout_")
# ops that move no data (views, metadata, factories of constants, shape queries)
FREE_OPS = _packets(
    "view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze",
    "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "alias",
    "detach", "as_strided", "arange", "zeros", "ones", "full", "empty", "scalar_tensor",
    "lift_fresh_copy", "_assert_tensor_metadata", "sym_size", "unflatten", "flatten",
    "view_as", "expand_as", "lift_fresh", "dim", "numel", "sym_numel") | frozenset(
    {operator.getitem, torch.ops.higher_order.wrap_with_set_grad_enabled,
     torch._C._set_grad_enabled})


@dataclasses.dataclass
class NodeCost:
    name: str
    op: str
    kind: str            # gemm | attention | embedding | norm | softmax | loss | elementwise | free
    flops: float         # forward FLOPs
    bytes: float         # forward bytes read + written
    gemm_dims: tuple = ()  # (m, n, k) at microbatch 1 for GEMMs
    tp_split: bool = True   # divided over t with tensor parallelism
    sp_split: bool = True   # divided over t with TP + sequence parallelism
    attn_scores: float = 0.0  # elements of a materialised score matrix (b·a·s·s_k)
    out_last_dim: int = 0
    param_elems: int = 0   # parameter elements this node reads (weights)
    residual_add: bool = False  # add of two same-shape tensors (a branch joining the stream)
    measured_s: float = 0.0  # forward seconds timed on this machine (opaque custom ops)


def _tensors(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _tensors(a)
        else:
            v = val(a)
            if isinstance(v, torch.Tensor):
                out.append((a, v))
    return out


def _ishape(v) -> tuple:
    return tuple(int(d) for d in v.shape)


def is_weight(node) -> bool:
    """A placeholder holding a parameter, buffer or constant (not a user input)."""
    return isinstance(node, fx.Node) and node.op == "placeholder" and \
        node.meta.get("ptdp_input_kind") in ("param", "buffer", "constant")


def node_cost(node: fx.Node) -> Optional[NodeCost]:
    """FLOPs and bytes of one call_function node from its fake values (None: not a compute).

    GEMMs (``linear``, ``mm``/``addmm``/``bmm``/``baddbmm``/``matmul``) cost 2·m·n·k,
    attention 2·b·s_q·s_k·(d + d_v) over the full score matrix (the convention of
    Narayanan et al. 2021), norms 8, softmax 5 and losses 5 FLOPs per element, views and
    metadata ops nothing, any other op one FLOP per output element. Bytes are those read
    and written."""
    if node.op != "call_function":
        return None
    op = packet(node.target)
    out = val(node)
    outs = [o for o in (out if isinstance(out, (list, tuple)) else [out])
            if isinstance(o, torch.Tensor)]
    ins = _tensors(node.args) + _tensors(list(node.kwargs.values()))
    in_bytes = sum(numel(v) * v.element_size() for _, v in ins)
    out_bytes = sum(numel(o) * o.element_size() for o in outs)
    params = sum(numel(v) for n, v in ins if is_weight(n))
    last = int(outs[0].shape[-1]) if outs and outs[0].dim() else 0
    nc = NodeCost(node.name, op_name(node), "elementwise", 0.0, float(in_bytes + out_bytes),
                  out_last_dim=last, param_elems=params)
    if op in (aten.add, aten.add_) and len(ins) == 2 and \
            _ishape(ins[0][1]) == _ishape(ins[1][1]) and not any(is_weight(n) for n, _ in ins):
        nc.residual_add = True
    if op in GEMM_OPS and len(ins) >= 2:
        if op is aten.linear:
            x, w = ins[0][1], ins[1][1]
            k = int(x.shape[-1])
            mm = numel(x) // max(k, 1)
            n = int(w.shape[0])
            batch = 1
        elif op is aten.addmm:
            x, w = ins[1][1], ins[2][1]
            mm, k, n, batch = int(x.shape[0]), int(x.shape[1]), int(w.shape[1]), 1
        elif op in (aten.bmm, aten.baddbmm):
            x, w = ins[-2][1], ins[-1][1]
            batch, mm, k, n = int(x.shape[0]), int(x.shape[1]), int(x.shape[2]), int(w.shape[2])
        else:  # mm / matmul (broadcasting batch)
            x, w = ins[0][1], ins[1][1]
            k = int(x.shape[-1])
            n = int(w.shape[-1]) if w.dim() >= 2 else 1
            mm = int(x.shape[-2]) if x.dim() >= 2 else 1
            batch = max(numel(outs[0]) // max(mm * n, 1), 1) if outs else 1
        nc.kind = "gemm"
        nc.flops = 2.0 * batch * mm * n * k
        nc.gemm_dims = (batch * mm, n, k)
    elif op in ATTN_OPS:
        q, k_ = ins[0][1], ins[1][1]
        vv = ins[2][1] if len(ins) > 2 else k_
        b = numel(q) // (int(q.shape[-1]) * int(q.shape[-2]))   # batch·heads
        sq, sk, d, dv = int(q.shape[-2]), int(k_.shape[-2]), int(q.shape[-1]), int(vv.shape[-1])
        nc.kind = "attention"
        nc.flops = 2.0 * b * sq * sk * d + 2.0 * b * sq * sk * dv
        nc.attn_scores = float(b * sq * sk)
    elif op in EMBED_OPS:
        nc.kind = "embedding"
        nc.bytes = float(2 * out_bytes)   # gather rows + write output
    elif op in NORM_OPS:
        nc.kind = "norm"
        nc.flops = 8.0 * (numel(outs[0]) if outs else 0)
    elif op in SOFTMAX_OPS:
        nc.kind = "softmax"
        nc.flops = 5.0 * (numel(outs[0]) if outs else 0)
    elif op in LOSS_OPS:
        nc.kind = "loss"
        logits = ins[0][1]
        nc.flops = 5.0 * numel(logits)
        nc.bytes = float(3 * numel(logits) * logits.element_size())  # max, exp-sum, grad pass
    elif op in FREE_OPS:
        nc.kind = "free"
        nc.bytes = 0.0
    elif op is aten.contiguous:   # moves data when its input is a transposed view
        nc.kind = "elementwise"
    else:
        nc.flops = float(numel(outs[0])) if outs else 0.0
    if op is aten.dropout:  # mask generation + mask store (1 byte/elem in Megatron's kernels)
        nc.bytes += float(numel(outs[0]) if outs else 0)
    return nc


def node_flops(node: fx.Node) -> float:
    """Forward FLOPs of a node (``node_cost``; 0 for placeholders, outputs and unknown
    values): what pipeline splitting balances and recomputation weighs."""
    c = node_cost(node)
    return c.flops if c is not None else 0.0

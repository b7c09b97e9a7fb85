"""The tensor-parallel graph type-checked at local shapes: FakeTensor propagation of one
rank's graph with each parameter at its local shape fills ``node.meta["val"]`` and turns a
rule that produced inconsistent shapes into a named ``ShardingError`` before any work."""
from __future__ import annotations

import torch

from ptdp_compiler.capture import source_line
from ptdp_compiler.errors import ShardingError

aten = torch.ops.aten
_SCALAR_READS = {aten.item.default, aten._local_scalar_dense.default}
# what a data-dependent scalar may feed and still leave every shape static: checks
_CHECKS = {aten._assert_scalar.default, aten.sym_constrain_range.default,
           aten.sym_constrain_range_for_size.default}


def _sizes_tensors(n) -> bool:
    """Whether scalar ``n`` reaches a tensor op other than through assertions (XLM's
    ``assert lengths.max().item() <= slen`` is fine; JetMoE's split sizes are not)."""
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        for u in m.users:
            if u in seen or u.target in _CHECKS:
                continue
            seen.add(u)
            if isinstance(u.meta.get("val"), torch.Tensor) or u.op == "output":
                return True
            todo.append(u)
    return False


def fake_check(gm, params, plan, what: str = "tensor-parallel", val_key: str = "ptdp_full_val"):
    """Re-run the per-rank graph with FakeTensor at local shapes (fills node.meta['val']).
    Parameters take their local shapes from ``plan``; other inputs the value under
    ``val_key`` (the tp pass keeps the captured one there; the ep pass reads ``val``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    # a shape environment: a data-dependent scalar (``.item()``) becomes an unbacked symbol
    # (static sizes otherwise: the inputs' sizes stay plain ints)
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
    inputs = []
    for ph in gm.graph.find_nodes(op="placeholder"):
        kind, name = ph.meta.get("ptdp_input_kind"), ph.meta.get("ptdp_input_name")
        v = ph.meta.get(val_key)
        if kind == "param":
            pp = plan.params[name]
            shape = pp.local_shape or pp.full_shape
            inputs.append(mode.from_tensor(torch.empty(shape, dtype=params[name].dtype)))
        elif isinstance(v, torch.Tensor):
            inputs.append(mode.from_tensor(torch.empty(v.shape, dtype=v.dtype)))
        else:
            inputs.append(v)
    for n in gm.graph.nodes:   # capture's symbols belong to its shape environment
        n.meta.pop("unbacked_bindings", None)
        if n.op == "call_function" and n.target in _SCALAR_READS and _sizes_tensors(n):
            raise ShardingError(
                f"a data-dependent value ('{n.name}', {n.target}) at {source_line(n)} sizes "
                f"the tensors that follow it (split sizes from .tolist(), a loop over "
                f"experts), which the {what} program does not support yet\nWhat to change: "
                f"train this model without {what.split('-')[0]} parallelism (the model's "
                f"own program handles it), or report the line above")
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as e:
        raise ShardingError(f"the {what} graph does not type-check at local shapes: "
                            f"{type(e).__name__}: {e}") from e

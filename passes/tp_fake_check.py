"""The tensor-parallel graph type-checked at local shapes: FakeTensor propagation of one
rank's graph with each parameter at its local shape fills ``node.meta["val"]`` and turns a
rule that produced inconsistent shapes into a named ``ShardingError`` before any work."""
from __future__ import annotations

import torch

from ptdp_compiler.errors import ShardingError


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
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as e:
        raise ShardingError(f"the {what} graph does not type-check at local shapes: "
                            f"{type(e).__name__}: {e}") from e

"""Context parallelism's all-gather of keys / values (``ptdp::cp_gather``, inserted by
passes/context_parallel.py before tensor parallelism runs) under tensor parallelism: it
gathers the sequence dimension over cp and leaves every other dimension as it is, so a
value split over tp on its heads stays split the same way (each tp rank gathers its own
heads). Registered when context parallelism is imported (cp > 1)."""
from __future__ import annotations

import torch

from ptdp_compiler.placement import Shard

from . import rule


@rule(torch.ops.ptdp.cp_gather.default)
def cp_gather(rw, node):
    x, dim = node.args[0], node.args[1]
    p = rw.placement_of(x)
    nd = node.meta["val"].dim()
    if p is not None and (p.dim == dim % nd or not type(p) is Shard):
        rw.fail(node, f"the context-parallel gather runs along the dimension tp splits ({p})")
    return rw.emit(node.target, (rw.new(x),) + tuple(node.args[1:]), pl=p, like=node)

"""dp_shard > 1 at run time: each rank keeps a flat 1/dp_shard of every parameter (its tp
shard when tp > 1), as ``passes/fully_shard.py`` laid it out; the compiled graph gathers
the full tensors per layer and reduce-scatters their gradients, so the optimizer, the
gradient buckets (summed over the replicated dp × cp ranks only) and the checkpoint see
ordinary, smaller parameters.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..passes.fully_shard import shard_flat, unshard_flat


def apply_fully_shard(pm, plan):
    """Shrink every parameter the graphs gather to this rank's flat shard (once; the
    Parameter objects stay the same) and rebuild the gradient buckets."""
    shapes = {n: tuple(pp.local_shape or pp.full_shape) for n, pp in plan.params.items()
              if pp.fsdp_numel and n in pm._params}
    if getattr(pm, "_fsdp_shapes", None) is not None:
        if shapes != pm._fsdp_shapes:
            raise ConfigError("a new input signature gathers different parameters under "
                              "dp_shard; keep the model's inputs uniform")
        return
    n, r = pm.config.dp_shard, pm.coords.dp_shard_rank
    with torch.no_grad():
        for name in shapes:
            p = pm._params[name]
            if tuple(p.shape) != shapes[name]:
                raise ConfigError(f"parameter {name!r} has shape {tuple(p.shape)} on this rank "
                                  f"but the program expects {shapes[name]} before dp_shard")
            p.data = shard_flat(p.data, n, r)
            pm._release_module_weight(name)
    pm._fsdp_shapes = shapes
    pm._rebuild_buckets()


def gather_flat(local: torch.Tensor, shape, group, n: int) -> torch.Tensor:
    """The tensor of ``shape`` (this rank's tp-local shape) from every dp_shard rank's
    flat shard ``local``."""
    pieces = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return unshard_flat(pieces, shape)

"""Runs one training step of a compiled program: microbatches, loss weighting, DP sync.

The loss of microbatch i on dp rank r is weighted by c_i / Σ c (c from the loss-weight
pass, Σ over every microbatch of every dp rank), so the summed gradients and the
returned loss are those of the full global batch on one device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from ..errors import InputShapeError
from .mesh import comm_device


def split_microbatches(args, kwargs, target, m: int) -> list:
    """Split every tensor argument along dim 0 into m equal microbatches."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs), target))
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0}
    if not sizes:
        raise InputShapeError("train_step got no tensor argument with a batch dimension")
    if len(sizes) > 1:
        shapes = [tuple(l.shape) for l in leaves if isinstance(l, torch.Tensor)]
        raise InputShapeError(
            f"tensor arguments disagree on the batch size (dim 0): shapes {shapes}; every tensor "
            "argument is split along dim 0 into microbatches, so all must share dim 0")
    (b,) = sizes
    if b % m:
        raise InputShapeError(
            f"this rank's batch of {b} samples cannot be split into microbatches={m}; "
            f"pass a batch that is a multiple of {m} per data-parallel rank, or change microbatches")
    per = b // m
    out = []
    for i in range(m):
        mb = [l[i * per:(i + 1) * per] if isinstance(l, torch.Tensor) and l.dim() > 0 else l
              for l in leaves]
        out.append(pytree.tree_unflatten(mb, spec))
    return out


def global_weights(counts: list, dp_group) -> tuple[list, object]:
    """Each count over the sum of every count on every dp rank, and that sum.

    Counts that are tensors stay tensors (on their device, or on the collective's device
    when dp > 1), so a step never waits for the GPU to tell the host its token count."""
    reduce = dp_group is not None and dist.get_world_size(dp_group) > 1
    dev = comm_device() if reduce else next(
        (c.device for c in counts if isinstance(c, torch.Tensor)), None)
    if dev is None:                      # Python numbers on a single dp rank
        t = float(sum(counts))
        return [c / t if t else float("nan") for c in counts], t
    cs = [torch.as_tensor(c, dtype=torch.float64).to(dev) for c in counts]
    total = torch.stack(cs).sum().reshape(1)
    if reduce:
        dist.all_reduce(total, group=dp_group)
    return [c / total[0] for c in cs], total[0]     # 0/0 = nan: a batch with no targets


def weighted(loss: torch.Tensor, w, scale: float = 1.0) -> torch.Tensor:
    """The backward seed ``loss · w · scale``. A tensor weight multiplies in fp32 (the
    precision a Python-float weight gets), so a bf16/fp16 loss's seed is cast once."""
    if isinstance(w, torch.Tensor):
        return loss.float() * (w * scale).to(device=loss.device, dtype=torch.float32)
    return loss * (w * scale)


def weighted_sum_term(loss: torch.Tensor, w, device) -> torch.Tensor:
    """``loss · w`` in float64 on ``device``, for the reported step loss."""
    term = loss.detach().double().to(device)
    return term * (w.to(device) if isinstance(w, torch.Tensor) else w)


def run_step(programs, microbatches, buckets, rng, step: int, dp_group):
    """Forward+backward over the microbatches; returns the global-batch loss (detached).

    ``programs[i]`` is the compiled program for ``microbatches[i]`` (the same object when
    shapes agree): it has ``loss_weight``, ``user_inputs(mb)`` and ``__call__(mb)``.
    """
    weights = microbatch_weights(programs, microbatches, dp_group)
    buckets.start_step()
    loss_sum = torch.zeros((), dtype=torch.float64, device=_loss_device(programs[0]))
    for i, (prog, mb) in enumerate(zip(programs, microbatches)):
        if i == len(microbatches) - 1:
            buckets.last_microbatch()
        with rng.fork(step, i):
            loss = prog(mb)
        # fp16: the backward seed carries the dynamic loss scale (runtime/precision.py)
        weighted(loss, weights[i], getattr(buckets, "loss_scale", 1.0)).backward()
        loss_sum += weighted_sum_term(loss, weights[i], loss_sum.device)
    buckets.finish()
    return global_loss(loss_sum, dp_group)


def microbatch_weights(programs, microbatches, dp_group) -> list:
    """Each microbatch's loss weight: its target count over the global batch's."""
    counts = [prog.loss_weight.count(prog.user_inputs(mb))
              for prog, mb in zip(programs, microbatches)]
    return global_weights(counts, dp_group)[0]


def global_loss(loss_sum, *groups):
    """This rank's weighted loss summed over ``groups`` (those that exist), as float32."""
    for g in groups:
        if g is not None and dist.get_world_size(g) > 1:
            loss_sum = loss_sum.to(comm_device())
            dist.all_reduce(loss_sum, group=g)
    return loss_sum.to(torch.float32)


def _loss_device(prog) -> torch.device:
    """The device the loss is computed on (that of the parameters), so accumulating it
    never copies to the host (a GPU sync) between microbatches."""
    params = getattr(getattr(prog, "_pm", None), "_params", None)
    for p in (params or {}).values():
        return p.device
    return comm_device()


def run_pipeline_step(prog, microbatches, buckets, rng, step: int, dp_group, pp_group):
    """One pipelined step: every microbatch's weight first (1F1B runs backwards before the
    last forward), then the schedule, then data-parallel and tied-weight gradient sums.

    ``prog`` is a ``stages.PipelineRunner``. Returns the global-batch loss on every rank
    (the last stage computes it; it is summed over pp — other stages add zero — and dp).
    """
    weights = microbatch_weights([prog] * len(microbatches), microbatches, dp_group)
    buckets.start_step()
    params = prog._pm._params

    def on_last_backward(chunk: int):
        buckets.mark_final([params[n] for n in prog.chunk_params[chunk] if n in params])

    # fp16: the backward seed carries the dynamic loss scale (runtime/precision.py)
    loss_sum = prog.run(microbatches, weights, rng, step, on_last_backward,
                        loss_scale=getattr(buckets, "loss_scale", 1.0),
                        not_final=buckets.not_final)
    buckets.finish()
    prog.reduce_tied_grads()
    return global_loss(loss_sum, pp_group, dp_group)

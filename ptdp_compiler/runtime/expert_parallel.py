"""Expert parallelism at run time: what a rank keeps of the routed experts, how their
gradients are summed, and how full tensors are put back together.

The plan says which parameters are expert tensors (``ParamPlan.ep`` > 1, set by
``passes/expert_parallel.py``): dim 0 (the experts) is split in contiguous blocks over the
ep group, ep rank j holding experts ``[j·E/ep, (j+1)·E/ep)``; tp shards of the same tensor
split other dims, so the two compose.

Gradients. An owner's expert gradient already sums the rows of every rank of its ep group
(they arrived by all-to-all, and the combine's backward sent their gradients back the same
way). What is left is the sum over the dp ranks holding the same experts: the "edp" group
(size dp/ep). Dense parameters are still summed over all of dp. So a rank has two sets of
gradient buckets, ``ExpertBuckets`` drives both with one interface (what the executor and
the optimizer call). Expert optimizer state lives only on owners; with the distributed
optimizer it is sharded over edp.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def expert_names(plan) -> set:
    return {n for n, pp in plan.params.items() if getattr(pp, "ep", 1) > 1}


def shard_experts(tensor: torch.Tensor, ep: int, ep_rank: int) -> torch.Tensor:
    """This ep rank's block of experts (dim 0), a copy."""
    return tensor.detach().chunk(ep, 0)[ep_rank].clone()


def gather_experts(local: torch.Tensor, group, ep: int) -> torch.Tensor:
    """Every ep rank's block of experts, concatenated back along dim 0."""
    pieces = [torch.empty_like(local) for _ in range(ep)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return torch.cat(pieces, 0)


class ExpertBuckets:
    """Dense gradients bucketed over dp, expert gradients over edp: one object to the
    executor (start_step / last_microbatch / mark_final / not_final / finish) and to the
    optimizer (``buckets``: each dict names its own group, size and rank)."""

    def __init__(self, dense, expert, dp_group, dp: int, dp_rank: int, edp_group, edp: int,
                 edp_rank: int):
        self.dense, self.expert = dense, expert
        for b in dense.buckets:
            b.update(group=dp_group, d=dp, rank=dp_rank)
        for b in expert.buckets:
            b.update(group=edp_group, d=edp, rank=edp_rank)
        self._hooks = dense._hooks + expert._hooks

    @property
    def parts(self):
        return (self.dense, self.expert)

    @property
    def buckets(self) -> list:
        return self.dense.buckets + self.expert.buckets

    @property
    def params(self) -> list:
        return self.dense.params + self.expert.params

    @property
    def loss_scale(self):
        return getattr(self.dense, "loss_scale", 1.0)

    @loss_scale.setter
    def loss_scale(self, v):
        for part in self.parts:
            part.loss_scale = v

    def start_step(self):
        for part in self.parts:
            part.start_step()

    def last_microbatch(self):
        for part in self.parts:
            part.last_microbatch()

    def mark_final(self, params):
        for part in self.parts:
            part.mark_final(params)

    def not_final(self):
        import contextlib
        stack = contextlib.ExitStack()
        for part in self.parts:
            stack.enter_context(part.not_final())
        return stack

    def finish(self):
        for part in self.parts:
            part.finish()

    def set_reduced_grad(self, p, grad):
        for part in self.parts:
            if p in getattr(part, "_owner", {}):
                part.set_reduced_grad(p, grad)

    @property
    def num_buckets(self) -> int:
        return self.dense.num_buckets + self.expert.num_buckets

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes + self.expert.nbytes


def rows_scales(pm, mbs) -> list:
    """ep > 1: ranks of an ep group may hold different numbers of tokens; each expert
    owner's receive buffer must hold the largest rank's rows. Every rank exchanges its
    microbatches' token counts (one small all-reduce per step) and builds each program
    for the group's largest over its own (1.0 when all agree)."""
    if pm.config.ep == 1 or pm.coords.mesh is None:
        return [1.0] * len(mbs)
    import math

    import torch.distributed as dist
    from torch.utils import _pytree as pytree

    def tokens(mb):
        sizes = [math.prod(l.shape[:2]) for l in pytree.tree_leaves(mb)
                 if isinstance(l, torch.Tensor) and l.dim() > 0]
        return max(sizes, default=1)
    mine = torch.tensor([tokens(mb) for mb in mbs], dtype=torch.float64)
    most = mine.clone().to(pm.coords.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=pm.coords.group("ep"))
    return [float(m) / float(t) if t else 1.0 for m, t in zip(most.cpu(), mine)]

"""The optimizer step over this rank's parameter shards: fp32 masters, a ZeRO-1 distributed
optimizer, global gradient-norm clipping, and skipping steps with inf/NaN gradients.

``pm.optimizer(torch.optim.AdamW, lr=...)`` returns a ``ParallelOptimizer``; it is built
on its first step (after the first ``train_step`` fixed the layout) from
``pm._local_layout()`` and the gradient buckets, and wraps an ordinary torch optimizer
over *pieces*: (parameter, flat range of its local tensor, fp32 master, gradient view).

- plain: one piece per parameter. In fp32 the master *is* the parameter (no copy);
  in bf16/fp16 it is an fp32 copy and ``main_grad`` is its gradient.
- ``distributed_optimizer=True`` (ZeRO-1, Megatron's distributed optimizer): every
  gradient bucket is padded to a multiple of d and reduce-scattered, so dp rank r holds
  the summed gradient of flat range [r·s, (r+1)·s) of each bucket; its pieces are the
  parameter ranges falling there, so optimizer state and masters are 1/d per rank.
  After the step each rank's updated range is all-gathered back into the parameters.
  An elementwise optimizer (SGD, Adam, AdamW) steps identically on pieces.
- clipping: the global norm is sqrt of a sum of squares over every piece counted once
  (``LocalParam.is_owner`` over tp/pp; plain mode: dp rank 0 only, the others hold the
  same numbers), one all-reduce over the world together with the inf/NaN count; the
  coefficient is ``torch.nn.utils.clip_grad_norm_``'s: max_norm / (norm + 1e-6), ≤ 1.
- a non-finite gradient anywhere skips the update on every rank (the count is global),
  ``step()`` reports it, and the fp16 loss scale backs off.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist

from .precision import DynamicLossScaler, MainGradBuckets
from .layout import duplicate_tail


def _reduce_scatter(out, inp, group, async_op):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _all_gather(out, inp, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group)


class ShardedGradBuckets(MainGradBuckets):
    """Buckets that reduce-scatter over dp: ``bucket["shard"]`` receives this rank's
    1/d of the summed gradient (the full buffer keeps only local gradients)."""

    def __init__(self, params, group, bucket_bytes, grad_dtype, dp: int):
        self.dp = dp
        super().__init__(params, group, bucket_bytes, grad_dtype=grad_dtype, pad_to=dp)

    def _add_bucket(self, params):
        super()._add_bucket(params)
        b = self.buckets[-1]
        b["shard"] = b["buffer"] if self.dp == 1 else \
            torch.zeros(b["buffer"].numel() // self.dp, dtype=b["buffer"].dtype,
                        device=b["buffer"].device)

    def _launch(self, b):
        if b["launched"]:
            return
        b["launched"] = True
        if self.reduce:
            self._handles.append(_reduce_scatter(b["shard"], b["buffer"], self.group, True))

    def set_reduced_grad(self, p, grad: torch.Tensor):
        """``grad`` is p's fully reduced gradient (e.g. a tied weight summed over pp and
        dp after the step's reduce-scatter): put this rank's range of it into the shard."""
        b = self._owner[p]
        s = b["shard"].numel()
        r = dist.get_rank(self.group) if self.reduce else 0
        off = b["offsets"][p]
        lo, hi = max(off, r * s), min(off + p.numel(), (r + 1) * s)
        if lo < hi:
            b["shard"][lo - r * s:hi - r * s].copy_(grad.reshape(-1)[lo - off:hi - off])


def make_buckets(params: list, dp_group, bucket_bytes: int, precision: str,
                 distributed: bool, dp: int):
    """The gradient buckets a configuration needs (plain ones for fp32 without ZeRO)."""
    from .data_parallel import GradBuckets
    if distributed:
        return ShardedGradBuckets(params, dp_group, bucket_bytes, torch.float32, dp)
    if precision != "fp32":
        return MainGradBuckets(params, dp_group, bucket_bytes, torch.float32)
    return GradBuckets(params, dp_group, bucket_bytes)


@dataclasses.dataclass
class Piece:
    lp: object                  # LocalParam
    lo: int                     # flat range [lo, hi) of the local tensor
    hi: int
    master: torch.nn.Parameter  # fp32, what the torch optimizer steps
    grad: torch.Tensor          # fp32 gradient of exactly these elements
    bucket: Optional[dict] = None
    shard_off: int = 0          # offset of this range in the bucket's shard (distributed)


@dataclasses.dataclass
class StepReport:
    skipped: bool
    grad_norm: float
    clip_coef: float = 1.0
    loss_scale: Optional[float] = None
    reason: str = ""


class ParallelOptimizer:
    def __init__(self, pm, optimizer_cls, max_grad_norm: Optional[float] = None, **kwargs):
        self.pm, self.optimizer_cls, self.kwargs = pm, optimizer_cls, kwargs
        self.max_grad_norm = max_grad_norm
        self.scaler = DynamicLossScaler() if pm.config.precision == "fp16" else None
        self.inner = None      # the torch optimizer over pieces, built on the first step
        self.pieces: list[Piece] = []
        self.skipped_steps = 0
        self.last: Optional[StepReport] = None
        if self.scaler is not None:
            pm._buckets.loss_scale = self.scaler.scale

    # ---- building ---------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.pm.config.distributed_optimizer

    def build(self):
        """Pieces and the inner optimizer for the current layout (idempotent)."""
        if self.inner is not None:
            return self
        pm = self.pm
        layout = [lp for lp in pm._local_layout() if lp.param.requires_grad]
        by_param = {lp.param: lp for lp in layout}
        pieces = []
        with torch.no_grad():
            if self.distributed:
                for b in pm._buckets.buckets:
                    # expert buckets (ep > 1) are sharded over their own group (edp)
                    d, r = b.get("d", pm._grad_size), b.get("rank", pm._grad_rank)
                    s = b["buffer"].numel() // d
                    a, e = r * s, (r + 1) * s
                    for p, off in b["offsets"].items():
                        lo, hi = max(a, off) - off, min(e, off + p.numel()) - off
                        if lo >= hi:
                            continue
                        flat = p.detach().view(-1)[lo:hi]
                        master = flat if p.dtype == torch.float32 else flat.float()
                        pieces.append(Piece(by_param[p], lo, hi, torch.nn.Parameter(master),
                                            b["shard"][off + lo - a:off + hi - a], b,
                                            off + lo - a))
            else:
                for lp in layout:
                    p = lp.param
                    if p.dtype == torch.float32:
                        master, grad = p, None  # the parameter itself; grad read at step time
                    else:
                        master, grad = torch.nn.Parameter(p.detach().float()), None
                    pieces.append(Piece(lp, 0, p.numel(), master, grad))
        self.pieces = pieces
        self.inner = self.optimizer_cls([pc.master for pc in pieces], **self.kwargs)
        return self

    def _grad_of(self, pc: Piece) -> torch.Tensor:
        if pc.grad is not None:
            return pc.grad
        p = pc.lp.param
        g = getattr(p, "main_grad", None)
        if g is None or g.dtype != torch.float32:
            g = p.grad if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        return g

    # ---- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepReport:
        from .checkpoint import check_initialized
        check_initialized(self.pm, "pm.step()")
        self.build()
        pm = self.pm
        grads = [self._grad_of(pc) for pc in self.pieces]
        if self.scaler is not None:
            inv = 1.0 / self.scaler.scale
            for g in grads:
                g.mul_(inv)
        counted = pm._grad_rank == 0 or self.distributed
        # an expert tensor (ep > 1) differs across ep ranks: counted by its first copy (its
        # copies: the edp ranks, and the cp ranks, which hold the same summed gradient)
        counted_expert = (getattr(pm.coords, "edp_rank", 0) == 0 and
                          getattr(pm.coords, "cp_rank", 0) == 0) or self.distributed
        # on the gradients' device: summing there needs no host sync per tensor, and under
        # NCCL the all-reduce below needs a GPU tensor anyway
        dev = grads[0].device if grads else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float64, device=dev)
        bad = torch.zeros((), dtype=torch.float64, device=dev)
        for pc, g in zip(self.pieces, grads):
            if (counted_expert if getattr(pc.lp, "ep", 1) > 1 else counted) and pc.lp.is_owner:
                sq += g.double().pow(2).sum()
                dup = duplicate_tail(pc.lp, pc.lo, pc.hi)   # counted by tp rank 0
                if dup is not None:
                    sq -= g.reshape(-1)[dup[0]:dup[1]].double().pow(2).sum()
            bad += (~torch.isfinite(g)).sum()
        stats = torch.stack([sq, bad])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        norm = math.sqrt(stats[0].item()) if math.isfinite(stats[0].item()) else float("nan")
        found_inf = stats[1].item() > 0 or not math.isfinite(norm)
        scale = self.scaler.scale if self.scaler is not None else None
        if self.scaler is not None:
            self.scaler.update(found_inf)
            pm._buckets.loss_scale = self.scaler.scale
        if found_inf:
            self.skipped_steps += 1
            self.last = StepReport(True, norm, 1.0, scale,
                                   f"{int(stats[1].item())} non-finite gradient element(s)")
            return self.last
        coef = 1.0
        if self.max_grad_norm is not None:
            coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        for pc, g in zip(self.pieces, grads):
            pc.master.grad = g.view_as(pc.master)
        self.inner.step()
        for pc in self.pieces:
            pc.master.grad = None
        self._write_back()
        self.last = StepReport(False, norm, coef, scale)
        return self.last

    @torch.no_grad()
    def _write_back(self):
        """Masters → parameters: a cast copy (plain), or an all-gather of every rank's
        updated range of each bucket (distributed)."""
        if not self.distributed:
            for pc in self.pieces:
                if pc.master is not pc.lp.param:
                    pc.lp.param.copy_(pc.master)
            return
        pm = self.pm
        by_bucket: dict = {}
        for pc in self.pieces:
            by_bucket.setdefault(id(pc.bucket), (pc.bucket, []))[1].append(pc)
        for b in pm._buckets.buckets:
            params = list(b["offsets"])
            dtype = params[0].dtype
            d, group = b.get("d", pm._grad_size), b.get("group", pm._dp_group)
            s = b["buffer"].numel() // d
            send = torch.zeros(s, dtype=dtype, device=b["buffer"].device)
            for pc in by_bucket.get(id(b), (None, []))[1]:
                send[pc.shard_off:pc.shard_off + pc.hi - pc.lo] = pc.master
            if d > 1:
                full = torch.empty(s * d, dtype=dtype, device=b["buffer"].device)
                _all_gather(full, send, group)
            else:
                full = send
            for p, off in b["offsets"].items():
                p.view(-1).copy_(full[off:off + p.numel()])

    def zero_grad(self, set_to_none: bool = True):
        """Gradients are zeroed by the next ``train_step``; kept for torch.optim parity."""

    # ---- state ------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes this rank holds for the optimizer: its state plus master copies that
        are not the parameters themselves."""
        n = 0
        if self.inner is not None:
            for st in self.inner.state.values():
                n += sum(v.numel() * v.element_size() for v in st.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
        seen = set()
        for pc in self.pieces:
            m = pc.master
            if m is pc.lp.param or m.untyped_storage().data_ptr() == \
                    pc.lp.param.untyped_storage().data_ptr():
                continue
            if id(m) not in seen:
                seen.add(id(m))
                n += m.numel() * m.element_size()
        return n

    def init_state(self):
        """Create the inner optimizer's state without changing any number (a step with
        zero gradients and lr 0, as torch.distributed.checkpoint does)."""
        self.build()
        if all(self.inner.state.get(pc.master) for pc in self.pieces):
            return
        lrs = [g["lr"] for g in self.inner.param_groups]
        for g in self.inner.param_groups:
            g["lr"] = 0.0
        for pc in self.pieces:
            pc.master.grad = torch.zeros_like(pc.master)
        self.inner.step()
        for g, lr in zip(self.inner.param_groups, lrs):
            g["lr"] = lr
        for pc in self.pieces:
            pc.master.grad = None
        # the dry step must not count as a step
        for st in self.inner.state.values():
            if "step" in st and isinstance(st["step"], torch.Tensor):
                st["step"].zero_()

    @property
    def param_groups(self):
        self.build()
        return self.inner.param_groups

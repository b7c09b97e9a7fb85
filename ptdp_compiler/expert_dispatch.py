"""Expert parallelism's token exchange as autograd-aware custom ops (``passes/expert_parallel.py``
puts them in the graph).

The routed-experts region of a mixture-of-experts layer sees its rows (token copies, one per
chosen expert) sorted by global expert id, with ``offs`` the cumulative row count per expert
(what ``grouped_mm`` reads). Experts are owned in contiguous blocks: ep rank j holds experts
``[j·L, (j+1)·L)``, ``L = E / ep``, so the rows each owner needs are one contiguous run of the
sorted rows and the dispatch is a single uneven all-to-all.

- ``ep_counts`` (``ptdp::ep_counts``): every rank tells every owner how many rows it sends to
  each of the owner's experts (an even all-to-all of ``E`` counts, once per layer and step).
  Returns this rank's ``local_offs`` (cumulative rows per local expert), ``recv`` (rows per
  (source rank, local expert)) and ``local_ids`` (local expert of each received row, for
  per-expert parameters gathered by row such as gpt-oss's expert biases).
- ``ep_dispatch`` (``ptdp::ep_dispatch``): rows -> owners (uneven all-to-all), then reordered
  from (source, expert) to (expert, source) order so each local expert's rows are contiguous;
  backward is ``ep_combine`` of the gradient.
- ``ep_combine`` (``ptdp::ep_combine``): the inverse: the owner's result rows go back to the
  ranks and positions they came from; backward is ``ep_dispatch`` of the gradient.

Shapes are static, so the compiled graph has no data-dependent sizes: the received buffer has
``capacity`` rows (the dropless worst case, every row of every ep rank routed here: ep·N when
all ranks hold N rows) of which the first ``local_offs[-1]`` are real and the rest zero. Only
real rows cross the wire and only they are multiplied (``grouped_mm`` stops at the last
offset), so the padding costs memory, not traffic or FLOPs. Ranks of one ep group may hold
different numbers of tokens per microbatch: each step they exchange their counts
(``ParallelModule._ep_rows_scales``) and every rank's program sizes ``capacity`` for the
largest (ep × its rows). A rank that would still receive more rows than ``capacity``
raises ``ExpertParallelError`` instead of dropping (a bug, never a routing outcome).

gloo on CPU runs ``all_to_all_single`` with uneven splits (measured on torch 2.13), so the
functional collective is used directly, with split sizes read from the exchanged counts.
"""
from __future__ import annotations

import torch

_c10d = torch.ops._c10d_functional

# benchmarks/moe.py sets a list here: every token all-to-all then appends the bytes this rank
# sent to the other ranks of its group (an uneven all-to-all's split sizes are known only
# inside the op; the profiler's gloo events do not carry them)
TRAFFIC = None


def _a2a(x: torch.Tensor, out_splits: list, in_splits: list, group_name: str) -> torch.Tensor:
    if TRAFFIC is not None and x.dim() > 1:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group
        me = dist.get_rank(_resolve_process_group(group_name))
        row = x[0].numel() * x.element_size()
        TRAFFIC.append((sum(in_splits) - in_splits[me]) * row)
    return _c10d.wait_tensor(_c10d.all_to_all_single(x.contiguous(), out_splits, in_splits,
                                                     group_name))


def _send_counts(offs: torch.Tensor) -> torch.Tensor:
    """Rows this rank sends to each global expert, from cumulative offsets."""
    o = offs.long()
    return torch.diff(o, prepend=o.new_zeros(1))


def _order(recv: torch.Tensor) -> torch.Tensor:
    """Positions of the received rows ((source, expert) order, as they arrive) in the
    (expert, source) order the local grouped GEMMs read."""
    ep, L = recv.shape
    flat = recv.reshape(-1)
    arrive_start = torch.cumsum(flat, 0) - flat                 # (source, expert) order
    t = recv.t().reshape(-1)
    dest_start = (torch.cumsum(t, 0) - t).reshape(L, ep).t().reshape(-1)
    dev = recv.device
    seg = torch.repeat_interleave(torch.arange(ep * L, device=dev), flat)
    within = torch.arange(int(flat.sum()), device=dev) - arrive_start[seg]
    return dest_start[seg] + within


# ---- counts ------------------------------------------------------------------------------------
@torch.library.custom_op("ptdp::ep_counts", mutates_args=())
def ep_counts(offs: torch.Tensor, group_name: str, ep: int,
              capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    send = _send_counts(offs)
    L = send.numel() // ep
    recv = _a2a(send, [L] * ep, [L] * ep, group_name).reshape(ep, L)
    total = int(recv.sum())
    if total > capacity:
        from .errors import ExpertParallelError
        raise ExpertParallelError(
            f"expert parallelism: this rank's experts received {total} rows but the compiled "
            f"buffer holds {capacity} (ep x this rank's rows); every rank of an ep group must "
            "hold the same number of tokens per microbatch")
    per_expert = recv.sum(0)
    local_offs = torch.cumsum(per_expert, 0).to(offs.dtype)
    ids = torch.zeros(capacity, dtype=torch.long, device=offs.device)
    ids[:total] = torch.repeat_interleave(torch.arange(L, device=offs.device), per_expert)
    return local_offs, recv, ids


@ep_counts.register_fake
def _(offs, group_name, ep, capacity):
    L = offs.shape[0] // ep
    return (offs.new_empty(L), offs.new_empty((ep, L), dtype=torch.long),
            offs.new_empty(capacity, dtype=torch.long))


# ---- dispatch / combine ------------------------------------------------------------------------
def _dispatch(x, offs, recv, group_name, ep, capacity):
    send = _send_counts(offs).reshape(ep, -1).sum(1).tolist()
    got = _a2a(x[:sum(send)], recv.sum(1).tolist(), send, group_name)
    out = x.new_zeros((capacity,) + tuple(x.shape[1:]))
    out[_order(recv)] = got
    return out


def _combine(y, offs, recv, group_name, ep, n):
    send = _send_counts(offs).reshape(ep, -1).sum(1).tolist()
    back = _a2a(y[_order(recv)], send, recv.sum(1).tolist(), group_name)
    if back.shape[0] == n:
        return back
    out = y.new_zeros((n,) + tuple(y.shape[1:]))
    out[:back.shape[0]] = back
    return out


@torch.library.custom_op("ptdp::ep_dispatch", mutates_args=())
def ep_dispatch(x: torch.Tensor, offs: torch.Tensor, recv: torch.Tensor, group_name: str,
                ep: int, capacity: int) -> torch.Tensor:
    return _dispatch(x, offs, recv, group_name, ep, capacity)


@ep_dispatch.register_fake
def _(x, offs, recv, group_name, ep, capacity):
    return x.new_empty((capacity,) + tuple(x.shape[1:]))


@torch.library.custom_op("ptdp::ep_combine", mutates_args=())
def ep_combine(y: torch.Tensor, offs: torch.Tensor, recv: torch.Tensor, group_name: str,
               ep: int, n: int) -> torch.Tensor:
    return _combine(y, offs, recv, group_name, ep, n)


@ep_combine.register_fake
def _(y, offs, recv, group_name, ep, n):
    return y.new_empty((n,) + tuple(y.shape[1:]))


def _setup(ctx, inputs, output):
    x, offs, recv, group_name, ep, size = inputs
    ctx.save_for_backward(offs, recv)
    ctx.group_name, ctx.ep, ctx.n = group_name, ep, x.shape[0]


def _dispatch_backward(ctx, grad):
    offs, recv = ctx.saved_tensors
    return ep_combine(grad, offs, recv, ctx.group_name, ctx.ep, ctx.n), None, None, None, \
        None, None


def _combine_backward(ctx, grad):
    offs, recv = ctx.saved_tensors
    return ep_dispatch(grad, offs, recv, ctx.group_name, ctx.ep, ctx.n), None, None, None, \
        None, None


ep_dispatch.register_autograd(_dispatch_backward, setup_context=_setup)
ep_combine.register_autograd(_combine_backward, setup_context=_setup)

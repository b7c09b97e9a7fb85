"""Single-device initial weights for a model built on the meta device, one shard per rank.

A model too large for one device is built under ``with torch.device("meta")`` and
parallelized; each rank then owns a tp shard of the parameters of its pipeline stage.
``pm.init_weights(builder, seed)`` gives those shards exactly the numbers that
``torch.manual_seed(seed); builder()`` draws on one CPU device, without the full model
ever existing anywhere.

Why replay the builder (and not call each module's ``reset_parameters`` on its shard):
a single device draws every parameter from ONE global RNG stream in constructor order,
including draws that are overwritten later (``nn.Linear`` draws Kaiming numbers that
``self.apply(self._init_weights)`` or Hugging Face's ``post_init()`` replace; a weight
built and then discarded by weight tying still consumed its draws), and the CPU
generator's draws depend on the tensor's size. A shard's numbers therefore depend on
everything the constructor did before it, and the only general way to get them is to
run the constructor again, under the same seed, with every random op at full size. No
parameter names, module types or init functions are recognised here.

How the replay keeps memory to about one full parameter:

1. Pass 1 runs ``builder()`` on meta (cheap, no numbers) under ``_Replay`` in counting
   mode: every tensor storage an op creates gets a creation index. The finished model
   tells which indices became which parameters (and are checked against the meta model
   being parallelized: same names and shapes, or ``ConfigError``).
2. Pass 2 runs ``builder()`` again under ``torch.manual_seed(seed)`` (the caller's RNG
   state is restored afterwards) with the same creation order. A storage that becomes a
   parameter is handed to the constructor as a meta tensor; its values live in one CPU
   scratch tensor, the *live slot*, only while ops touch it. When an op touches another
   parameter, the slot is retired: this rank's shard of it (per the plan's placement,
   and only if its pipeline stage holds it) is copied out and the scratch freed. An op
   on a retired parameter gets a fresh full-size scratch: an op that overwrites all of
   it without reading (``apply(_init_weights)``'s ``normal_`` re-drawing a Kaiming-
   initialised weight, ``fill_``, ``zero_``) needs nothing more; any other op gets this
   rank's shard written back and NaN elsewhere, so elementwise ops (scale, clamp, zero a
   row) stay exact on the shard, and an op that mixes in other elements of an already
   retired parameter carries NaN into the shard, which is detected and refused
   (``ConfigError``) instead of being wrong. Every other tensor (buffers such as RoPE
   frequencies, temporaries, a weight built and then discarded by tying) is computed for
   real, as on one device; buffers are handed back whole (they are not sharded).

Cost, measured on this CPU: a 42M-parameter GPT (vocab 32000, 8 layers, h=512) replays
in 2.1 s against 0.6-0.9 s for the plain build, with 16.4M elements (its largest
parameter) of scratch at most. A model built on a real device can be re-drawn the same
way once its layout is fixed (its shards are overwritten in place).

Alternatives set aside: calling each module's ``reset_parameters`` on its shard draws
other numbers (the stream position and the draw count differ); snapshotting the RNG
state per op and re-running each parameter's own ops later breaks on ops that link
tensors (copies, tying) and on the order of draws; building the full model on one rank
and scattering it needs the memory this exists to avoid.

Limits: ``builder`` must be deterministic (checked: the second pass must create the
parameters in the first pass's order) and each parameter must own its storage (tied
weights share one Parameter; a parameter viewing a larger tensor is refused).
Temporaries the constructor itself makes at full size (``torch.randn(n) * 0.02``: the
randn and the product) exist at once as they would on one device.

Ops are intercepted at the ATen level (``TorchDispatchMode``), below every Python init
helper, so ``nn.init``, ``Tensor.normal_``, ``torch.randn(...) * s``, row views
(``weight[padding_idx].zero_()``) and ``.data`` aliases all replay the same way.
Numbers are those of a CPU build (the CPU generator); a builder whose own code reads
parameter values to take Python decisions must be buildable on meta anyway.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import weakref
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import ConfigError

_META = torch.device("meta")
_CPU = torch.device("cpu")
_aten = torch.ops.aten
# in-place ops that write every element of their first argument without reading it: on a
# retired parameter they need no rehydration (no shard written back, nothing poisoned)
_OVERWRITES = {_aten.normal_, _aten.uniform_, _aten.fill_, _aten.zero_, _aten.random_,
               _aten.exponential_, _aten.geometric_, _aten.cauchy_, _aten.log_normal_,
               _aten.bernoulli_}
# factories whose result holds no values (single-device code must overwrite them)
_UNINITIALIZED = {_aten.empty, _aten.empty_strided, _aten.empty_like, _aten.new_empty,
                  _aten.new_empty_strided}


@dataclasses.dataclass
class InitReport:
    """What one replay cost: the memory numbers are element counts of full-size scratch."""
    seconds: float
    params: int                     # parameters of the model
    held: int                       # parameters this rank received a shard of
    largest_param_numel: int        # the single-device model's largest parameter
    peak_scratch_numel: int         # most parameter-scratch elements alive at once
    peak_other_numel: int           # most elements of other replay tensors alive at once
    rehydrated: int                 # ops that touched an already retired parameter


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _flat_base(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over the whole storage of ``t`` (views re-made from it by as_strided)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return t.as_strided((n,), (1,), 0)


@dataclasses.dataclass
class _ParamSlot:
    name: str
    shape: tuple
    stride: tuple
    meta_base: Optional[torch.Tensor] = None   # 1-D meta tensor on the parameter's storage
    shard: Optional[torch.Tensor] = None       # this rank's piece once retired (if held)
    garbage: bool = False    # made by an empty-like factory and not touched since: no values


class _Replay(TorchDispatchMode):
    """Counts created storages (pass 1) or replays the init with parameters as shards
    (pass 2). ``params``: creation index → _ParamSlot (pass 2 only)."""

    def __init__(self, params: Optional[dict] = None, take: Optional[Callable] = None,
                 put: Optional[Callable] = None):
        super().__init__()
        self.counting = params is None
        self.params = params or {}
        self.take, self.put = take, put          # full → this rank's shard / inverse
        self.created = 0
        self.keep = []                  # pass 1: every created meta storage (keys stay unique)
        self.index_of_storage: dict = {}   # storage key → creation index
        self.by_meta_key: dict = {}     # pass 2: meta storage key → creation index (params)
        self.live: dict = {}            # index → real 1-D scratch of a parameter
        self.poisoned: set = set()
        self.scratch_numel = self.peak_scratch = 0
        self.other_numel = self.peak_other = 0
        self.rehydrated = 0
        self.internal = False
        self._other_refs: dict = {}     # data_ptr → [live tensor objects, bytes]

    # ---- bookkeeping of real non-parameter tensors (for the memory report) -------------
    def _track_other(self, t: torch.Tensor):
        ptr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        count = self._other_refs.get(ptr)
        if count is None:
            self._other_refs[ptr] = [1, n]
            self.other_numel += n // t.element_size()
            self.peak_other = max(self.peak_other, self.other_numel)
        else:
            count[0] += 1
        weakref.finalize(t, self._untrack_other, ptr, t.element_size())

    def _untrack_other(self, ptr, itemsize):
        count = self._other_refs.get(ptr)
        if count is not None:
            count[0] -= 1
            if count[0] == 0:
                self.other_numel -= count[1] // itemsize
                del self._other_refs[ptr]

    # ---- the live slot ------------------------------------------------------------------
    def _scratch(self, idx: int, overwritten: bool = False) -> torch.Tensor:
        """The real full storage of parameter ``idx`` (rehydrated if it was retired;
        ``overwritten``: the op writes all of it without reading, so values need not be)."""
        with self._own_ops():
            return self._scratch_inner(idx, overwritten)

    def _scratch_inner(self, idx: int, overwritten: bool) -> torch.Tensor:
        base = self.live.get(idx)
        if base is not None:
            return base
        slot = self.params[idx]
        mb = slot.meta_base
        base = torch.empty(mb.shape, dtype=mb.dtype, device=_CPU)
        if overwritten or slot.garbage:
            self._hold(idx, base)
            return base
        if base.is_floating_point() or base.is_complex():
            base.fill_(float("nan"))   # elements this rank does not hold: poison, detected later
        else:
            base.zero_()
        if slot.shard is not None:
            self.put(slot.name, self._param_view(idx, base), slot.shard)
        self.poisoned.add(idx)
        self.rehydrated += 1
        self._hold(idx, base)
        return base

    def _hold(self, idx: int, base: torch.Tensor):
        self.live[idx] = base
        self.scratch_numel += base.numel()
        self.peak_scratch = max(self.peak_scratch, self.scratch_numel)

    def _param_view(self, idx: int, base: torch.Tensor) -> torch.Tensor:
        slot = self.params[idx]
        return base.as_strided(slot.shape, slot.stride, 0)

    @contextlib.contextmanager
    def _own_ops(self):
        was, self.internal = self.internal, True
        try:
            yield
        finally:
            self.internal = was

    def retire(self, idx: int):
        """Keep this rank's shard of parameter ``idx`` (if it holds it); free the scratch."""
        with self._own_ops():
            self._retire(idx)

    def _retire(self, idx: int):
        base = self.live.pop(idx)
        self.scratch_numel -= base.numel()
        slot = self.params[idx]
        if slot.garbage:           # never written: nothing to keep (as on one device)
            return
        shard = self.take(slot.name, self._param_view(idx, base))
        if shard is not None:
            if idx in self.poisoned and (shard.is_floating_point() or shard.is_complex()) \
                    and torch.isnan(shard).any():
                raise ConfigError(
                    f"init replay: parameter {slot.name!r} was re-initialised by an op that reads "
                    "elements of a parameter this rank no longer holds in full (only elementwise "
                    "ops and fresh random draws can touch a parameter after another one was "
                    "initialised); load the weights with ptdp.load_hf instead")
            slot.shard = shard
        self.poisoned.discard(idx)

    def retire_all(self, keep=()):
        for idx in [i for i in self.live if i not in keep]:
            self.retire(idx)

    # ---- dispatch -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.internal:      # the replay's own bookkeeping (shards, scratch): plain ops
            return func(*args, **kwargs)
        if self.counting:
            if any(a.name == "device" for a in func._schema.arguments):
                kwargs = {**kwargs, "device": _META}   # every factory makes a meta tensor
            out = func(*args, **kwargs)
            self._index_new(args, kwargs, out)
            return out
        leaves = pytree.tree_leaves((args, kwargs))
        touched = []
        for a in leaves:
            if isinstance(a, torch.Tensor) and a.is_meta:
                idx = self.by_meta_key.get(_storage_key(a))
                if idx is None:
                    raise ConfigError("init replay: the builder used a meta tensor it did not "
                                      "create itself (e.g. one made outside builder()); build "
                                      "everything inside builder()")
                if idx not in touched:
                    touched.append(idx)
        # the live slot holds one parameter: retire it unless this op touches it again
        self.retire_all(keep=touched)
        overwritten = None
        if func.overloadpacket in _OVERWRITES and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta and sum(isinstance(a, torch.Tensor) and a.is_meta
                                            for a in leaves) == 1:
            a = args[0]
            if a.storage_offset() == 0 and a.is_contiguous() and \
                    a.numel() * a.element_size() == a.untyped_storage().nbytes():
                overwritten = self.by_meta_key[_storage_key(a)]
        real_of = {}       # id(real view handed to the op) → the meta tensor it stands for

        def to_real(a):
            if isinstance(a, torch.Tensor) and a.is_meta:
                idx = self.by_meta_key[_storage_key(a)]
                r = self._scratch(idx, overwritten=idx == overwritten).as_strided(
                    a.shape, a.stride(), a.storage_offset())
                real_of[id(r)] = a
                return r
            if isinstance(a, torch.device) and a.type == "meta":
                return _CPU    # factories run for real: random ones draw at full size
            return a

        rargs, rkwargs = pytree.tree_map(to_real, (args, kwargs))
        param_of_ptr = {self.live[idx].untyped_storage().data_ptr(): idx for idx in touched}
        real_in = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((rargs, rkwargs))
                   if isinstance(t, torch.Tensor)}
        out = func(*rargs, **rkwargs)
        for idx in touched:
            self.params[idx].garbage = False

        def back(o):
            if not isinstance(o, torch.Tensor):
                return o
            if id(o) in real_of:               # an in-place / out= op returns its argument
                return real_of[id(o)]
            ptr = o.untyped_storage().data_ptr()
            idx = param_of_ptr.get(ptr)
            if idx is not None:                # a view of a parameter: the same view on meta
                return self.params[idx].meta_base.as_strided(o.shape, o.stride(),
                                                             o.storage_offset())
            if ptr in real_in:                 # a view of another real tensor
                self._track_other(o)
                return o
            idx = self.created                 # a new storage, numbered as in pass 1
            self.created += 1
            slot = self.params.get(idx)
            if slot is None:                   # a buffer or temporary: real, as on one device
                real_in.add(ptr)
                self._track_other(o)
                return o
            # a new storage that becomes a parameter: meta outside, real in the live slot
            self.retire_all(keep=[idx])
            m = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=_META)
            slot.meta_base = _flat_base(m)
            slot.garbage = func.overloadpacket in _UNINITIALIZED
            self.by_meta_key[_storage_key(m)] = idx
            self._hold(idx, _flat_base(o))
            param_of_ptr[ptr] = idx
            return m

        return pytree.tree_map(back, out)

    def _index_new(self, args, kwargs, out):
        """Pass 1: number every output storage that no input shares."""
        ins = {_storage_key(t) for t in pytree.tree_leaves((args, kwargs))
               if isinstance(t, torch.Tensor)}
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                k = _storage_key(o)
                if k not in ins and k not in self.index_of_storage:
                    self.index_of_storage[k] = self.created
                    self.created += 1
                    self.keep.append(o)
                    ins.add(k)


def _call_builder(builder):
    model = builder()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"init_weights(builder): builder() must return the nn.Module; "
                          f"it returned {type(model).__name__}")
    return model


def plan_replay(builder: Callable, full_shapes: dict) -> dict:
    """Pass 1: build on meta, map creation index → parameter name, check the builder's
    model against the parallelized one (same parameter names and shapes)."""
    mode = _Replay()
    # no ``torch.device("meta")`` context: builders may skip their init under one (Hugging
    # Face's init_weights does), and pass 2 must take the same path; the mode itself makes
    # every factory produce meta tensors. fork_rng: a builder that seeds leaves no trace
    with torch.random.fork_rng(devices=[]), mode:
        model = _call_builder(builder)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if got != {n: tuple(s) for n, s in full_shapes.items()}:
        missing = sorted(set(full_shapes) - set(got))[:3]
        extra = sorted(set(got) - set(full_shapes))[:3]
        shapes = [(n, got[n], tuple(full_shapes[n])) for n in got
                  if n in full_shapes and got[n] != tuple(full_shapes[n])][:3]
        raise ConfigError(
            "init_weights(builder): builder() makes a different model than the one being "
            f"parallelized (missing {missing}, unexpected {extra}, shapes (name, builder, model) "
            f"{shapes}); pass a builder that constructs the same model")
    slots, seen = {}, {}
    for n, p in model.named_parameters():
        k = _storage_key(p)
        if k not in mode.index_of_storage:
            raise ConfigError(f"init_weights: parameter {n!r} was not created inside builder()")
        if k in seen:
            raise ConfigError(f"init_weights: parameters {seen[k]!r} and {n!r} are different "
                              "Parameters over one storage; the replay needs each parameter "
                              "to own its storage (tie weights by sharing the Parameter)")
        if p.storage_offset() != 0 or not p.is_contiguous() or \
                p.untyped_storage().nbytes() != p.numel() * p.element_size():
            raise ConfigError(f"init_weights: parameter {n!r} is a view into a larger tensor; "
                              "the replay needs each parameter to own its storage")
        seen[k] = n
        slots[mode.index_of_storage[k]] = _ParamSlot(n, tuple(p.shape), tuple(p.stride()))
    return slots


def replay_init(builder: Callable, seed: int, full_shapes: dict, take: Callable,
                put: Callable, slots: Optional[dict] = None):
    """Replay ``torch.manual_seed(seed); builder()`` keeping only shards.

    ``take(name, full)`` returns this rank's piece of parameter ``name`` (a copy) or None
    when this rank does not hold it; ``put(name, full, piece)`` writes a piece back into a
    full-size tensor. Returns ({name: piece}, {buffer name: tensor}, InitReport)."""
    t0 = time.perf_counter()
    slots = slots if slots is not None else plan_replay(builder, full_shapes)
    slots = {i: _ParamSlot(s.name, s.shape, s.stride) for i, s in slots.items()}  # fresh state
    mode = _Replay(params=slots, take=take, put=put)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with mode:
            model = _call_builder(builder)
        mode.retire_all()
    for n, p in model.named_parameters():
        idx = mode.by_meta_key.get(_storage_key(p)) if p.is_meta else None
        if idx is None or slots[idx].name != n:
            raise ConfigError("init_weights(builder): builder() made its tensors in a different "
                              f"order the second time (parameter {n!r}); the builder must be "
                              "deterministic")
    shards = {s.name: s.shard for s in slots.values() if s.shard is not None}
    for s in slots.values():   # never initialised by builder(): uninitialised, as on one device
        if s.garbage:
            piece = take(s.name, torch.empty(s.shape, dtype=s.meta_base.dtype))
            if piece is not None:
                shards[s.name] = piece
    buffers = {n: b for n, b in model.named_buffers() if not b.is_meta}
    sizes = [int(torch.Size(s.shape).numel()) for s in slots.values()]
    report = InitReport(seconds=time.perf_counter() - t0, params=len(slots), held=len(shards),
                        largest_param_numel=max(sizes, default=0),
                        peak_scratch_numel=mode.peak_scratch, peak_other_numel=mode.peak_other,
                        rehydrated=mode.rehydrated)
    return shards, buffers, report


# ---- the ParallelModule side --------------------------------------------------------------
def request(pm, builder: Callable, seed: int):
    """``pm.init_weights``: check the builder now (pass 1, on meta); replay it once this
    rank's layout is fixed (``_materialize_meta``), or at once if it already is (a model
    built on a real device, or materialized: its shards are overwritten in place)."""
    if not callable(builder):
        raise ConfigError(f"init_weights(builder, seed): builder must be a function returning "
                          f"the model (e.g. lambda: GPT(cfg)); got {type(builder).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"init_weights(builder, seed): seed must be an int; got {seed!r}")
    slots = plan_replay(builder, pm._full_shapes)
    if any(p.is_meta for p in pm._params.values()):
        pm._pending_init = (builder, seed, slots)
        return None                       # meta-built: applied when the layout is fixed
    if not pm._layout_final():
        # a model built on a real device has no hook at layout time: its shards are
        # re-drawn in place, which needs the layout
        raise ConfigError("init_weights on a model built on a real device re-draws its "
                          "shards in place and needs the tp/pp layout: call "
                          "pm.compile(batch) (or train_step) first, or build the model on "
                          "the meta device")
    pm._pending_init = (builder, seed, slots)
    return _apply(pm, pm._params.keys(), lambda name, local: _write_into(pm, name, local))


def materialize(pm, device: torch.device, held: list):
    """``_materialize_meta`` with a builder: the ``held`` (meta) parameters become real
    Parameters holding this rank's shard of the single-device init; meta buffers get the
    builder's values."""
    def create(name, local):
        p = pm._params[name]
        pm._params[name] = nn.Parameter(local.to(device=device, dtype=p.dtype),
                                        requires_grad=p.requires_grad)
    return _apply(pm, held, create)


def _apply(pm, held, write) -> InitReport:
    from ..passes.sharding import shard_tensor
    builder, seed, slots = pm._pending_init
    held = set(held)
    t, r = pm.config.tp, pm.coords.tp_rank
    placements = pm._placements or {}

    fsdp = getattr(pm, "_fsdp_shapes", None) or {}
    n, fr = pm.config.dp_shard, pm.coords.dp_shard_rank

    def take(name, full):
        if name not in held:
            return None
        local = shard_tensor(full, placements.get(name) if t > 1 else None, t, r)
        if name in fsdp:   # dp_shard: this rank's flat piece of the local tensor
            from ..passes.fully_shard import shard_flat
            local = shard_flat(local, n, fr)
        return local

    def put(name, full, piece):
        pl = placements.get(name) if t > 1 else None
        if name in fsdp:
            local = shard_tensor(full, pl, t, r).clone()
            flat, s = local.view(-1), piece.numel()
            lo, hi = min(fr * s, flat.numel()), min((fr + 1) * s, flat.numel())
            flat[lo:hi] = piece.reshape(-1)[:hi - lo]
            piece = local
        _put_shard(full, piece, pl, t, r)

    shards, buffers, report = replay_init(builder, seed, pm._full_shapes, take, put, slots)
    with torch.no_grad():
        for name in held:
            write(name, shards[name])
        for name, buf in list(pm.module.named_buffers()):
            if buf.is_meta:
                if name not in buffers:
                    raise ConfigError(f"init_weights: buffer {name!r} of the meta-built model "
                                      "is not a buffer of builder()'s model")
                owner, _, leaf = name.rpartition(".")
                mod = pm.module.get_submodule(owner) if owner else pm.module
                mod._buffers[leaf] = buffers[name].to(device=pm.coords.device)
    from .checkpoint import mark_initialized
    mark_initialized(pm, held)
    pm._pending_init = None
    pm.init_report = report
    return report


def _write_into(pm, name: str, local: torch.Tensor):
    """Copy a shard into an existing parameter and the optimizer's fp32 master of it."""
    p = pm._params[name]
    p.copy_(local.to(p.dtype))
    opt = getattr(pm, "_optimizer", None)
    if opt is not None and opt.inner is not None:
        for pc in opt.pieces:
            if pc.lp.name == name and pc.master is not pc.lp.param:
                pc.master.copy_(local.reshape(-1)[pc.lo:pc.hi].view_as(pc.master))


def _put_shard(full: torch.Tensor, piece: torch.Tensor, pl, t: int, r: int):
    """Write this rank's ``piece`` into ``full`` where ``shard_tensor`` took it from."""
    if pl is None:
        full.copy_(piece)
        return
    from ..passes.sharding import pad_to_shard, shard_view
    work = pad_to_shard(full, pl)
    view = shard_view(work, pl, t, r)
    view.copy_(piece.reshape(view.shape))
    if work is not full:
        full.copy_(work.narrow(pl.dim, 0, full.shape[pl.dim]))


def materialize_meta(pm):
    """``ParallelModule._materialize_meta`` (see there)."""
    if not any(p.is_meta for p in pm._params.values()):
        return
    if (pm.config.tp > 1 and pm._placements is None) or \
            (pm.config.pp > 1 and getattr(pm, "_stage_names", None) is None) or \
            (pm.config.dp_shard > 1 and getattr(pm, "_fsdp_shapes", None) is None):
        return
    dev = pm.coords.device
    if getattr(pm, "_pending_init", None) is not None:
        # pm.init_weights(builder, seed): replay the builder, keep only this rank's shards
        materialize(pm, dev, [n for n, p in pm._params.items() if p.is_meta])
        return
    if not hasattr(pm, "_uninitialized"):
        pm._uninitialized = set()
    # new Parameter objects (a meta tensor's data cannot be swapped for a real one); the
    # module keeps its meta parameters, so later captures still see a meta model
    with torch.no_grad():
        for n, p in list(pm._params.items()):
            if p.is_meta:
                real = torch.full(p.shape, float("nan"), dtype=p.dtype, device=dev) \
                    if p.dtype.is_floating_point else torch.zeros(p.shape, dtype=p.dtype,
                                                                  device=dev)
                pm._params[n] = nn.Parameter(real, requires_grad=p.requires_grad)
                pm._uninitialized.add(n)

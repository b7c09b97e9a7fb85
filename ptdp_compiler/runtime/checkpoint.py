"""Checkpoints with torch.distributed.checkpoint (DCP) that load into any parallel layout.

Format: one DCP directory. Every tensor is stored at its *full* (single-device) shape
under its canonical name — ``model.<name>`` (the fp32 master weights when an optimizer
holds them), ``optim.<name>.<state>`` (e.g. exp_avg) — as the rectangles (offsets,
sizes) this layout's ranks own: a tp shard of a fused q/k/v weight is three rectangles,
a distributed-optimizer range of a flattened shard a few more (runtime/layout.py). Each
element is written by exactly one rank (``LocalParam.is_owner``; dp rank 0 unless the
optimizer is sharded over dp). Loading asks DCP for the rectangles the *loading*
layout needs, and DCP reads their overlap with whatever was saved: that is the
resharding. ``meta`` (JSON) holds step counters, optimizer hyper-parameters, the fp16
loss scale and the caller's ``extra`` (e.g. data position); ``rng.<rank>`` each
rank's torch RNG state (restored when the rank exists in the loading world).

Atomicity: ranks write into ``<path>.partial``; after DCP's own commit (its
``.metadata``), rank 0 writes ``COMPLETE`` and renames the directory into place (an
existing checkpoint is first renamed to ``<path>.old`` and removed after). A crash at
any point leaves ``<path>`` or ``<path>.old`` complete; ``load`` takes the complete one
and never reads a ``.partial``.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from ..errors import CheckpointError, ConfigError
from .layout import piece_boxes

FORMAT_VERSION = 1
MARKER = "COMPLETE"


class Boxes:
    """This rank's rectangles of one full-shape tensor: {offsets: (sizes, tensor)}."""

    def __init__(self, full_shape, boxes):
        self.full_shape = torch.Size(full_shape)
        self.boxes = {tuple(o): (tuple(s), t) for o, s, t in boxes}

    def size(self):
        return self.full_shape

    def __create_write_items__(self, fqn, _obj):
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(torch.Size(o), torch.Size(s)),
                              properties=TensorProperties.create_from_tensor(t),
                              size=self.full_shape))
                for o, (s, t) in self.boxes.items()]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(torch.Size(o), torch.Size(s))
                for o, (s, _t) in self.boxes.items()]

    def tensor_at(self, offset) -> torch.Tensor:
        return self.boxes[tuple(offset)][1]


def _lookup(state_dict, index, fallback):
    obj = state_dict.get(index.fqn)
    if isinstance(obj, Boxes):
        return obj.tensor_at(index.offset)
    return fallback(index)


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index):
        return _lookup(self.state_dict, index, super().lookup_object)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        # DCP's _init_state_dict maps objects it does not know (ours) to None: put them back
        boxes = {k: v for k, v in state_dict.items() if isinstance(v, Boxes)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(boxes)
        self.state_dict.update(boxes)

    def lookup_tensor(self, index):
        return _lookup(self.state_dict, index, super().lookup_tensor)


# ---- what this rank holds -------------------------------------------------------------
def _pieces(pm):
    """(LocalParam, lo, hi, fp32-or-param tensor, optimizer state dict or None) for every
    range this rank holds: the optimizer's pieces, plus whole frozen parameters."""
    opt = getattr(pm, "_optimizer", None)
    out, covered = [], set()
    if opt is not None and opt.inner is not None:
        for pc in opt.pieces:
            out.append((pc.lp, pc.lo, pc.hi, pc.master, opt.inner.state.get(pc.master)))
            covered.add(pc.lp.name)
    for lp in pm._local_layout():
        if lp.name not in covered:
            out.append((lp, 0, lp.numel, lp.param, None))
    return out


def _writes_piece(pm, lp) -> bool:
    opt = getattr(pm, "_optimizer", None)
    sharded_dp = opt is not None and opt.inner is not None and opt.distributed and \
        lp.param.requires_grad
    # an expert tensor (ep > 1) is written by the first dp rank holding its experts
    first = pm.coords.edp_rank == 0 if getattr(lp, "ep", 1) > 1 else pm._grad_rank == 0
    return lp.is_owner and (sharded_dp or first)


def _state_dict(pm, for_save: bool) -> dict:
    sd: dict = {}
    boxes: dict = {}
    for lp, lo, hi, tensor, state in _pieces(pm):
        if for_save and not _writes_piece(pm, lp):
            continue
        flat = tensor.detach().reshape(-1)
        prep = (lambda t: t.contiguous().clone()) if for_save else (lambda t: t)
        boxes.setdefault(f"model.{lp.name}", (lp.full_shape, []))[1].extend(
            (o, s, prep(v)) for o, s, v in piece_boxes(lp, flat, lo, hi, for_save))
        for k, v in (state or {}).items():
            if not isinstance(v, torch.Tensor):
                continue
            key = f"optim.{lp.name}.{k}"
            if v.dim() == 0:
                sd[key] = v.detach().clone() if for_save else v
            elif v.numel() == hi - lo:
                boxes.setdefault(key, (lp.full_shape, []))[1].extend(
                    (o, s, prep(b)) for o, s, b in piece_boxes(lp, v.reshape(-1), lo, hi,
                                                               for_save))
    for key, (shape, bx) in boxes.items():
        sd[key] = Boxes(shape, bx)
    return sd


def _meta(pm, extra) -> str:
    opt = getattr(pm, "_optimizer", None)
    c = pm.config
    meta = {"format": FORMAT_VERSION, "train_steps": pm.train_steps,
            "layout": {"tp": c.tp, "pp": c.pp, "dp": c.dp, "dp_shard": c.dp_shard,
                       "cp": c.cp, "precision": c.precision,
                       "distributed_optimizer": c.distributed_optimizer},
            "full_shapes": {n: list(s) for n, s in pm._full_shapes.items()},
            "extra": extra}
    if opt is not None and opt.inner is not None:
        meta["param_groups"] = [{k: v for k, v in g.items() if k != "params"}
                                for g in opt.inner.param_groups]
        meta["skipped_steps"] = opt.skipped_steps
        if opt.scaler is not None:
            meta["loss_scaler"] = opt.scaler.state_dict()
    return json.dumps(meta, default=repr)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# ---- save / load ------------------------------------------------------------------------
def save(pm, path: str, extra=None):
    """Write a checkpoint of ``pm`` (parameters, optimizer state, RNG, counters, ``extra``)
    atomically to directory ``path``; collective over every rank."""
    path = os.path.abspath(path.rstrip("/"))
    tmp = path + ".partial"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _barrier()
    sd = _state_dict(pm, for_save=True)
    sd["meta"] = _meta(pm, extra)
    sd[f"rng.{_rank()}"] = torch.get_rng_state()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp), planner=_SavePlanner())
    if _rank() == 0:
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(sd["meta"])
            f.flush()
            os.fsync(f.fileno())
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(os.path.dirname(path))
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _fsync_dir(d: str):
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def complete_checkpoint(path: str):
    """The complete checkpoint directory for ``path`` (``path`` or, if a save crashed
    between its renames, ``path.old``), or None."""
    path = os.path.abspath(path.rstrip("/"))
    for cand in (path, path + ".old"):
        if os.path.isfile(os.path.join(cand, MARKER)):
            return cand
    return None


def load(pm, path: str):
    """Load a checkpoint saved at any layout into ``pm``; returns the saved ``extra``."""
    found = complete_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint at {path!r} (a '.partial' directory "
                              "is an interrupted save and is never loaded)")
    reader = dcp.FileSystemReader(found)
    md = reader.read_metadata().state_dict_metadata
    opt = getattr(pm, "_optimizer", None)
    if not pm._layout_final() and getattr(pm, "_plan_example", None) is not None:
        _compile_planned(pm)   # plan="auto": the planned batch fixes the layout, no user step
    if opt is not None:
        if not pm._layout_final():
            raise CheckpointError("the optimizer's shards are fixed by the first compile: call "
                                  "pm.compile(batch) (or one train_step) before pm.load(...) "
                                  "when an optimizer exists at tp > 1 or pp > 1")
        opt.init_state()
    sd = _state_dict(pm, for_save=False)
    missing = [k for k in sd if k.startswith("model.") and k not in md]
    if missing:
        raise CheckpointError(f"checkpoint {found!r} lacks parameters {missing[:5]} "
                              f"({len(missing)} missing): it is of a different model")
    bad = [(k, tuple(md[k].size), tuple(v.size())) for k, v in sd.items()
           if isinstance(v, Boxes) and k in md and tuple(md[k].size) != tuple(v.size())]
    if bad:
        raise CheckpointError(f"checkpoint {found!r} shapes differ from the model's: "
                              f"{bad[:5]} (name, saved, model)")
    sd = {k: v for k, v in sd.items() if k in md}  # e.g. saved without optimizer state
    sd["meta"] = ""
    rng_key = f"rng.{_rank()}"
    if rng_key in md:
        sd[rng_key] = torch.empty_like(torch.get_rng_state())
    with torch.no_grad():
        dcp.load(sd, storage_reader=reader, planner=_LoadPlanner())
        if opt is not None:
            opt._write_back()
    meta = json.loads(sd["meta"])
    pm.train_steps = int(meta["train_steps"])
    if opt is not None:
        for g, saved in zip(opt.inner.param_groups, meta.get("param_groups", [])):
            for k, v in saved.items():
                if k in g and (v is None or isinstance(v, (int, float, bool, list))):
                    g[k] = tuple(v) if isinstance(v, list) else v
        opt.skipped_steps = int(meta.get("skipped_steps", 0))
        if opt.scaler is not None and "loss_scaler" in meta:
            opt.scaler.load_state_dict(meta["loss_scaler"])
            pm._buckets.loss_scale = opt.scaler.scale
    if rng_key in sd:
        torch.set_rng_state(sd[rng_key])
    mark_initialized(pm, [lp.name for lp in pm._local_layout()])
    _barrier()
    return meta.get("extra")


def _compile_planned(pm):
    """Compile ``pm`` for this rank's slice of the batch ``plan="auto"`` planned with (a
    resume at a new world size re-plans, then loads: the shards need the layout first)."""
    args, kwargs = pm._plan_example
    args = args if isinstance(args, tuple) else (() if args is None else (args,))
    pm.compile(*(pm.dp_shard(a) for a in args),
               **{k: pm.dp_shard(v) for k, v in (kwargs or {}).items()})


def mark_initialized(pm, names):
    """Parameters of a meta-built model that now hold real values (api._materialize_meta)."""
    pending = getattr(pm, "_uninitialized", None)
    if pending:
        pending.difference_update(names)


def check_initialized(pm, what: str):
    pending = getattr(pm, "_uninitialized", None)
    if pending:
        raise ConfigError(
            f"{what}: the model was built on the meta device and {len(pending)} parameter(s) "
            f"of this rank (e.g. {sorted(pending)[:3]}) have no values yet; load them first "
            "with ptdp.load_hf(pm, state_dict) or pm.load(checkpoint)")


# ---- single-device (Hugging Face) state dicts -------------------------------------------
def load_hf(pm, state_dict: dict, strict: bool = True):
    """Copy a single-device state dict ({canonical name: full tensor}) into this rank's
    shards (and the optimizer's fp32 masters); tied weights need only one name."""
    from ..passes.sharding import shard_tensor
    layout = list(pm._local_layout())
    missing = [lp.name for lp in layout if lp.name not in state_dict]
    if missing and strict:
        raise CheckpointError(f"state dict lacks {missing[:5]} ({len(missing)} parameters)")
    opt = getattr(pm, "_optimizer", None)
    masters = {}
    if opt is not None and opt.inner is not None:
        for pc in opt.pieces:
            masters.setdefault(pc.lp.name, []).append(pc)
    with torch.no_grad():
        for lp in layout:
            if lp.name not in state_dict:
                continue
            full = state_dict[lp.name].detach()
            if tuple(full.shape) != tuple(lp.full_shape):
                raise CheckpointError(f"{lp.name}: state dict shape {tuple(full.shape)} != "
                                      f"model {tuple(lp.full_shape)}")
            local = shard_tensor(full, lp.placement, lp.tp, lp.tp_rank) \
                if lp.placement is not None else full
            if lp.local_shape is not None:   # dp_shard: this rank's flat piece
                from ..passes.fully_shard import shard_flat
                local = shard_flat(local, lp.fsdp, lp.fsdp_rank)
            lp.param.copy_(local.to(lp.param.dtype))
            mark_initialized(pm, [lp.name])
            for pc in masters.get(lp.name, []):
                if pc.master is not lp.param:
                    pc.master.copy_(local.reshape(-1)[pc.lo:pc.hi].view_as(pc.master))

"""The device mesh: dims ("dp", "dp_shard", "pp", "cp", "tp"), tp fastest-varying, so
tensor-parallel ranks are neighbours (the same node on a real cluster), then context-
parallel ranks (attention K/V traffic), then pp; the data-parallel dims are outermost —
Megatron's order, with the sharded data-parallel dim inside the replicated one (HSDP).

Process groups beyond the mesh dims (flattened DeviceMesh dims):
    "batch"   dp × dp_shard × cp: every rank holding different tokens; loss weights
              and the reported loss are summed over it
    "grad"    dp × cp: where gradient buckets are summed (dp_shard sums in the graph)

Expert parallelism carves ep out of dp: dp rank = edp_rank·ep + ep_rank, so an ep group is
ep neighbouring dp ranks (they exchange tokens by all-to-all) and the "edp" group joins the
ranks holding the same experts (their expert gradients are summed over it)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import torch
import torch.distributed as dist

_MESHES: dict = {}
DIMS = ("dp", "dp_shard", "pp", "cp", "tp")


@dataclasses.dataclass
class Coords:
    """This rank's place in the mesh and the process groups along each axis."""
    rank: int
    world: int
    dp_rank: int
    pp_rank: int
    tp_rank: int
    dp: int
    pp: int
    tp: int
    mesh: Optional[object] = None  # DeviceMesh, or None for a single process
    ep: int = 1                    # expert-parallel ranks, carved out of dp
    dp_shard: int = 1              # fully sharded data-parallel ranks (FSDP)
    cp: int = 1                    # context-parallel ranks (sequence chunks)
    dp_shard_rank: int = 0
    cp_rank: int = 0

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        """Index of this rank's copy of its experts among the dp ranks holding them."""
        return self.dp_rank // self.ep

    @property
    def batch_rank(self) -> int:
        """Which slice of the global batch (samples) this rank reads: dp × dp_shard ranks
        read different samples; cp ranks read the same samples (other sequence chunks)."""
        return self.dp_rank * self.dp_shard + self.dp_shard_rank

    @property
    def batch_ranks(self) -> int:
        return self.dp * self.dp_shard

    @property
    def data_rank(self) -> int:
        """Distinct per rank of the "batch" group (dropout streams differ across it)."""
        return self.batch_rank * self.cp + self.cp_rank

    @property
    def sizes(self) -> dict:
        return dict(dp=self.dp, dp_shard=self.dp_shard, pp=self.pp, cp=self.cp, tp=self.tp)

    def rank_with(self, **coords) -> int:
        """The global rank at this rank's coordinates with ``coords`` changed."""
        mine = dict(dp=self.dp_rank, dp_shard=self.dp_shard_rank, pp=self.pp_rank,
                    cp=self.cp_rank, tp=self.tp_rank)
        mine.update(coords)
        return rank_of(mine, self.sizes)

    def group(self, axis: str):
        if self.mesh is None:
            return None
        if axis in ("batch", "grad") and self.dp_shard == 1 and self.cp == 1:
            axis = "dp"   # the compact (dp, pp, tp) mesh: both are the dp group
        if axis == "egrad" and self.cp == 1:
            axis = "edp"  # expert gradients: summed over edp, and over cp when it splits tokens
        return self.mesh.get_group(axis)

    def group_if(self, axis: str):
        """The group along ``axis``, or None when it has one rank (nothing to talk about)."""
        size = {"batch": self.dp * self.dp_shard * self.cp, "grad": self.dp * self.cp,
                "edp": self.dp // self.ep, "egrad": self.dp // self.ep * self.cp}.get(axis) or self.sizes.get(axis) or \
            getattr(self, axis, 1)
        return self.group(axis) if size > 1 else None

    @property
    def device(self) -> torch.device:
        return comm_device()


def comm_device() -> torch.device:
    """Where tensors handed to the default process group's collectives must live: this
    rank's GPU under NCCL, else the CPU (gloo, or no process group at all)."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_of(coords: dict, sizes: dict) -> int:
    r = 0
    for d in DIMS:
        r = r * sizes.get(d, 1) + coords.get(d, 0)
    return r


def coords_of(rank: int, sizes: dict) -> dict:
    """Each dim's coordinate of a global rank (tp fastest-varying)."""
    out = {}
    for d in reversed(DIMS):
        n = sizes.get(d, 1)
        out[d] = rank % n
        rank //= n
    return out


def coords_for_rank(rank: int, dp: int, pp: int, tp: int) -> tuple[int, int, int]:
    """(dp_rank, pp_rank, tp_rank) of a global rank of a (dp, pp, tp) mesh."""
    c = coords_of(rank, dict(dp=dp, pp=pp, tp=tp))
    return c["dp"], c["pp"], c["tp"]


def ranks_along(axis_values: dict, sizes: dict) -> list:
    """Every group of global ranks that differ only in the dims of ``axis_values``
    (dim -> the coordinates it takes), one list per fixed setting of the other dims, in
    a fixed order (every rank must create every group, in one order)."""
    others = [d for d in DIMS if d not in axis_values]
    groups = []
    for fixed in itertools.product(*(range(sizes.get(d, 1)) for d in others)):
        base = dict(zip(others, fixed))
        groups.append([rank_of({**base, **dict(zip(axis_values, vals))}, sizes)
                       for vals in itertools.product(*axis_values.values())])
    return groups


def build_mesh(dp: int, pp: int, tp: int, ep: int = 1, dp_shard: int = 1,
               cp: int = 1) -> Coords:
    """Coordinates of this rank; the DeviceMesh (and its groups) is built once per shape.
    ``ep`` > 1 splits "dp" as ("edp", "ep") and flattens them back into "dp"."""
    sizes = dict(dp=dp, dp_shard=dp_shard, pp=pp, cp=cp, tp=tp)
    if not dist.is_initialized():
        return Coords(0, 1, 0, 0, 0, dp, pp, tp, None, ep, dp_shard, cp)
    rank, world = dist.get_rank(), dist.get_world_size()
    # keyed by the world's identity: a destroyed and re-created process group (the fake
    # world of `inspect`, tests) must not find a mesh whose groups died with the old one.
    # The entry keeps the world object alive, so its id cannot be reused by a new world.
    key = (dp, pp, tp, ep, dp_shard, cp, id(dist.group.WORLD))
    entry = _MESHES.get(key)
    if entry is None or entry[1] is not dist.group.WORLD:
        from torch.distributed.device_mesh import init_device_mesh
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        if dp_shard == 1 and cp == 1:
            # the (dp, pp, tp) mesh of a layout without dp_shard / cp: every process group
            # costs a rendezvous, so none is built for axes of one rank ("batch" and
            # "grad" are then "dp", Coords.group)
            if ep == 1:
                mesh = init_device_mesh(dev, (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
            else:
                mesh = init_device_mesh(dev, (dp // ep, ep, pp, tp),
                                        mesh_dim_names=("edp", "ep", "pp", "tp"))
                mesh["edp", "ep"]._flatten("dp")
        else:
            if ep == 1:
                mesh = init_device_mesh(dev, (dp, dp_shard, pp, cp, tp), mesh_dim_names=DIMS)
                data = ("dp",)
            else:
                mesh = init_device_mesh(dev, (dp // ep, ep, dp_shard, pp, cp, tp),
                                        mesh_dim_names=("edp", "ep") + DIMS[1:])
                mesh["edp", "ep"]._flatten("dp")
                data = ("edp", "ep")
                if cp > 1:   # an expert's gradient: its copies (edp) × the sequence chunks
                    mesh["edp", "cp"]._flatten("egrad")
            mesh[data + ("dp_shard", "cp")]._flatten("batch")
            mesh[data + ("cp",)]._flatten("grad")
        _MESHES[key] = (mesh, dist.group.WORLD)
    mesh = _MESHES[key][0]
    c = coords_of(rank, sizes)
    return Coords(rank, world, c["dp"], c["pp"], c["tp"], dp, pp, tp, mesh, ep, dp_shard, cp,
                  c["dp_shard"], c["cp"])

"""The (dp, pp, tp) device mesh: tp innermost, so tensor-parallel ranks are neighbours
(the same node on a real cluster), then pp, then dp outermost — Megatron's order.

Expert parallelism carves ep out of dp: dp rank = edp_rank·ep + ep_rank, so an ep group is
ep neighbouring dp ranks (they exchange tokens by all-to-all) and the "edp" group joins the
ranks holding the same experts (their expert gradients are summed over it)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

_MESHES: dict = {}


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

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        """Index of this rank's copy of its experts among the dp ranks holding them."""
        return self.dp_rank // self.ep

    def group(self, axis: str):
        if self.mesh is None:
            return None
        return self.mesh.get_group(axis)

    @property
    def device(self) -> torch.device:
        return comm_device()


def comm_device() -> torch.device:
    """Where tensors handed to the default process group's collectives must live: this
    rank's GPU under NCCL, else the CPU (gloo, or no process group at all)."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def coords_for_rank(rank: int, dp: int, pp: int, tp: int) -> tuple[int, int, int]:
    """(dp_rank, pp_rank, tp_rank) of a global rank, tp fastest-varying."""
    return rank // (pp * tp), (rank // tp) % pp, rank % tp


def build_mesh(dp: int, pp: int, tp: int, ep: int = 1) -> Coords:
    """Coordinates of this rank; the DeviceMesh (and its groups) is built once per shape.
    ``ep`` > 1 adds the "ep" and "edp" axes (dp split as (dp/ep, ep)); "dp" stays a group."""
    if not dist.is_initialized():
        return Coords(0, 1, 0, 0, 0, dp, pp, tp, None, ep)
    rank, world = dist.get_rank(), dist.get_world_size()
    # keyed by the world's identity: a destroyed and re-created process group (the fake
    # world of `inspect`, tests) must not find a mesh whose groups died with the old one.
    # The entry keeps the world object alive, so its id cannot be reused by a new world.
    key = (dp, pp, tp, ep, id(dist.group.WORLD))
    entry = _MESHES.get(key)
    if entry is None or entry[1] is not dist.group.WORLD:
        from torch.distributed.device_mesh import init_device_mesh
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        if ep == 1:
            mesh = init_device_mesh(dev, (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
        else:
            mesh = init_device_mesh(dev, (dp // ep, ep, pp, tp),
                                    mesh_dim_names=("edp", "ep", "pp", "tp"))
            mesh["edp", "ep"]._flatten("dp")
        _MESHES[key] = (mesh, dist.group.WORLD)
    mesh = _MESHES[key][0]
    return Coords(rank, world, *coords_for_rank(rank, dp, pp, tp), dp, pp, tp, mesh, ep)

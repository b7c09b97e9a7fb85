"""Cluster description: nodes × GPUs per node, the GPU, and the two link kinds."""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Union

from .hardware import GPU_SPECS, INFINIBAND, NVLINK, GPUSpec, Link, gpu_spec


def _family(name: str) -> str:
    for f in ("H200", "H100", "A100"):
        if name.upper().startswith(f):
            return f
    return "A100"


@dataclasses.dataclass
class Cluster:
    """``Cluster(nodes=128, gpus_per_node=8, gpu="A100-80GB")``; links default to the GPU
    family's NVLink (intra-node) and one InfiniBand HCA per GPU (inter-node)."""
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: Union[str, GPUSpec] = "A100-80GB"
    intra: Optional[Link] = None
    inter: Optional[Link] = None
    name: str = ""

    def __post_init__(self):
        self.gpu = gpu_spec(self.gpu)
        fam = _family(self.gpu.name)
        if self.intra is None:
            self.intra = NVLINK[fam]
        if self.inter is None:
            self.inter = INFINIBAND[fam]
        if not self.name:
            self.name = f"{self.nodes}x{self.gpus_per_node} {self.gpu.name}"

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def for_gpus(cls, gpus: int, gpu="A100-80GB", gpus_per_node: int = 8) -> "Cluster":
        per = min(gpus, gpus_per_node)
        return cls(nodes=max(1, gpus // per), gpus_per_node=per, gpu=gpu)

    def group_link(self, size: int, stride: int) -> Link:
        """The effective per-GPU link of a ring over ``size`` ranks that are ``stride`` apart
        in the global rank order (nodes hold consecutive ranks). Within one node it is
        NVLink; across nodes the g ranks of the group inside one node drive g HCAs in
        parallel (NCCL uses one ring per NIC), capped by NVLink."""
        if size <= 1:
            return self.intra
        span = (size - 1) * stride + 1
        if span <= self.gpus_per_node and self.nodes >= 1:
            return self.intra
        per_node = max(1, min(size, self.gpus_per_node // max(stride, 1)))
        bw = min(self.intra.bandwidth, per_node * self.inter.bandwidth)
        return Link(f"{self.inter.name}x{per_node}", bw, self.inter.latency)

    # ---- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "gpu": dataclasses.asdict(self.gpu), "intra": dataclasses.asdict(self.intra),
                "inter": dataclasses.asdict(self.inter)}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Cluster":
        g = d["gpu"]
        gpu = GPUSpec(**g) if isinstance(g, dict) else g
        return cls(nodes=d.get("nodes", 1), gpus_per_node=d.get("gpus_per_node", 1), gpu=gpu,
                   intra=Link(**d["intra"]) if d.get("intra") else None,
                   inter=Link(**d["inter"]) if d.get("inter") else None, name=d.get("name", ""))

    @classmethod
    def load(cls, path: str) -> "Cluster":
        with open(path) as f:
            return cls.from_dict(json.load(f))


__all__ = ["Cluster", "GPU_SPECS"]

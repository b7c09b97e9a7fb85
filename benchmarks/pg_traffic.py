"""Bytes a process group actually moved in a region of code, read from the torch profiler.

A ``TorchDispatchMode`` does not see the c10d ops issued inside a Python custom op (the
mode is off while the op runs, and ptdp's f/g collectives are such ops), and its mere
presence makes Dynamo skip compiled frames. The profiler sees both, from below:

- a ``c10d::<op>`` event (the op the process group was handed: ``allreduce_``,
  ``allgather_into_tensor_coalesced_``, ``reduce_scatter_tensor_coalesced_``, ``send``, ...)
  names the logical collective and carries its tensors' shapes;
- a ``gloo:<algorithm>`` event (``gloo:all_reduce``, ``gloo:all_gather``, ``gloo:send``,
  ...) is the work the gloo backend ran for it, with its buffer's shape and dtype.

Each c10d op is paired with the gloo work it caused (first unpaired gloo event of the
expected algorithm and element count, in time order; an op left unpaired raises, so nothing
goes uncounted). On gloo a reduce-scatter runs as an all-reduce of the full-size input.

Every op then gets two byte counts, both what one rank sends under a ring over its group
of ``t`` ranks:

- ``gloo_bytes``: for the work gloo ran — all-reduce 2(t−1)/t·n, all-gather (t−1)·n_local,
  send n (so a reduce-scatter costs an all-reduce's 2(t−1)/t·n_full);
- ``nccl_bytes``: for the collective asked for, as NCCL runs it — the same, except a
  reduce-scatter's (t−1)/t·n_full.

The group size is the caller's (the profiler does not record which group an op ran on):
every benchmark using this runs groups of one size. Phase: an op issued inside an
``autograd::engine::evaluate_function`` event of its thread is "backward", else "forward".
"""
from __future__ import annotations

import json
import math
import os
import tempfile

# c10d op -> (collective, index of the argument whose tensors are the payload)
C10D_OPS = {
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 1),
    "allgather_": ("all_gather", 1),
    "allgather_coalesced_": ("all_gather", 1),
    "allgather_into_tensor_coalesced_": ("all_gather", 1),
    "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "send": ("send", 0),
    "recv_": ("recv", 0),
}
# collective -> the gloo algorithms that may run it
GLOO_RUNS = {"all_reduce": ("all_reduce",), "all_gather": ("all_gather",),
             "reduce_scatter": ("reduce_scatter", "all_reduce"), "send": ("send",),
             "recv": ("recv",)}
DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8,
               "int": 4, "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1}


def ring_bytes(kind: str, n: float, t: int) -> float:
    """Bytes one rank sends for collective ``kind`` of a payload of ``n`` bytes (the
    full tensor for all-reduce / reduce-scatter, the local shard for all-gather)."""
    if kind == "send":
        return n
    if kind == "recv" or t <= 1:
        return 0.0
    return {"all_reduce": 2 * (t - 1) / t * n, "all_gather": (t - 1) * n,
            "reduce_scatter": (t - 1) / t * n}[kind]


def _numel(dims, kind: str) -> int:
    """Elements of a tensor argument's shape, or of a TensorList argument's shapes (a 0-d
    tensor's shape is [], one element)."""
    if kind == "TensorList":
        return sum(math.prod(d) for d in dims)
    return math.prod(dims)


class ProcessGroupTraffic:
    """``with ProcessGroupTraffic(t) as tr: step()`` then ``tr.ops`` (one dict per c10d op:
    op, kind, phase, payload_bytes, gloo_algorithm, gloo_bytes, nccl_bytes) and
    ``tr.totals(...)``."""

    def __init__(self, group_size: int):
        self.t = group_size
        self.ops: list = []

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        if exc[0] is None:
            fd, path = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            try:
                self._prof.export_chrome_trace(path)
                with open(path) as f:
                    events = json.load(f)["traceEvents"]
            finally:
                os.unlink(path)
            self.ops = self._parse(events)
        return False

    def _parse(self, events: list) -> list:
        evs = [e for e in events if e.get("ph") == "X"]
        backward = {}     # tid -> [(start, end)] of autograd engine functions
        for e in evs:
            if e["name"].startswith("autograd::engine::evaluate_function"):
                backward.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
        c10d = sorted((e for e in evs if e["name"].startswith("c10d::")
                       and e["name"][6:] in C10D_OPS), key=lambda e: e["ts"])
        gloo = sorted((e for e in evs if e["name"].startswith("gloo:")), key=lambda e: e["ts"])
        used = [False] * len(gloo)
        ops = []
        for e in c10d:
            name = e["name"][6:]
            kind, arg = C10D_OPS[name]
            numel = _numel(e["args"]["Input Dims"][arg], e["args"]["Input type"][arg])
            match = None
            for i, g in enumerate(gloo):
                if used[i] or g["ts"] < e["ts"]:
                    continue
                algo = g["name"][5:]
                # a gloo event lists the shapes of the buffers it ran on
                if algo in GLOO_RUNS[kind] and \
                        _numel(g["args"]["Input Dims"], "TensorList") == numel:
                    match = i
                    break
            if match is None:
                raise RuntimeError(f"c10d::{name} of {numel} elements at ts {e['ts']}: no gloo "
                                   "work of that size found (not a gloo group?)")
            used[match] = True
            g = gloo[match]
            itemsize = DTYPE_BYTES[g["args"]["Input type"][0]]
            n = numel * itemsize
            ts = e["ts"]
            phase = "backward" if any(a <= ts <= b for a, b in backward.get(e["tid"], ())) \
                else "forward"
            algo = g["name"][5:]
            ops.append({"op": name, "kind": kind, "phase": phase, "payload_bytes": n,
                        "gloo_algorithm": algo,
                        "gloo_bytes": ring_bytes(algo, n, self.t),
                        "nccl_bytes": ring_bytes(kind, n, self.t)})
        return ops

    def totals(self, field: str = "nccl_bytes", by=("kind", "phase")) -> dict:
        """{key: summed ``field``}, key = the values of ``by`` (one value: not a tuple)."""
        out: dict = {}
        for o in self.ops:
            k = tuple(o[b] for b in by)
            k = k[0] if len(k) == 1 else k
            out[k] = out.get(k, 0) + o[field]
        return out

    def total(self, field: str = "nccl_bytes") -> float:
        return sum(o[field] for o in self.ops)


__all__ = ["ProcessGroupTraffic", "ring_bytes"]

"""Bytes moved per step by the tensor-parallel collectives vs Megatron's formula.

For each t in {2, 4}, with and without sequence parallelism, the project GPT is compiled
with 1 and with 2 decoder layers and trained one step (one microbatch). The bytes are
measured at the process group: the tp group the compiler uses is replaced by
``CountingGroup``, a ``torch.distributed.ProcessGroup`` that forwards every collective to
the real (gloo / NCCL) group and records what this rank sends under the ring algorithm
(all-reduce 2(t-1)/t·|x|, all-gather (t-1)·|x_local|, reduce-scatter (t-1)/t·|x_full|).
The compiler's own ops count nothing. A collective the wrapper does not forward fails
loudly (a Python process group has no backend of its own), so nothing goes uncounted.

One decoder layer's forward + backward traffic is the 2-layer step minus the 1-layer
step. Megatron's analysis gives 8·b·s·h·(t−1)/t elements per layer per microbatch:

- tensor parallel: 4 all-reduces of b·s·h (2 forward g, 2 backward f);
- with sequence parallelism: 4 all-gathers + 4 reduce-scatters of b·s·h.

``measured_bytes`` is that per-layer difference for those activation collectives
(all-reduces without SP; all-gathers + reduce-scatters with SP); the ratio to the formula
must be 1.00. The wrapper also records whether a collective ran in forward or backward
(autograd's current graph task). Reported apart, as Megatron's formula leaves them out:

- ``regather_bytes`` (SP): Megatron-SP stores only the sequence shard of a column-parallel
  linear's input and all-gathers it again in backward for the weight gradient (the
  recompute pass does the same). Backward all-gathers are the mirrors of the forward
  reduce-scatters (same bytes) plus these re-gathers, so re-gathers = backward
  all-gather bytes − forward reduce-scatter bytes;
- ``param_grad_bytes``: the per-layer growth of the one bucketed all-reduce that sums the
  gradients of the replicated parameters acting on the sequence shard under SP (two
  LayerNorms' weights and biases: 4·h per layer; the row-parallel biases need none, their
  gradient is summed from the all-gathered output gradient, ``ptdp::sp_scatter_bias``);
- ``outside_layers_bytes``: everything else in the step — the vocab-parallel embedding's
  all-reduce / reduce-scatter, the LM head's input gather, the vocab-parallel
  cross-entropy's max / sum-exp / target-logit all-reduces, the position embedding's
  gradient, and the bucket's non-layer part.

    python benchmarks/tp_comm.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ptdp_compiler as ptdp  # noqa: E402

B, S, H, V, HEADS = 4, 32, 64, 256, 4


class CountingGroup(dist.ProcessGroup):
    """A process group that forwards to ``inner`` and logs (kind, bytes sent by this rank).

    The compiler's collectives reach a process group through the functional collectives:
    ``all_reduce`` → ``allreduce``, and (collectives.py uses the coalesced forms)
    ``all_gather_into_tensor_coalesced`` / ``reduce_scatter_tensor_coalesced`` →
    the methods below, which a Python ProcessGroup can override."""

    def __init__(self, inner: dist.ProcessGroup, name: str):
        super().__init__(inner.rank(), inner.size())
        self.inner, self.t, self.log, self._name = inner, inner.size(), [], name
        from torch._C._distributed_c10d import _register_process_group
        _register_process_group(name, self)

    @property
    def group_name(self):
        return self._name

    @staticmethod
    def _nbytes(tensors) -> int:
        return sum(x.numel() * x.element_size() for x in tensors)

    def size(self):
        return self.t

    def getBackendName(self):
        return "counting"

    def _record(self, kind, sent):
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        self.log.append((kind, phase, sent))

    def allreduce(self, tensors, opts):
        self._record("all_reduce", 2 * (self.t - 1) * self._nbytes(tensors) / self.t)
        return self.inner.allreduce(tensors, opts)

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts):
        self._record("all_gather", (self.t - 1) * self._nbytes(inputs))
        return self.inner.allgather_into_tensor_coalesced(outputs, inputs, opts)

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts):
        self._record("reduce_scatter", (self.t - 1) * self._nbytes(inputs) / self.t)
        return self.inner.reduce_scatter_tensor_coalesced(outputs, inputs, opts)

    def totals(self) -> dict:
        """{(kind, phase): bytes sent}."""
        out: dict = {}
        for kind, phase, n in self.log:
            out[(kind, phase)] = out.get((kind, phase), 0) + n
        return out


_WRAPPERS: dict = {}


def _counted(pm) -> CountingGroup:
    """Make the compiler build ``pm``'s graphs on a counting wrapper of its tp group."""
    from ptdp_compiler.runtime.mesh import Coords
    real = pm.coords.group("tp")
    name = real.group_name + "/counted"
    group = _WRAPPERS.get(name)
    if group is None:      # a name registers once per process; later models reuse it
        group = _WRAPPERS[name] = CountingGroup(real, name)

    class CountedCoords(Coords):
        def group(self, axis):
            return group if axis == "tp" else super().group(axis)

    pm.coords = CountedCoords(**{f: getattr(pm.coords, f)
                                 for f in pm.coords.__dataclass_fields__})
    return group


def job(t, sp, b=B, s=S, h=H, v=V, heads=HEADS, sp_regather=True):
    """On every rank: per-kind tp bytes of one step, for 1 and 2 decoder layers."""
    from examples.models.gpt import GPT, GPTConfig
    steps = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=v, block_size=s, n_layer=layers, n_head=heads,
                              n_embd=h))
        pm = ptdp.parallelize(model, tp=t, sequence_parallel=sp, sp_regather=sp_regather,
                              codegen="aot_eager")
        group = _counted(pm)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, v, (b, s), generator=g)
        tgt = torch.randint(0, v, (b, s), generator=g)
        pm.train_step(ids, targets=tgt)          # capture + compile (not measured)
        group.log.clear()
        pm.train_step(ids, targets=tgt)          # the measured step
        steps.append(group.totals())
    keys = set(steps[0]) | set(steps[1])
    layer = {k: steps[1].get(k, 0) - steps[0].get(k, 0) for k in keys}

    def kind(k, phase=None):
        return sum(n for (kk, ph), n in layer.items() if kk == k and phase in (None, ph))
    regather = kind("all_gather", "backward") - kind("reduce_scatter", "forward") if sp else 0
    act = kind("all_gather") + kind("reduce_scatter") - regather if sp else kind("all_reduce")
    param = kind("all_reduce") if sp else 0
    outside = sum(steps[0].values()) - act - param - regather
    formula = 8 * b * s * h * (t - 1) / t * 4    # elements × 4 bytes (fp32)
    return {"config": f"gpt b={b} s={s} h={h} fp32, one decoder layer, one microbatch",
            "t": t, "sequence_parallel": sp, "measured_bytes": int(act),
            "formula_bytes": int(formula), "ratio": round(act / formula, 4),
            "regather_bytes": int(regather), "param_grad_bytes": int(param),
            "outside_layers_bytes": int(outside),
            "per_layer_by_kind": {f"{k} {ph}": int(n) for (k, ph), n in sorted(layer.items())}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for t in (2, 4):
        with ptdp.LocalWorld(t) as w:
            for sp in (False, True):
                rows.append(w.run(job, t, sp, timeout=600)[0])
    print(f"{'t':>2} {'SP':>5} {'measured B':>12} {'formula B':>12} {'ratio':>6} "
          f"{'re-gather B':>11} {'norm/bias grad B':>16} {'outside layers B':>16}")
    for r in rows:
        print(f"{r['t']:>2} {str(r['sequence_parallel']):>5} {r['measured_bytes']:>12} "
              f"{r['formula_bytes']:>12} {r['ratio']:>6.2f} {r['regather_bytes']:>11} "
              f"{r['param_grad_bytes']:>16} "
              f"{r['outside_layers_bytes']:>16}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "tp_comm", "device": "cpu (gloo)", "torch": torch.__version__,
                       "command": "python benchmarks/tp_comm.py --json " + a.json,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

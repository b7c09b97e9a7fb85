"""The pipeline-parallel program of one input signature: split the per-rank (tensor-
parallel) graph into p·v chunks, keep the chunks this pipeline rank owns, compile each.

Chunk k lives on pipeline rank k mod p. A parameter read by chunks on several pipeline
ranks (tied embedding / LM head) keeps one copy per rank; its gradient is summed over
those ranks after the data-parallel reduction, through a process group per tied set
(created collectively, in the same order on every rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import capture as _capture
from .codegen import compile_graph
from .errors import InputShapeError
from .passes import pipeline_split, run_passes
from .runtime.pipeline import BoundaryMeta, PipelineComm, PipelineRun, Stage
from .runtime.schedules import build_schedule, sends_input_grad


def _boundary_meta(node, tp: int, scatter_gather: bool) -> BoundaryMeta:
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise InputShapeError(f"pipeline boundary {node.name} has no known shape; the graph "
                              "must be traced with concrete microbatch shapes")
    meta = BoundaryMeta(tuple(v.shape), v.dtype, False)
    # replicated over tp (no placement recorded) and evenly divisible: scatter/gather
    replicated = node.meta.get("ptdp_placement") is None
    meta.scatter = scatter_gather and tp > 1 and replicated and meta.numel % tp == 0
    return meta


class PipelineProgram:
    """One input signature's captured, transformed, split and compiled chunks."""

    def __init__(self, pm, mb):
        cfg, coords = pm.config, pm.coords
        args, kwargs, target = mb
        self._pm = pm
        self.captured = _capture.capture(pm.module, args, kwargs, target, cfg.loss_fn)
        self.program = run_passes(self.captured, cfg, coords, pm._params, pm._full_shapes)
        self.loss_weight = self.program.loss_weight
        pm._apply_placements(self.program.plan)
        p, v = cfg.pp, cfg.virtual_stages
        self.split = pipeline_split.split(self.program.gm, p * v)
        self.schedule = build_schedule(cfg.schedule, p, v, cfg.microbatches)
        self.chunk_params = [self._params_of(ch) for ch in self.split.chunks]
        owners: dict = {}
        for k, names in enumerate(self.chunk_params):
            for n in names:
                owners.setdefault(n, set()).add(k % p)
        self.owners = owners
        mine = {k for k in range(p * v) if k % p == coords.pp_rank}
        local = sorted({n for k in mine for n in self.chunk_params[k]})
        pm._apply_stage(local)
        self.tied = self._tied_groups(owners, coords)
        plan = self.program.plan
        plan.pipeline = {
            "chunks": [{"chunk": ch.index, "pp_rank": ch.index % p,
                        "cost_share": ch.cost / (sum(c.cost for c in self.split.chunks) or 1),
                        "params": len(self.chunk_params[ch.index])} for ch in self.split.chunks],
            "cut_after": self.split.cut_after,
            "boundary_shapes": self.split.boundary_shapes,
            "tied": sorted(n for n, s in owners.items() if len(s) > 1),
            "schedule": f"{self.schedule.name} p={p} v={v} m={cfg.microbatches}",
        }
        plan.pass_log.append(("pipeline_split", self.split.describe()))
        sg = cfg.scatter_gather
        self.stages = {}
        users = self.user_inputs(mb)
        for k in sorted(mine):
            ch = self.split.chunks[k]
            phs = list(ch.gm.graph.find_nodes(op="placeholder"))   # in ch.inputs order
            out_node = next(n for n in ch.gm.graph.nodes if n.op == "output")
            in_meta, inputs, example = [], [], []
            for ph, (kind, ref) in zip(phs, ch.inputs):
                if kind == "boundary":
                    meta = _boundary_meta(ph, cfg.tp, sg)
                    in_meta.append(meta)
                    inputs.append(("boundary", ref))
                    example.append(torch.zeros(meta.shape, dtype=meta.dtype,
                                               requires_grad=meta.dtype.is_floating_point))
                else:
                    key = (ph.meta.get("ptdp_input_kind", "user"), ph.meta.get("ptdp_input_name"))
                    inputs.append(("graph", key))
                    example.append(self._value(key, users))
            out_meta = [] if k == p * v - 1 else [
                _boundary_meta(o, cfg.tp, sg) for o in out_node.args[0]]
            # a chunk that sends no input gradient (chunk 0) gains nothing from a split
            fn = compile_graph(ch.gm, example, cfg.codegen, cfg.comm_reorder,
                               split_backward=cfg.split_backward
                               and sends_input_grad(self.schedule, k))
            self.stages[k] = Stage(k, fn, inputs, in_meta, out_meta, self.chunk_params[k])
        tp_size, pp_size = cfg.tp, cfg.pp
        base = coords.dp_rank * pp_size * tp_size + coords.tp_rank   # same dp and tp coords
        self.comm = PipelineComm(coords.pp_rank, lambda q: base + q * tp_size,
                                 coords.group("tp") if cfg.tp > 1 else None, cfg.tp,
                                 coords.tp_rank, pm.timeout_s)
        self.events: list = []

    # ---- inputs --------------------------------------------------------------------------
    @staticmethod
    def _params_of(chunk) -> list:
        return sorted({n.meta["ptdp_input_name"] for n in chunk.gm.graph.find_nodes(op="placeholder")
                       if n.meta.get("ptdp_input_kind") == "param"})

    def user_inputs(self, mb) -> dict:
        return _capture.user_tensors(self.captured, *mb)

    def _value(self, key, users):
        kind, name = key
        if kind == "param":
            return self._pm._params[name]
        if kind == "buffer":
            return self._pm.module.get_buffer(name)
        if kind == "constant":
            return self.captured.constants[name]
        return users[name]

    # ---- tied weights --------------------------------------------------------------------
    @staticmethod
    def _tied_groups(owners: dict, coords) -> list:
        """[(param names, process group)] for parameters living on several pipeline ranks.
        Every rank creates every group, in one order (new_group is collective)."""
        sets = sorted({tuple(sorted(s)) for s in owners.values() if len(s) > 1})
        out = []
        if not sets or coords.mesh is None:
            return out
        tp, pp, dp = coords.tp, coords.pp, coords.dp
        for s in sets:
            names = sorted(n for n, o in owners.items() if tuple(sorted(o)) == s)
            for d in range(dp):
                for t in range(tp):
                    ranks = [d * pp * tp + q * tp + t for q in s]
                    grp = dist.new_group(ranks)
                    if coords.rank in ranks:
                        out.append((names, grp))
        return out

    def reduce_tied_grads(self):
        """Sum each tied parameter's gradient over the pipeline ranks holding it (after
        the data-parallel reduction). The gradient is read where the buckets keep it: the
        fp32 ``main_grad`` under bf16/fp16, else ``grad``. With the distributed optimizer
        the buckets were reduce-scattered over dp, leaving the full buffer with this
        rank's local gradients: their sum over pp is also summed over dp here and handed
        to the buckets (``set_reduced_grad``), which put this rank's range into its shard."""
        params, buckets = self._pm._params, self._pm._buckets
        sharded = hasattr(buckets, "set_reduced_grad")
        for names, grp in self.tied:
            slots = [(p, p.main_grad if getattr(p, "main_grad", None) is not None else p.grad)
                     for p in (params[n] for n in names if n in params)]
            slots = [(p, g) for p, g in slots if g is not None]
            if not slots:
                continue
            ps, grads = zip(*slots)
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=grp)
            if sharded and buckets.reduce:
                dist.all_reduce(flat, group=buckets.group)
            off = 0
            for p, g in zip(ps, grads):
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
                if sharded:
                    buckets.set_reduced_grad(p, g)

    # ---- one step ------------------------------------------------------------------------
    def run(self, microbatches, weights, rng, step, on_last_backward, loss_scale=1.0,
            not_final=None):
        cache: dict = {}

        def graph_value(i, key):
            if i not in cache:
                cache[i] = self.user_inputs(microbatches[i])
            return self._value(key, cache[i])

        run = PipelineRun(self.schedule, self.stages, self.comm, graph_value, weights, rng,
                          step, on_last_backward, loss_scale,
                          split_backward=self._pm.config.split_backward, not_final=not_final)
        loss_sum = run.run()
        self.events = run.events
        return loss_sum

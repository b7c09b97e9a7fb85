"""The pipeline-parallel side of a ParallelModule: it applies a pipeline ``Program``
(``program.build_program`` split the per-rank graph into p·v chunks and compiled the ones
this pipeline rank owns) and runs a step of it under a schedule.

Chunk k lives on pipeline rank k mod p. A parameter read by chunks on several pipeline
ranks (tied embedding / LM head) keeps one copy per rank; its gradient is summed over
those ranks after the data-parallel reduction, through a process group per tied set
(created collectively, in the same order on every rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .program import Program, input_value
from .runtime.pipeline import PipelineComm, PipelineRun
from .schedules import build_schedule


class PipelineRunner:
    """One input signature's pipeline Program, applied on this rank: schedule, tied-weight
    groups, peers, and the step."""

    def __init__(self, pm, program: Program):
        cfg, coords = pm.config, pm.coords
        self._pm = pm
        self.program = program
        self.captured = program.captured
        self.loss_weight = program.loss_weight
        p, v = cfg.pp, cfg.virtual_stages
        self.schedule = build_schedule(cfg.schedule, p, v, cfg.microbatches)
        self.chunk_params = program.stage.chunk_params
        self.owners = program.stage.owners
        self.tied = self._tied_groups(self.owners, coords)
        self.stages = program.chunks
        self.comm = PipelineComm(coords.pp_rank, lambda q: coords.rank_with(pp=q),
                                 coords.group("tp") if cfg.tp > 1 else None, cfg.tp,
                                 coords.tp_rank, pm.timeout_s)
        self.events: list = []

    def user_inputs(self, mb) -> list:
        return self.program.user_inputs(mb)

    def _value(self, key, users):
        pm = self._pm
        return input_value(key, pm._params, pm.module.get_buffer, self.captured.constants,
                           users)

    # ---- tied weights --------------------------------------------------------------------
    @staticmethod
    def _tied_groups(owners: dict, coords) -> list:
        """[(param names, process group)] for parameters living on several pipeline ranks.
        Every rank creates every group, in one order (new_group is collective)."""
        sets = sorted({tuple(sorted(s)) for s in owners.values() if len(s) > 1})
        out = []
        if not sets or coords.mesh is None:
            return out
        from .runtime.mesh import ranks_along
        for s in sets:
            names = sorted(n for n, o in owners.items() if tuple(sorted(o)) == s)
            for ranks in ranks_along({"pp": list(s)}, coords.sizes):
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

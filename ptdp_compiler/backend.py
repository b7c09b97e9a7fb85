"""``ptdp.backend(...)``: the compiler as a ``torch.compile`` backend.

    b = ptdp.backend(tp=2, sequence_parallel=True)
    step = torch.compile(model, backend=b)
    opt = torch.optim.AdamW(b.parameters(), lr=...)      # this rank's shards
    loss = step(input_ids=x, labels=y, use_cache=False).loss
    loss.backward(); opt.step(); opt.zero_grad()

Dynamo hands a backend a graph of torch-level calls whose inputs are the user's
tensors *and the model's full-size parameters and buffers* (identified by each
placeholder's Dynamo source, e.g. ``L['self']._modules['h']._modules['0']
._parameters['weight']``). The backend

1. hands it to ``program.build_program``, like ``parallelize``: it re-captures the graph
   at ATen level (``capture_dynamo.py``: ``torch.export``, non-strict, no decomposition —
   the same IR ``capture.py`` produces, every placeholder labelled param / buffer /
   constant / user), runs the same pass pipeline and compiles the result
   (``codegen.compile_graph``: Inductor by default, regional);
2. applies the Program: keeps this rank's *sharded* copy of every parameter. The
   compiled function ignores the full-size parameters Dynamo passes in and computes
   with the shards, so
   gradients land on ``backend.parameters()`` (give those to the optimizer);
   ``full_grads()`` / ``full_state_dict()`` gather them back to full shapes.

The graph must contain the scalar training loss (a 0-d floating output). With
tensor parallelism the vocabulary-parallel logits never exist in full, so the graph's
other outputs (logits, hidden states) come back as ``None``; with tp=1 they are kept.
With dp > 1 each rank's gradients are averaged over the data-parallel group as they
accumulate (the loss is then the mean of the ranks' losses, as with DDP). With
dp_shard > 1 ``backend.parameters()`` are flat 1/dp_shard pieces, gathered per layer
inside the compiled graph and their gradients reduce-scattered there (FSDP in the graph,
passes/fully_shard.py); the same mean over all data-parallel ranks results.
Pipeline parallelism needs whole-program scheduling: use ``parallelize``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from .config import ParallelConfig
from .errors import ConfigError
from .program import build_program, input_value


class PTDPBackend:
    """A ``torch.compile`` backend applying ptdp's passes; holds this rank's shards."""

    def __init__(self, config: ParallelConfig):
        self.config = config
        self.coords = None
        self._params: dict = {}        # name -> this rank's Parameter (shard)
        self._placements: dict = {}    # name -> Shard | None
        self._fsdp_shapes: dict = {}   # dp_shard: name -> shape before the flat split
        self.programs: list = []       # program.Program per compiled graph
        self.graphs_compiled = 0

    # ---- torch.compile entry ---------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        from .runtime.mesh import build_mesh
        cfg = self.config
        if self.coords is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
            cfg.check_world(world)
            if cfg.cp > 1:
                raise ConfigError("ptdp.backend does not run context parallelism (cp > 1) "
                                  "yet; use ptdp.parallelize(model, cp=...)")
            self.coords = build_mesh(cfg.dp, 1, cfg.tp, 1, cfg.dp_shard)
        program = build_program(gm, cfg, example_inputs, self.coords, from_dynamo=True)
        captured = program.captured
        self._adopt(program.plan, captured.params(example_inputs))
        self.programs.append(program)
        self.graphs_compiled += 1
        fn = program.chunks[0].fn
        keys = [key for _, key in program.chunks[0].inputs]

        def run(*args):
            buffers, users = captured.buffers(args), captured.users(args)
            got = fn(*[input_value(key, self._params, buffers.__getitem__, captured.constants,
                                   users) for key in keys])
            return captured.outputs(list(got))
        return run

    def _adopt(self, plan, full: dict):
        """Create (first graph) or check (later graphs) this rank's parameter shards."""
        from .passes.fully_shard import shard_flat
        from .passes.sharding import shard_tensor
        from .placement import Shard
        t, r = self.config.tp, self.coords.tp_rank
        n, fr = self.config.dp_shard, self.coords.dp_shard_rank
        for name, x in full.items():
            pp = plan.params.get(name)
            pl = pp.placement if pp is not None and isinstance(pp.placement, Shard) else None
            if name in self._params:
                if self._placements.get(name) != pl:
                    raise ConfigError(f"a recompiled graph shards parameter '{name}' differently "
                                      "from the first one; keep the model's inputs uniform")
                continue
            with torch.no_grad():
                local = shard_tensor(x.detach(), pl, t, r)
                if pp is not None and pp.fsdp_numel:   # dp_shard: this rank's flat piece
                    self._fsdp_shapes[name] = tuple(local.shape)
                    local = shard_flat(local, n, fr)
                p = nn.Parameter(local, requires_grad=x.requires_grad)
            self._params[name], self._placements[name] = p, pl
            if self.config.dp * n > 1 and p.requires_grad:
                p.register_post_accumulate_grad_hook(self._dp_average)

    def _dp_average(self, p: torch.Tensor):
        """Mean over the data-parallel ranks, as DDP: a dp_shard gradient arrives summed
        over dp_shard by the graph's reduce-scatter; the rest is summed over dp here."""
        if self.config.dp > 1:
            dist.all_reduce(p.grad, group=self.coords.group("dp"))
        p.grad.div_(self.config.dp * self.config.dp_shard)

    # ---- parameters ------------------------------------------------------------------------
    def parameters(self):
        """This rank's parameter shards (for the optimizer); populated on the first call."""
        if not self._params:
            raise RuntimeError("ptdp.backend has not compiled anything yet: run the compiled "
                               "model once, then build the optimizer over backend.parameters()")
        return iter(self._params.values())

    def named_parameters(self):
        return iter(self._params.items())

    def _gather(self, name: str, local: torch.Tensor) -> torch.Tensor:
        if name in self._fsdp_shapes:
            from .runtime.fully_shard import gather_flat
            local = gather_flat(local, self._fsdp_shapes[name],
                                self.coords.group("dp_shard"), self.config.dp_shard)
        pl = self._placements.get(name)
        if pl is None or self.config.tp == 1:
            return local
        from .passes.sharding import unshard_tensors
        pieces = [torch.empty_like(local) for _ in range(self.config.tp)]
        dist.all_gather(pieces, local.contiguous(), group=self.coords.group("tp"))
        return unshard_tensors(pieces, pl)

    def full_grads(self) -> dict:
        """{parameter name: full-shape gradient}, identical on every rank."""
        return {n: self._gather(n, p.grad.detach().clone() if p.grad is not None
                                else torch.zeros_like(p)) for n, p in self._params.items()}

    def full_state_dict(self) -> dict:
        """{parameter name: full-shape parameter}, identical on every rank."""
        return {n: self._gather(n, p.detach().clone()) for n, p in self._params.items()}

    def graph(self, index: int = -1) -> fx.GraphModule:
        """The transformed per-rank ATen graph of a compiled Dynamo graph."""
        return self.programs[index].gm


def backend(*, tp: int = 1, pp: int = 1, dp: int = 1, dp_shard: int = 1,
            sequence_parallel: bool = False, recompute="none", codegen: str = "inductor",
            seed: int = 0) -> PTDPBackend:
    """A ``torch.compile`` backend running ptdp's passes (tp / sp / dp / recompute) on the
    Dynamo graph, then ``codegen``. Validated here, before any process-group work."""
    if pp != 1:
        raise ConfigError(f"ptdp.backend(pp={pp}): pipeline parallelism schedules the whole "
                          "program across ranks, which a torch.compile backend (one graph at a "
                          "time) cannot do; use ptdp.parallelize(model, pp=...) instead")
    cfg = ParallelConfig(tp=tp, pp=1, dp=dp, dp_shard=dp_shard,
                         sequence_parallel=sequence_parallel,
                         recompute=recompute, codegen=codegen, seed=seed).validate()
    return PTDPBackend(cfg)

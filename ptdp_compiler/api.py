"""``parallelize``: the user-facing entry point, and the ParallelModule it returns."""
from __future__ import annotations

import functools
import math
import inspect as _inspect

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ParallelConfig
from .errors import ConfigError, InputShapeError
from .program import Program, build_program, input_value
from .runtime.executor import run_pipeline_step, run_step, split_microbatches
from .runtime.mesh import build_mesh
from .runtime.rng import RNGTracker


class ProgramRunner:
    """One input signature's Program (pp = 1), applied on this rank: a call runs the
    compiled graph on a microbatch and returns its loss."""

    def __init__(self, pm: "ParallelModule", program: Program):
        self._pm = pm
        self.program = program
        self.captured = program.captured
        self.loss_weight = program.loss_weight
        self.chunk = program.chunks[0]

    def user_inputs(self, mb) -> list:
        return self.program.user_inputs(mb)

    def __call__(self, mb) -> torch.Tensor:
        pm, users = self._pm, self.user_inputs(mb)
        inputs = [input_value(key, pm._params, pm.module.get_buffer, self.captured.constants,
                              users) for _, key in self.chunk.inputs]
        return self.chunk.fn(*inputs)[0]


def _signature(mb) -> tuple:
    from torch.utils import _pytree as pytree
    leaves, spec = pytree.tree_flatten(mb)
    return (str(spec),) + tuple((tuple(l.shape), l.dtype) if isinstance(l, torch.Tensor) else
                                ("const", repr(l)) for l in leaves)


class ParallelModule:
    """A model compiled for this rank's place in the (dp, pp, tp) mesh.

    ``train_step`` runs forward and backward of this rank's slice of the global
    batch and leaves the gradients in ``parameters()``; any torch.optim optimizer
    over ``parameters()`` then takes the step.
    """

    def __init__(self, module: nn.Module, config: ParallelConfig):
        config.validate()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"parallelize expects an nn.Module, got {type(module).__name__}")
        world = dist.get_world_size() if dist.is_initialized() else 1
        config.check_world(world)
        self.config = config
        self.module = module
        from .runtime.precision import cast_module
        cast_module(module, config.precision)  # bf16/fp16: capture sees low-precision weights
        self.coords = build_mesh(config.dp, config.pp, config.tp, config.ep, config.dp_shard,
                                 config.cp)
        self._expert_names: set | None = None  # ep > 1: routed-expert tensors, once compiled
        self._params = dict(module.named_parameters())
        self._full_shapes = {n: tuple(p.shape) for n, p in self._params.items()}
        self._placements: dict | None = None   # name -> Shard over tp, once compiled
        if config.tp > 1 or config.ep > 1 or config.dp_shard > 1:
            # this rank's parameters are Parameters of their own, sharing the module's
            # storage (no copy); once the first Program is built the sharded ones shrink to
            # this rank's shard and the module's full copies are released (_apply_placements)
            self._params = {n: nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                            for n, p in self._params.items()}
        self._tp_group = self.coords.group("tp") if config.tp > 1 else None
        # gradient buckets sum over dp × cp ("grad"; dp_shard sums inside the graph); the
        # loss weights and the reported loss over every rank with other tokens ("batch")
        self._dp_group = self.coords.group_if("grad")
        self._batch_group = self.coords.group_if("batch")
        self._check_same_model()
        self._buckets = self._make_buckets()
        self._rng = RNGTracker(config.seed, self.coords.data_rank, self.coords.pp_rank,
                               self.coords.tp_rank)
        self._pp_group = self.coords.group("pp") if config.pp > 1 else None
        from .runtime.launch import DEFAULT_TIMEOUT_S
        self.timeout_s = DEFAULT_TIMEOUT_S   # every pipeline p2p wait gives up after this
        self._stage_names: list | None = None  # parameters this pipeline rank holds (pp > 1)
        self._programs: dict = {}
        self.train_steps = 0   # train_step calls so far (seeds the per-step RNG streams)
        self._optimizer = None

    def _check_same_model(self):
        """Every rank must pass the same model (same seed): compare a fingerprint."""
        if self.coords.mesh is None:
            return
        with torch.no_grad():  # meta parameters (no values yet) count by their sizes
            fp = torch.stack([torch.tensor([float(p.numel()), 0.0]) if p.is_meta else
                              torch.tensor([p.double().sum().item(), p.double().norm().item()])
                              for p in self._params.values()]).sum(0) if self._params \
                else torch.zeros(2, dtype=torch.float64)
        lo, hi = fp.clone().double(), fp.clone().double()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.allclose(lo, hi, rtol=1e-6, atol=1e-6):
            raise ConfigError("ranks passed different models to parallelize (parameters differ); "
                              "build the model with the same seed on every rank "
                              "(torch.manual_seed(s) before constructing it)")

    # ---- applying a Program (after build_program; compiling never touches this state) ---
    def _apply(self, program: Program):
        """Lay this rank's parameters out as ``program`` says: tp shards, then (pp > 1)
        the pipeline stage's parameters."""
        self._apply_placements(program.placements)
        self._apply_experts(program.plan)
        if program.stage is not None:
            self._apply_stage(program.stage.local_params)
        self._apply_fully_shard(program.plan)

    def _apply_placements(self, placements: dict):
        """Shrink each tp-sharded parameter to this rank's shard (once; the optimizer keeps
        the same Parameter objects) and rebuild the gradient buckets at local sizes."""
        if self.config.tp == 1:
            return
        from .passes.sharding import shard_tensor
        if self._placements is not None:
            if placements != self._placements:
                raise ConfigError("a new input signature produced a different tensor-parallel "
                                  "layout of the parameters; keep the model's inputs uniform")
            return
        t, r = self.config.tp, self.coords.tp_rank
        with torch.no_grad():
            for n, pl in placements.items():
                p = self._params[n]
                p.data = shard_tensor(p.data, pl, t, r)
                self._release_module_weight(n)
        self._placements = placements
        self._rebuild_buckets()

    def _apply_experts(self, plan):
        """ep > 1: keep this rank's block of every routed expert's tensors (once) and bucket
        their gradients over the ranks holding the same experts (runtime/expert_parallel)."""
        if self.config.ep == 1:
            return
        from .runtime import expert_parallel as _ep
        names = _ep.expert_names(plan)
        if self._expert_names is not None:
            if names != self._expert_names:
                raise ConfigError("a new input signature found different routed experts; "
                                  "keep the model's inputs uniform")
            return
        with torch.no_grad():
            for n in names:
                p = self._params[n]
                p.data = _ep.shard_experts(p.data, self.config.ep, self.coords.ep_rank)
                self._release_module_weight(n)
        self._expert_names = names
        self._rebuild_buckets()

    def _release_module_weight(self, name: str):
        """Once this rank's shard of ``name`` is its own Parameter, the module's full
        weight is needed only for its shape (a new input signature is captured from the
        module): a zero-stride view of one element keeps shape and dtype, frees storage."""
        m = self.module.get_parameter(name)
        if not m.is_meta and m.numel() and m.stride() != (0,) * m.dim():
            m.data = torch.zeros((), dtype=m.dtype, device=m.device).expand(m.shape)

    def _rebuild_buckets(self):
        """Gradient buckets for the parameters as they are now (after a layout change)."""
        for h in self._buckets._hooks:
            h.remove()
        self._buckets = self._make_buckets()

    def _apply_fully_shard(self, plan):
        """dp_shard > 1: keep this rank's flat 1/dp_shard of each parameter (once); the
        compiled graph gathers them per layer (passes/fully_shard.py)."""
        if self.config.dp_shard == 1:
            return
        from .runtime.fully_shard import apply_fully_shard
        apply_fully_shard(self, plan)

    def _gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        if name in (getattr(self, "_fsdp_shapes", None) or {}):
            from .runtime.fully_shard import gather_flat
            local = gather_flat(local, self._fsdp_shapes[name], self.coords.group("dp_shard"),
                                self.config.dp_shard)
        if name in (self._expert_names or ()):
            from .runtime.expert_parallel import gather_experts
            local = gather_experts(local, self.coords.group("ep"), self.config.ep)
        pl = (self._placements or {}).get(name)
        if pl is None:
            return local
        from .passes.sharding import unshard_tensors
        pieces = [torch.empty_like(local) for _ in range(self.config.tp)]
        dist.all_gather(pieces, local.contiguous(), group=self._tp_group)
        return unshard_tensors(pieces, pl)

    def _apply_stage(self, names: list):
        """Keep only the parameters this pipeline rank's chunks read (pp > 1); the others
        get no gradient and are not returned by ``parameters()``."""
        if self._stage_names is not None:
            if list(names) != self._stage_names:
                raise ConfigError("a new input signature split the model into different "
                                  "pipeline stages; keep the model's inputs uniform")
            return
        self._stage_names = list(names)
        self._params = {n: self._params[n] for n in names}
        self._rebuild_buckets()

    # ---- training -------------------------------------------------------------------------
    def _program(self, mb, ep_rows_scale: float = 1.0):
        """The applied Program of ``mb``'s input signature (built on first sight);
        ``ep_rows_scale``: ep > 1, the ep group's largest microbatch over this one."""
        key = _signature(mb) + ((("ep_rows_scale", ep_rows_scale),) if ep_rows_scale != 1 else ())
        prog = self._programs.get(key)
        if prog is None:
            self._check_meta_buffers()
            if self.config.memory_limit is not None:   # refused before anything is compiled
                self._check_memory_limit(mb)
            program = build_program(self.module, self.config, mb, self.coords, self._params,
                                    self._full_shapes, ep_rows_scale=ep_rows_scale)
            self._apply(program)
            if self.config.pp > 1:
                from .stages import PipelineRunner
                prog = self._programs[key] = PipelineRunner(self, program)
            else:
                prog = self._programs[key] = ProgramRunner(self, program)
        return prog

    def train_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward + backward of this rank's batch slice; returns the global mean loss."""
        if target is not None and self.config.loss_fn is None:
            raise ConfigError("train_step(target=...) needs parallelize(..., loss_fn=fn)")
        mbs = split_microbatches(args, kwargs, target, self.config.microbatches)
        scales = self._ep_rows_scales(mbs)
        programs = [self._program(mb, s) for mb, s in zip(mbs, scales)]
        if self.config.pp > 1:
            if any(p is not programs[0] for p in programs):
                raise InputShapeError("pipeline parallelism needs every microbatch of a step "
                                      "to have the same shapes (boundary tensors are sized "
                                      "from the graph); pad the batch to uniform shapes")
            loss = run_pipeline_step(programs[0], mbs, self._buckets, self._rng, self.train_steps,
                                     self._batch_group, self._pp_group)
        else:
            loss = run_step(programs, mbs, self._buckets, self._rng, self.train_steps,
                            self._batch_group)
        self.train_steps += 1
        return loss

    def _ep_rows_scales(self, mbs) -> list:
        from .runtime.expert_parallel import rows_scales
        return rows_scales(self, mbs)

    def dp_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice (dim 0) of a global-batch tensor: dp × dp_shard ranks read
        different samples; context-parallel ranks read the same ones."""
        dp, r = self.coords.batch_ranks, self.coords.batch_rank
        if tensor.dim() == 0 or tensor.shape[0] % dp:
            raise InputShapeError(
                f"a global batch of shape {tuple(tensor.shape)} cannot be split evenly over "
                f"dp·dp_shard={dp} ranks; use a global batch size that is a multiple of {dp}")
        per = tensor.shape[0] // dp
        return tensor[r * per:(r + 1) * per]

    # ---- parameters -----------------------------------------------------------------------
    def parameters(self):
        return iter(self._params.values())

    def named_parameters(self):
        return iter(self._params.items())

    def full_grads(self) -> dict:
        """{original name: full-shape gradient}, identical on every rank."""
        return self._gather_stages({
            n: self._gather_full(n, p.grad.detach().clone() if p.grad is not None
                                 else torch.zeros_like(p))
            for n, p in self._params.items()})

    def full_state_dict(self) -> dict:
        """{original name: full-shape parameter}, identical on every rank."""
        return self._gather_stages({n: self._gather_full(n, p.detach().clone())
                                    for n, p in self._params.items()})

    def _gather_stages(self, local: dict) -> dict:
        """Union of every pipeline rank's tensors (pp > 1), in the model's parameter order."""
        if self._pp_group is None:
            return local
        parts = [None] * self.config.pp
        dist.all_gather_object(parts, local, group=self._pp_group)
        merged = {}
        for part in parts:
            for n, t in part.items():
                merged.setdefault(n, t)
        return {n: merged[n] for n in self._full_shapes if n in merged}

    # ---- inspection -----------------------------------------------------------------------
    def timeline(self, path: str | None = None) -> dict:
        """The last step's pipeline schedule as every rank ran it (collective: call on all
        ranks). Writes ``path`` (Chrome trace / Perfetto JSON) and ``path``'s .png picture
        when given; returns {"events": [...], "bubble": measured bubble fraction, ...}."""
        from .timeline import collect, write
        tl = collect(self)
        if path is not None and self.coords.rank == 0:
            write(tl, path)
        return tl

    def graph(self, signature: int = -1):
        """The transformed per-rank FX graph (of the latest compiled input signature)."""
        if not self._programs:
            raise RuntimeError("nothing compiled yet: call train_step once first")
        return list(self._programs.values())[signature].program.gm

    @property
    def plan(self):
        return list(self._programs.values())[-1].program.plan if self._programs else None

    def explain(self) -> str:
        from .explain import explain
        for prog in self._programs.values():   # what each partition saves, per layer
            prog.program.estimate_saved_bytes()
        return explain(self)

    def predict_memory(self, limit=None, program=None, mb=None):
        """This rank's predicted peak memory per step, broken down (planner/memory.py):
        from the latest compiled program, or ``program``; ``mb`` sizes the microbatch."""
        from .planner.memory import parse_bytes, predict_program
        if program is None:
            if not self._programs:
                raise RuntimeError("nothing compiled yet: call pm.compile(batch) first")
            program = list(self._programs.values())[-1].program
        limit = parse_bytes(limit if limit is not None else self.config.memory_limit)
        users = [x for x in getattr(program.captured, "example_user_inputs", ()) or ()
                 if isinstance(x, torch.Tensor) and x.dim()]
        return predict_program(program, self.config, users[0].shape[0] if users else 1,
                               pp_rank=self.coords.pp_rank, limit=limit)

    def _check_memory_limit(self, mb):
        """``memory_limit=``: predict from the transformed graphs (no kernel compiled, no
        gradient, optimizer state or activation allocated) and refuse with the breakdown
        and the cheapest change that fits."""
        from .errors import MemoryLimitError
        from .planner.memory import cheapest_fit_program, refusal
        program = build_program(self.module, self.config, mb, self.coords, self._params,
                                self._full_shapes, until="passes")
        pred = self.predict_memory(program=program)
        worst = torch.tensor([pred.peak], dtype=torch.float64)
        if self.coords.mesh is not None and dist.is_initialized():
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)   # every rank refuses together
        if worst.item() > pred.limit:
            if pred.peak < worst.item():
                raise MemoryLimitError(f"another rank is predicted to need "
                                       f"{worst.item() / 2**30:.2f} GiB, over memory_limit; "
                                       "see that rank's error for the breakdown")
            raise MemoryLimitError(refusal(pred, pred.limit, cheapest_fit_program(pred)))

    def dump(self, path: str, kernels: bool = True) -> str:
        """Write this rank's graphs (per pass, as diffs), one layer drawn, and the generated
        kernel source under ``path/rank{r}``; see ``ptdp_compiler/dump.py``."""
        from .dump import dump_parallel_module
        return dump_parallel_module(self, path, kernels)

    def __repr__(self):
        c = self.config
        extra = "".join(f", {k}={getattr(c, k)}" for k in ("dp_shard", "cp", "ep")
                        if getattr(c, k) > 1)
        return (f"ParallelModule({type(self.module).__name__}, dp={c.dp}, pp={c.pp}, tp={c.tp}"
                f"{extra}, rank={self.coords.rank})")

    @property
    def _grad_size(self) -> int:
        """Ranks of the "grad" group (dp × cp): gradient buckets are summed over them and
        the distributed optimizer shards over them."""
        return self.config.dp * self.config.cp

    @property
    def _grad_rank(self) -> int:
        return self.coords.dp_rank * self.config.cp + self.coords.cp_rank

    # ---- training state (runtime/layout.py, optimizer.py, precision.py, checkpoint.py): they
    # see the model only through _local_layout() and the gradient buckets ---------------------
    def _local_layout(self):
        """Yield a ``LocalParam`` per parameter this rank holds: canonical name, local
        Parameter, placement over tp (None: replicated), ``is_owner`` (the one rank of a
        data-parallel replica that counts it in norms and checkpoints: every tp rank for a
        shard, tp rank 0 for a replicated tensor), full shape. pp > 1 must yield only this
        stage's parameters, a tied weight owned by one of its stages."""
        from .runtime.layout import LocalParam
        t, r = self.config.tp, self.coords.tp_rank
        # pp: a weight on several stages (tied embedding / LM head) is counted by its first
        owners = list(self._programs.values())[-1].program.stage.owners \
            if self.config.pp > 1 and self._programs else None
        for n, p in self._params.items():
            pl = (self._placements or {}).get(n)
            first_stage = owners is None or min(owners.get(n, {self.coords.pp_rank})) == \
                self.coords.pp_rank
            ep = self.config.ep if n in (self._expert_names or ()) else 1
            fsdp = (getattr(self, "_fsdp_shapes", None) or {}).get(n)
            yield LocalParam(n, p, pl, (pl is not None or r == 0) and first_stage,
                             tuple(self._full_shapes[n]), t, r, ep, self.coords.ep_rank,
                             self.config.dp_shard if fsdp else 1, self.coords.dp_shard_rank,
                             fsdp)

    def _layout_final(self) -> bool:
        """Whether ``_local_layout`` is settled (tp shards and pp stages appear on the
        first compile)."""
        return bool(self._programs) or (self.config.tp == 1 and self.config.pp == 1
                                        and self.config.dp_shard == 1)

    def _materialize_meta(self):
        """A model built on the meta device: once this rank's layout is fixed (tp shards and
        pp stage known), give its own parameters real storage: this rank's shards of the
        single-device init after ``pm.init_weights(builder, seed)``, else NaN until
        ``ptdp.load_hf`` / ``pm.load`` write them (the gradient buckets
        and the compiled program need real tensors; the full model is never allocated)."""
        from .runtime.meta_init import materialize_meta
        materialize_meta(self)

    def _check_meta_buffers(self):
        """Before a first compile (not in __init__, where there is no pm yet to call
        init_weights on): a meta buffer left without a value is refused by name."""
        if getattr(self, "_pending_init", None) is not None:
            return
        for name, buf in self.module.named_buffers():
            if buf.is_meta:
                raise ConfigError(f"buffer {name!r} of the meta-built model has no value; "
                                  "build buffers on a real device (only parameters may be "
                                  "on meta), or call pm.init_weights(builder, seed) before "
                                  "the first train_step / compile")

    def init_weights(self, builder, seed: int):
        """Give a meta-built model's shards the numbers ``torch.manual_seed(seed); builder()``
        draws on one CPU device: ``builder`` (e.g. ``lambda: GPT(cfg)``) is replayed keeping
        only this rank's shards, about one full parameter in memory at a time
        (runtime/meta_init.py). Called before the layout is fixed (first compile), it is
        applied then; afterwards, at once. ``pm.init_report`` says what the replay cost."""
        from .runtime.meta_init import request
        return request(self, builder, seed)

    def _make_buckets(self):
        """Gradient buckets for the current parameters: fp32 main grads for bf16/fp16,
        reduce-scatter for the distributed optimizer (runtime/optimizer.py)."""
        from .runtime.optimizer import make_buckets
        self._materialize_meta()
        args = (int(self.config.bucket_mb * 2**20), self.config.precision,
                self.config.distributed_optimizer)
        if self._expert_names:   # ep > 1: expert gradients summed over edp (× cp), not dp
            from .runtime.expert_parallel import ExpertBuckets
            c, experts, cp = self.coords, self._expert_names, self.config.cp
            edp = self.config.dp // self.config.ep * cp
            eg = c.group_if("egrad")
            b = ExpertBuckets(
                make_buckets([p for n, p in self._params.items() if n not in experts],
                             self._dp_group, *args, self._grad_size),
                make_buckets([p for n, p in self._params.items() if n in experts],
                             eg, *args, edp),
                self._dp_group, self._grad_size, self._grad_rank, eg, edp,
                c.edp_rank * cp + c.cp_rank)
        else:
            b = make_buckets(list(self._params.values()), self._dp_group, *args,
                             self._grad_size)
        old = getattr(self, "_buckets", None)
        if old is not None and hasattr(old, "loss_scale"):
            b.loss_scale = old.loss_scale
        return b

    def compile(self, *args, target=None, **kwargs):
        """Capture and compile for this batch's signature without running it (fixes the
        tp/pp layout, e.g. before ``load`` restores optimizer state)."""
        mbs = split_microbatches(args, kwargs, target, self.config.microbatches)
        for mb in mbs:
            self._program(mb)
        return self

    def optimizer(self, optimizer_cls=None, *, max_grad_norm=None, **kwargs):
        """An optimizer over this rank's shards (``torch.optim.AdamW`` by default, any
        elementwise torch optimizer): fp32 masters under bf16/fp16, state sharded over dp
        with ``distributed_optimizer=True``, global-norm clipping with ``max_grad_norm``.
        Step it with ``pm.step()`` (or its own ``step()``)."""
        from .runtime.optimizer import ParallelOptimizer
        self._optimizer = ParallelOptimizer(self, optimizer_cls or torch.optim.AdamW,
                                            max_grad_norm, **kwargs)
        return self._optimizer

    def step(self):
        """Clip and apply the gradients of the last ``train_step``. Returns a StepReport:
        ``skipped=True`` (no update on any rank) when a gradient is inf/NaN."""
        if self._optimizer is None:
            raise ConfigError("pm.step() needs an optimizer: call pm.optimizer(...) first")
        return self._optimizer.step()

    def save(self, path: str, extra=None):
        """Atomic sharded checkpoint (collective): parameters (fp32 masters), optimizer
        state, RNG, step counters and ``extra`` (e.g. data position), loadable at any layout."""
        from .runtime.checkpoint import save
        save(self, path, extra)

    def load(self, path: str):
        """Load a checkpoint saved at any layout (collective); returns its ``extra``."""
        from .runtime.checkpoint import load
        return load(self, path)


def parallelize(model=None, *, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1,
                dp_shard: int = 1, cp: int = 1, reshard_after_forward: bool = True,
                virtual_stages: int = 1,
                precision: str = "fp32", distributed_optimizer: bool = False,
                microbatches: int = 1, sequence_parallel: bool = False, sp_regather: bool = True,
                recompute="none", recompute_pointwise: bool = True,
                schedule: str | None = None, codegen: str = "inductor", loss_fn=None, seed: int = 0, bucket_mb: float = 25.0, scatter_gather: bool = True,
                comm_reorder: bool = False, split_backward: bool = True,
                plan: str | None = None, cluster=None,
                global_batch: int | None = None, example_inputs=None,
                example_kwargs: dict | None = None, strict: bool = False,
                shard_replicated_weights: bool = True, memory_limit=None):
    """Compile ``model`` for (dp, pp, tp) parallel training on this rank.

    ``model`` may be an ``nn.Module`` instance, an ``nn.Module`` subclass or a factory
    function (then every instance/result comes out parallelized), or omitted to use
    ``@parallelize(tp=..., ...)`` as a decorator. The configuration is validated here,
    before any process-group work.

    ``plan="auto"``: the planner chooses tp, pp, dp, virtual_stages, microbatches,
    sequence_parallel and recompute for this world (``cluster``: a ``ptdp.Cluster`` or a
    calibrated cluster file, default this machine), capturing the model once with
    ``example_inputs`` / ``example_kwargs``; ``global_batch`` defaults to their batch
    size. ``pm.auto_plan`` holds the choice and why (ptdp_compiler/planner/auto.py).

    A large weight matrix that tensor parallelism leaves whole on every rank (>= 1 MiB or
    >= 2% of the model) is named in a ``ReplicatedWeightWarning`` with the reason;
    ``strict=True`` makes it a ``ShardingError``. Its compute stays whole, but it is
    stored split over tp and all-gathered where read (``shard_replicated_weights=False``
    keeps it whole, as Megatron does). ``pm.explain()`` lists every parameter's placement
    and why each replicated or gathered one is.

    ``ep`` > 1 (expert parallelism): the routed experts of a mixture-of-experts model are
    split over ep of the dp ranks (ep divides dp), tokens reach them by all-to-all
    (passes/expert_parallel.py); an ``ExpertParallelError`` names what does not fit.

    ``dp_shard`` > 1 (fully sharded data parallelism, ZeRO-3 / FSDP; HSDP beside ``dp``):
    every parameter, its gradient and optimizer state are split over dp_shard ranks; each
    layer's weights are all-gathered inside the compiled graph just before use and their
    gradients reduce-scattered (passes/fully_shard.py). ``cp`` > 1 (context parallelism):
    activations are sharded along the sequence, attention gathers what it needs
    (passes/context_parallel.py). The world is tp·pp·dp·dp_shard·cp ranks.

    ``memory_limit`` (bytes per rank, or a string such as "80GiB"): the layout's peak is
    predicted from the transformed graphs before anything is compiled or allocated
    (planner/memory.py); over the limit, ``MemoryLimitError`` gives the breakdown and the
    cheapest change that fits. With ``plan="auto"`` the planner only proposes layouts
    predicted to fit. ``pm.predict_memory()`` / ``pm.explain()`` show the prediction.
    """
    cfg = ParallelConfig(tp=tp, pp=pp, dp=dp, ep=ep, dp_shard=dp_shard, cp=cp,
                         reshard_after_forward=reshard_after_forward,
                         virtual_stages=virtual_stages,
                         precision=precision, distributed_optimizer=distributed_optimizer,
                         microbatches=microbatches, sequence_parallel=sequence_parallel,
                         sp_regather=sp_regather, recompute=recompute,
                         recompute_pointwise=recompute_pointwise, schedule=schedule,
                         codegen=codegen, loss_fn=loss_fn, seed=seed, bucket_mb=bucket_mb,
                         scatter_gather=scatter_gather, comm_reorder=comm_reorder,
                         split_backward=split_backward, strict=strict,
                         shard_replicated_weights=shard_replicated_weights,
                         memory_limit=memory_limit).validate()
    if plan is not None:
        from .planner.auto import choose_config
        chosen, result = choose_config(model, cfg, plan, cluster, global_batch,
                                       example_inputs, example_kwargs)
        pm = ParallelModule(model, chosen)
        pm.auto_plan = result
        # the batch it planned with: pm.load can fix the layout itself (elastic resume)
        pm._plan_example = (example_inputs, example_kwargs)
        return pm
    if model is None:
        return functools.partial(_wrap, cfg=cfg)
    return _wrap(model, cfg)


def _wrap(model, cfg: ParallelConfig):
    if isinstance(model, nn.Module):
        return ParallelModule(model, cfg)
    if _inspect.isclass(model) and issubclass(model, nn.Module) or callable(model):
        @functools.wraps(model, updated=())
        def build(*args, **kwargs):
            return ParallelModule(model(*args, **kwargs), cfg)
        build.config = cfg
        return build
    raise ConfigError(f"parallelize expects an nn.Module, a Module class or a factory; "
                      f"got {type(model).__name__}")

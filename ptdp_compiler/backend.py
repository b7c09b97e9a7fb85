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

1. re-captures that graph at ATen level with ``torch.export`` (non-strict, no
   decomposition — the same IR ``capture.py`` produces) and labels every placeholder
   ``ptdp_input_kind`` ∈ param / buffer / constant / user with its name, which is what
   the passes read;
2. runs the same pass pipeline as ``parallelize`` (``passes.run_passes``) and compiles
   the result with ``codegen.compile_graph`` (Inductor by default, regional);
3. keeps this rank's *sharded* copy of every parameter. The compiled function ignores
   the full-size parameters Dynamo passes in and computes with the shards, so
   gradients land on ``backend.parameters()`` (give those to the optimizer);
   ``full_grads()`` / ``full_state_dict()`` gather them back to full shapes.

The graph must contain the scalar training loss (a 0-d floating output). With
tensor parallelism the vocabulary-parallel logits never exist in full, so the graph's
other outputs (logits, hidden states) come back as ``None``; with tp=1 they are kept.
With dp > 1 each rank's gradients are averaged over the data-parallel group as they
accumulate (the loss is then the mean of the ranks' losses, as with DDP).
Pipeline parallelism needs whole-program scheduling: use ``parallelize``.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from .config import ParallelConfig
from .errors import CaptureError, ConfigError

_SOURCE_PART = re.compile(
    r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def _source_name(source) -> Optional[str]:
    """``L['self']._modules['h']._modules['0']._parameters['weight']`` → ``h.0.weight``.

    The root is the local or global the module came in as: ``L['self']``, or
    ``L['args'][0]`` when ``forward`` is wrapped by a decorator taking ``*args`` (as
    transformers 5.24's ``@deprecate_kwarg`` wraps ``LlamaForCausalLM.forward``): the
    index is part of the root, not of the name."""
    text = source.name if isinstance(getattr(source, "name", None), str) else source.name()
    m = re.match(r"^[LG]\['[^']+'\](?:\[\d+\])*", text)
    rest = text[m.end():] if m else text
    parts = [a or b or c for a, b, c in _SOURCE_PART.findall(rest)]
    return ".".join(parts) if parts else None


def _input_kinds(gm: fx.GraphModule, example_inputs: list) -> list:
    """Per Dynamo placeholder: (kind, name) with kind param / buffer / user."""
    kinds, users = [], 0
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        ga = ph.meta.get("grapharg")
        src = getattr(ga, "source", None)
        text = ""
        if src is not None:
            text = src.name if isinstance(getattr(src, "name", None), str) else src.name()
        if isinstance(x, nn.Parameter) or "_parameters[" in text:
            kinds.append(("param", _source_name(src) or ph.name))
        elif "_buffers[" in text:
            kinds.append(("buffer", _source_name(src) or ph.name))
        else:
            kinds.append(("user", users))
            users += 1
    return kinds


class _Replay(nn.Module):
    """The Dynamo graph as a module export can trace; node meta (module stacks, stack
    traces) is carried onto the ATen nodes by interpreting under preserve_node_meta."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        from torch.fx import traceback as fx_traceback
        with fx_traceback.preserve_node_meta():
            return fx.Interpreter(self.gm).run(*args)


def _loss_index(gm: fx.GraphModule) -> int:
    out = next(iter(gm.graph.find_nodes(op="output")))
    vals = [a.meta.get("val", a.meta.get("example_value")) if isinstance(a, fx.Node) else None
            for a in out.args[0]]
    for i, v in enumerate(vals):
        if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point:
            return i
    raise ConfigError(
        "ptdp.backend got a graph with no scalar loss output "
        f"(outputs: {[tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in vals]}). "
        "It compiles training steps: the forward and its loss must be in one graph. If "
        "Dynamo split the model (a graph break before the loss; Hugging Face models need "
        "`model.loss_type = 'ForCausalLM'` and `use_cache=False`), remove the break, or "
        "compile a function that returns the loss.")


class PTDPBackend:
    """A ``torch.compile`` backend applying ptdp's passes; holds this rank's shards."""

    def __init__(self, config: ParallelConfig):
        self.config = config
        self.coords = None
        self._params: dict = {}        # name -> this rank's Parameter (shard)
        self._placements: dict = {}    # name -> Shard | None
        self.programs: list = []       # (Captured, Program) per compiled graph
        self.graphs_compiled = 0

    # ---- torch.compile entry ---------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        from . import capture as _capture
        from .codegen import compile_graph
        from .passes import run_passes
        from .runtime.mesh import build_mesh
        cfg = self.config
        if self.coords is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
            cfg.check_world(world)
            self.coords = build_mesh(cfg.dp, 1, cfg.tp)
        kinds = _input_kinds(gm, example_inputs)
        loss_at = _loss_index(gm)
        n_out = len(next(iter(gm.graph.find_nodes(op="output"))).args[0])
        keep = [loss_at] if cfg.tp > 1 else [loss_at] + [i for i in range(n_out) if i != loss_at]
        if cfg.tp > 1 and n_out > 1:
            warnings.warn("ptdp.backend with tp > 1 returns only the loss; the graph's other "
                          f"{n_out - 1} output(s) (e.g. logits) come back as None", stacklevel=2)
        gm = _reorder_outputs(gm, keep)
        captured = self._capture(gm, example_inputs, kinds)
        full = {name: x for (kind, name), x in zip(kinds, example_inputs) if kind == "param"}
        program = run_passes(captured, cfg, self.coords, full,
                             {n: tuple(p.shape) for n, p in full.items()})
        self._adopt(program.plan, full)
        self.programs.append((captured, program))
        ph_kinds = captured.inputs

        def inputs_for(args):
            users = [a for (k, _), a in zip(kinds, args) if k == "user"]
            by_name = {name: a for (k, name), a in zip(kinds, args) if k == "buffer"}
            out = []
            for kind, name in ph_kinds:
                if kind == "param":
                    out.append(self._params[name])
                elif kind == "buffer":
                    out.append(by_name[name])
                elif kind == "constant":
                    out.append(captured.constants[name])
                else:
                    out.append(users[name])
            return out

        fn = compile_graph(program.gm, inputs_for(example_inputs), cfg.codegen)
        self.graphs_compiled += 1

        def run(*args):
            got = list(fn(*inputs_for(args)))
            result = [None] * n_out
            for i, v in zip(keep, got):
                result[i] = v
            return result
        return run

    def _capture(self, gm, example_inputs, kinds):
        """The Dynamo graph at ATen level (torch.export, non-strict), placeholders labelled."""
        from torch.export.graph_signature import InputKind

        from .capture import Captured
        try:
            ep = torch.export.export(_Replay(gm), tuple(example_inputs), strict=False)
        except Exception as e:
            raise CaptureError(f"ptdp.backend could not re-trace Dynamo's graph at ATen level: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                               ) from e
        agm = ep.graph_module
        inputs, u = [], 0
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:   # the replayed graph's args, in order
                inputs.append(kinds[u])
                u += 1
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.BUFFER):
                inputs.append(("constant", spec.target))
            else:
                raise CaptureError(f"unexpected input {spec.kind.name} '{spec.target}' when "
                                   "re-tracing Dynamo's graph")
        for ph, (kind, name) in zip(agm.graph.find_nodes(op="placeholder"), inputs):
            ph.meta["ptdp_input_kind"], ph.meta["ptdp_input_name"] = kind, name
        constants = dict(ep.constants)
        for spec in ep.graph_signature.input_specs:   # lifted buffers of the replay module
            if spec.kind == InputKind.BUFFER and spec.target not in constants:
                constants[spec.target] = ep.state_dict[spec.target]
        users = [x for (k, _), x in zip(kinds, example_inputs) if k == "user"]
        return Captured(gm=agm, inputs=inputs, user_leaf_index=list(range(len(users))),
                        in_spec=None, constants=constants, example_user_inputs=users,
                        param_names={n: n for k, n in kinds if k == "param"})

    def _adopt(self, plan, full: dict):
        """Create (first graph) or check (later graphs) this rank's parameter shards."""
        from .passes.sharding import shard_tensor
        from .placement import Shard
        t, r = self.config.tp, self.coords.tp_rank
        for name, x in full.items():
            pp = plan.params.get(name)
            pl = pp.placement if pp is not None and isinstance(pp.placement, Shard) else None
            if name in self._params:
                if self._placements.get(name) != pl:
                    raise ConfigError(f"a recompiled graph shards parameter '{name}' differently "
                                      "from the first one; keep the model's inputs uniform")
                continue
            with torch.no_grad():
                p = nn.Parameter(shard_tensor(x.detach(), pl, t, r), requires_grad=x.requires_grad)
            self._params[name], self._placements[name] = p, pl
            if self.config.dp > 1 and p.requires_grad:
                p.register_post_accumulate_grad_hook(self._dp_average)

    def _dp_average(self, p: torch.Tensor):
        dist.all_reduce(p.grad, group=self.coords.group("dp"))
        p.grad.div_(self.config.dp)

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
        return self.programs[index][1].gm


def _reorder_outputs(gm: fx.GraphModule, keep: list) -> fx.GraphModule:
    """A copy of ``gm`` returning only outputs ``keep`` (in that order): loss first."""
    g = fx.Graph()
    env = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            outs = n.args[0]
            g.output(tuple(env[outs[i]] if isinstance(outs[i], fx.Node) else outs[i]
                           for i in keep))
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    new = fx.GraphModule(gm, g)
    new.meta.update(getattr(gm, "meta", {}))
    new.graph.eliminate_dead_code()
    new.recompile()
    return new


def backend(*, tp: int = 1, pp: int = 1, dp: int = 1, sequence_parallel: bool = False,
            recompute="none", codegen: str = "inductor", seed: int = 0) -> PTDPBackend:
    """A ``torch.compile`` backend running ptdp's passes (tp / sp / dp / recompute) on the
    Dynamo graph, then ``codegen``. Validated here, before any process-group work."""
    if pp != 1:
        raise ConfigError(f"ptdp.backend(pp={pp}): pipeline parallelism schedules the whole "
                          "program across ranks, which a torch.compile backend (one graph at a "
                          "time) cannot do; use ptdp.parallelize(model, pp=...) instead")
    cfg = ParallelConfig(tp=tp, pp=1, dp=dp, sequence_parallel=sequence_parallel,
                         recompute=recompute, codegen=codegen, seed=seed).validate()
    return PTDPBackend(cfg)

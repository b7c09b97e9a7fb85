"""Front end for ``ptdp.backend``: a Dynamo graph → the same ATen-level FX graph that
``capture.py`` produces for an nn.Module.

Dynamo hands a backend a graph of torch-level calls whose inputs are the user's tensors
*and the model's full-size parameters and buffers* (identified by each placeholder's
Dynamo source, e.g. ``L['self']._modules['h']._modules['0']._parameters['weight']``).
``capture_dynamo_graph`` keeps the graph's scalar loss first (and, unless told to keep
only the loss, its other outputs after it), re-captures it at ATen level with
``torch.export`` (non-strict, no decomposition) and labels every placeholder
``ptdp_input_kind`` ∈ param / buffer / constant / user with its name, which is what the
passes read.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import Captured
from .errors import CaptureError, ConfigError

_SOURCE_PART = re.compile(
    r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


@dataclasses.dataclass
class DynamoCaptured(Captured):
    """A captured Dynamo graph: ``Captured`` plus how Dynamo's own inputs and outputs map
    onto it."""
    # per Dynamo placeholder, in order: (kind, name); kind param / buffer / user (a user
    # input's name is its position among the user inputs)
    dynamo_inputs: list
    # the Dynamo graph's output positions the captured graph returns, in order (loss first)
    kept_outputs: list
    num_outputs: int          # outputs of the Dynamo graph

    def params(self, dynamo_args) -> dict:
        """{name: tensor} of the parameters among Dynamo's arguments."""
        return {name: x for (kind, name), x in zip(self.dynamo_inputs, dynamo_args)
                if kind == "param"}

    def buffers(self, dynamo_args) -> dict:
        return {name: x for (kind, name), x in zip(self.dynamo_inputs, dynamo_args)
                if kind == "buffer"}

    def users(self, dynamo_args) -> list:
        return [x for (kind, _), x in zip(self.dynamo_inputs, dynamo_args) if kind == "user"]

    def outputs(self, got: list) -> list:
        """The Dynamo graph's outputs from the captured graph's (None where not kept)."""
        result = [None] * self.num_outputs
        for i, v in zip(self.kept_outputs, got):
            result[i] = v
        return result


def source_name(source) -> Optional[str]:
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


def input_kinds(gm: fx.GraphModule, example_inputs: list) -> list:
    """Per Dynamo placeholder: (kind, name) with kind param / buffer / user."""
    kinds, users = [], 0
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        ga = ph.meta.get("grapharg")
        src = getattr(ga, "source", None)
        text = ""
        if src is not None:
            text = src.name if isinstance(getattr(src, "name", None), str) else src.name()
        if isinstance(x, nn.Parameter) or "_parameters[" in text:
            kinds.append(("param", source_name(src) or ph.name))
        elif "_buffers[" in text:
            kinds.append(("buffer", source_name(src) or ph.name))
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


def loss_index(gm: fx.GraphModule) -> int:
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


def keep_outputs(gm: fx.GraphModule, keep: list) -> fx.GraphModule:
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


def capture_dynamo_graph(gm: fx.GraphModule, example_inputs: list,
                         loss_only: bool) -> DynamoCaptured:
    """Dynamo's graph at ATen level (torch.export, non-strict), placeholders labelled.
    ``loss_only``: return only the loss (tensor parallelism: vocabulary-parallel logits
    never exist in full); otherwise the loss first, then the graph's other outputs."""
    from torch.export.graph_signature import InputKind
    kinds = input_kinds(gm, example_inputs)
    loss_at = loss_index(gm)
    n_out = len(next(iter(gm.graph.find_nodes(op="output"))).args[0])
    keep = [loss_at] if loss_only else [loss_at] + [i for i in range(n_out) if i != loss_at]
    if loss_only and n_out > 1:
        warnings.warn("ptdp.backend with tp > 1 returns only the loss; the graph's other "
                      f"{n_out - 1} output(s) (e.g. logits) come back as None", stacklevel=4)
    gm = keep_outputs(gm, keep)
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
    return DynamoCaptured(gm=agm, inputs=inputs, user_leaf_index=list(range(len(users))),
                          in_spec=None, constants=constants, example_user_inputs=users,
                          param_names={n: n for k, n in kinds if k == "param"},
                          dynamo_inputs=kinds, kept_outputs=keep, num_outputs=n_out)

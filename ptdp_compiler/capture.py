"""Front end: an unmodified nn.Module's forward (and its loss) → one ATen-level FX graph.

Mechanism, chosen by evidence (torch 2.13, CPU; see ../shared/DESIGN.md):
``torch.export.export(..., strict=False)`` without decomposition.

- It captured the plain GPT and Hugging Face GPT-2, Llama and BERT with exact loss,
  keeping high-level ATen ops (``aten.linear``, ``aten.layer_norm``,
  ``aten.scaled_dot_product_attention``, ``aten.embedding``,
  ``aten.cross_entropy_loss``) that the passes recognise, and ``nn_module_stack``
  plus fake values in ``node.meta``.
- Parameters, buffers and lifted constants become graph inputs, named by the
  ExportedProgram's graph signature; a backend behind Dynamo instead receives
  parameters as anonymous full-size inputs.
- Strict (Dynamo-based) export and ``fx.symbolic_trace`` fail on Hugging Face v5
  models; core-ATen decomposition scatters the patterns the passes look for.

The model is wrapped so the graph has exactly one output, the scalar loss: a
Hugging Face output (with its cache object) is reduced to ``.loss`` inside the
traced function, so non-tensor outputs never reach the graph boundary.
"""
from __future__ import annotations

import dataclasses
import traceback
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree

from .errors import CaptureError, ConfigError


class LossModule(nn.Module):
    """Wraps the user's model so its forward returns only the scalar training loss."""

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, args, kwargs, target=None):
        out = self.model(*args, **kwargs)
        if self.loss_fn is not None:
            return self.loss_fn(out, target)
        return extract_loss(out)


def extract_loss(out):
    """The loss of a model output: a scalar tensor, ``out.loss`` or ``out["loss"]``."""
    if isinstance(out, torch.Tensor):
        if out.dim() != 0:
            raise CaptureError(
                f"the model returned a tensor of shape {tuple(out.shape)}, not a scalar loss; "
                "return the loss from forward, or pass parallelize(..., loss_fn=fn) and "
                "train_step(..., target=...)")
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) \
            and out[0].dim() == 0:
        loss = out[0]
    if not isinstance(loss, torch.Tensor):
        raise CaptureError(
            f"the model's output ({type(out).__name__}) carries no loss: pass labels/targets so "
            "the model computes one, or give parallelize(..., loss_fn=fn) and "
            "train_step(..., target=...)")
    return loss


@dataclasses.dataclass
class Captured:
    """One captured forward: a flat graph ``(*inputs) -> (loss,)`` and what each input is."""
    gm: fx.GraphModule
    # one entry per graph placeholder, in order: (kind, name); kind ∈ param, buffer, constant, user
    inputs: list
    # the user-input leaves of (args, kwargs, target), in pytree order, that are graph inputs
    user_leaf_index: list
    in_spec: Any
    constants: dict
    example_user_inputs: list
    # canonical parameter name (as model.named_parameters() reports it) per exported name
    param_names: dict

    def placeholders(self):
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]


def canonical_param_names(model: nn.Module) -> dict:
    """id(parameter) → name PyTorch reports for it (tied weights: the first name)."""
    return {id(p): n for n, p in model.named_parameters()}


def capture(model: nn.Module, args: tuple, kwargs: dict, target=None,
            loss_fn: Optional[Callable] = None) -> Captured:
    """Capture ``model(*args, **kwargs)`` (its loss) as a flat ATen FX graph.

    Guarantees: one output, a 0-d loss; placeholders ordered params, buffers,
    constants, user tensors; ``node.meta`` has ``val`` (fake tensor),
    ``nn_module_stack`` and ``stack_trace``.
    """
    wrapper = LossModule(model, loss_fn)
    call = (tuple(args), dict(kwargs), target)
    real_device = _meta_capture_device(model, call)
    try:
        ep = torch.export.export(wrapper, _to_meta(call) if real_device else call, strict=False)
    except CaptureError:
        raise
    except Exception as e:  # name the user's source line the tracer stopped at
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/torch/" not in f.filename and "ptdp_compiler" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
        raise CaptureError(
            f"torch.export could not capture the model's forward{where}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\nptdp_compiler needs one graph for the "
            "whole forward and loss: remove data-dependent Python control flow or .item() calls "
            "on tensors in that line, or report the construct.") from e

    sig = ep.graph_signature
    for o in sig.output_specs:
        if o.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(
                f"the forward mutates {o.kind.name.lower()} '{o.target}' in place; "
                "ptdp_compiler supports forwards whose only effect is the loss "
                "(e.g. put BatchNorm-style running statistics in eval mode)")
    ids = canonical_param_names(model)
    inputs, param_names = [], {}
    flat_user, in_spec = pytree.tree_flatten(call)
    user_positions = [i for i, leaf in enumerate(flat_user) if isinstance(leaf, torch.Tensor)]
    user_leaf_index = []
    u = 0
    gm = ep.graph_module
    all_phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(all_phs) != len(sig.input_specs):
        raise CaptureError(f"captured graph has {len(all_phs)} inputs but its signature "
                           f"{len(sig.input_specs)}; report this model")
    for ph, spec in zip(all_phs, sig.input_specs):
        if spec.kind == InputKind.PARAMETER:
            name = spec.target.removeprefix("model.")
            canon = ids[id(model.get_parameter(name))]
            param_names[name] = canon
            inputs.append(("param", canon))
        elif spec.kind == InputKind.BUFFER:
            inputs.append(("buffer", spec.target.removeprefix("model.")))
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            inputs.append(("constant", spec.target))
            c = ep.constants.get(spec.target)
            if isinstance(c, torch.Tensor) and not c.is_meta and c.numel() <= 64:
                # small index lists a sharding rule must read (Falcon's k = qkv[..., [-2], :])
                ph.meta["ptdp_small_constant"] = c.detach().clone()
        elif spec.kind == InputKind.USER_INPUT:
            if not isinstance(spec.arg, TensorArgument):
                if ph.users:  # a Python constant input is baked into the graph
                    raise CaptureError(f"non-tensor input '{ph.name}' is used as a graph value")
                gm.graph.erase_node(ph)
                continue
            inputs.append(("user", u))
            user_leaf_index.append(user_positions[u])
            u += 1
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind.name} for '{spec.target}'")
    constants = dict(ep.constants)
    if real_device is not None:
        _retarget_meta_device(gm, real_device)
        _give_meta_constants_values(constants, sig, model, real_device)
    gm.recompile()
    tensor_phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(tensor_phs) != len(inputs):
        raise CaptureError(
            f"captured graph has {len(tensor_phs)} inputs but the signature names {len(inputs)}; "
            "pass only tensors and plain Python constants to the model")
    for ph, (kind, name) in zip(tensor_phs, inputs):
        ph.meta["ptdp_input_kind"], ph.meta["ptdp_input_name"] = kind, name
    return Captured(
        gm=gm, inputs=inputs, user_leaf_index=user_leaf_index, in_spec=in_spec,
        constants=constants,
        example_user_inputs=[flat_user[i] for i in user_leaf_index], param_names=param_names)


# ---- models built on the meta device ------------------------------------------------------
# A model built under ``with torch.device("meta")`` has no weights to trace with, and
# torch.export refuses to mix its meta parameters with real inputs. Nothing the graph
# computes depends on values, so it is captured with the inputs moved to meta too; the
# device literals the trace then recorded (``arange(..., device=meta)``, also inside
# higher-order-op subgraphs) are the inputs' device, and are rewritten to it; constants
# the trace lifted are re-made there when empty, refused by name otherwise.
def _meta_capture_device(model: nn.Module, call) -> Optional[torch.device]:
    """The inputs' device when ``model`` has meta parameters and real inputs, else None."""
    if not any(p.is_meta for p in model.parameters()):
        return None
    devs = {l.device for l in pytree.tree_leaves(call)
            if isinstance(l, torch.Tensor) and not l.is_meta}
    if len(devs) > 1:
        raise CaptureError(f"the model's inputs are on several devices {sorted(map(str, devs))}")
    return next(iter(devs), None)


def _to_meta(call):
    return pytree.tree_map(lambda l: l.to("meta") if isinstance(l, torch.Tensor) else l, call)


def _retarget_meta_device(gm: fx.GraphModule, device: torch.device):
    """Every ``device=meta`` literal becomes ``device``, in the graph and in the subgraphs
    of its higher-order ops (autocast / set_grad_enabled regions are ``submod_*``
    GraphModules called by ``wrap_with_*`` nodes: RoPE's frequency computation is one)."""
    def fix(a):
        return device if isinstance(a, torch.device) and a.type == "meta" else a
    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            node.args = pytree.tree_map(fix, node.args)
            node.kwargs = pytree.tree_map(fix, node.kwargs)
        if sub is not gm:
            sub.recompile()


def _give_meta_constants_values(constants: dict, sig, model: nn.Module,
                                device: torch.device):
    """Tensors the trace lifted as constants were made on meta too (a forward's
    ``torch.tensor([], device=x.device)``: Hugging Face's KV cache starts from one), so
    they have no values. An empty one needs none: it is re-made on ``device``. One with
    elements cannot be recovered (its data never reached meta) and is refused by name.
    Non-persistent buffers are also listed as constants but are read from the module at
    call time (``pm.init_weights`` gives them the builder's values), so they are left."""
    for spec in sig.input_specs:
        if spec.kind != InputKind.CONSTANT_TENSOR:
            continue
        t = constants.get(spec.target)
        if not isinstance(t, torch.Tensor) or not t.is_meta:
            continue
        if t.numel() == 0:
            constants[spec.target] = torch.empty(t.shape, dtype=t.dtype, device=device)
            continue
        path = spec.target.removeprefix("model.")
        owner, _, leaf = path.rpartition(".")
        try:
            is_attr = isinstance(getattr(model.get_submodule(owner), leaf, None), torch.Tensor)
        except AttributeError:
            is_attr = False
        how = (f"it is a plain tensor attribute of the meta-built module {owner or 'model'!r}: "
               "register it in __init__ with register_buffer(name, t, persistent=False) so "
               "pm.init_weights(builder, seed) gives it its value" if is_attr else
               "the forward makes it from literal data on the inputs' device (e.g. "
               "torch.tensor([...], device=x.device)): make it with a factory the graph "
               "records (torch.full / torch.arange(..., device=x.device)) or as a buffer")
        raise ConfigError(
            f"tensor constant {path!r} {tuple(t.shape)} of the meta-built model was captured on "
            f"meta without values; {how}, or build the model on a real device")


def user_tensors(cap: Captured, args, kwargs, target=None) -> list:
    """The graph's user inputs for a call with the same structure as the captured one."""
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs), target))
    if spec != cap.in_spec:
        raise CaptureError("train_step was called with a different argument structure than the "
                           "first call; keep the same arguments (and keyword names) every step")
    return [flat[i] for i in cap.user_leaf_index]


def source_line(node: fx.Node) -> str:
    """Last user-code frame of a node's stack trace, for error messages."""
    st = node.meta.get("stack_trace") or ""
    lines = [l.strip() for l in st.strip().splitlines() if l.strip().startswith("File")]
    return lines[-1] if lines else "<unknown source line>"

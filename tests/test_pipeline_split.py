"""The pipeline split pass: chunks cut along the residual stream, balanced by cost, that
reproduce the unsplit graph's loss and gradients when run in order."""
import pytest
import torch

import ptdp_compiler as ptdp
from ptdp_compiler.capture import capture
from ptdp_compiler.passes.pipeline_split import legal_cuts, run_sequential, split

from models import assert_close_tensor, batch, build

LAYERS = {"gpt": dict(n_layer=4), "gpt2": dict(n_layer=4), "llama": dict(num_hidden_layers=4),
          "bert": dict(num_hidden_layers=4)}


def graph_inputs(cap, model, args, kwargs):
    users = ptdp.capture.user_tensors(cap, args, kwargs)
    params = dict(model.named_parameters())
    values = {}
    for ph, (kind, name) in zip(cap.placeholders(), cap.inputs):
        if kind == "param":
            values[ph.name] = params[name]
        elif kind == "buffer":
            values[ph.name] = model.get_buffer(name)
        elif kind == "constant":
            values[ph.name] = cap.constants[name]
        else:
            values[ph.name] = users[name]
    return values


@pytest.mark.parametrize("name", ["gpt", "gpt2", "llama", "bert"])
@pytest.mark.parametrize("chunks", [2, 4])
def test_chunks_in_order_match_the_unsplit_graph(name, chunks):
    model = build(name, **LAYERS[name])
    args, kwargs = batch(name, 2)
    cap = capture(model, args, kwargs)
    values = graph_inputs(cap, model, args, kwargs)
    ordered = [values[ph.name] for ph in cap.placeholders()]
    want = cap.gm(*ordered)[0]
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    result = split(cap.gm, chunks)
    assert len(result.chunks) == chunks
    # one residual-stream tensor of shape (b, s, h) crosses every cut
    assert all(len(s) == 1 and s[0] == (2, 16, 32) for s in result.boundary_shapes)
    got = run_sequential(result, values)[0]
    assert_close_tensor("loss", got, want, rtol=1e-6)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    for (n, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        assert_close_tensor(n, g, w, rtol=1e-6)


def test_cuts_fall_on_layer_boundaries_and_balance_cost():
    model = build("gpt", n_layer=4)
    args, kwargs = batch("gpt", 2)
    cap = capture(model, args, kwargs)
    result = split(cap.gm, 4)
    def blocks_in(chunk):
        paths = {v[0] for n in chunk.gm.graph.nodes if n.op == "call_function"
                 for v in (n.meta.get("nn_module_stack") or {}).values()}
        return {".".join(p.split(".")[:3]) for p in paths if p.startswith("model.blocks.")}

    layers_of = [blocks_in(ch) for ch in result.chunks]
    assert [len(l) for l in layers_of] == [1, 1, 1, 1], layers_of
    costs = [c.cost for c in result.chunks]
    assert max(costs) / min(costs) < 1.5  # the LM head weighs on the last chunk, no more


def test_rotary_and_masks_are_recomputed_not_sent():
    """Llama's rotary cos/sin and the causal mask depend on inputs only: each chunk rebuilds them."""
    model = build("llama", num_hidden_layers=4)
    args, kwargs = batch("llama", 2)
    cap = capture(model, args, kwargs)
    result = split(cap.gm, 2)
    assert result.boundary_shapes == [[(2, 16, 32)]]
    for ch in result.chunks:
        # the rotary buffer reaches every chunk as a module input (a placeholder, or a
        # get_attr where export keeps it as an attribute), and cos/sin are computed there
        rotary_in = any("rotary_emb" in str(n.meta.get("ptdp_input_name", ""))
                        for n in ch.gm.graph.find_nodes(op="placeholder")) \
            or any("rotary_emb" in p for p in ch.gm.state_dict())
        assert rotary_in, f"chunk {ch.index} does not take the rotary buffer"
        ops = {getattr(n.target, "__name__", str(n.target)) for m in ch.gm.modules()
               if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
               if n.op == "call_function"}   # also inside autocast-off subgraphs
        assert {"cos.default", "sin.default"} <= ops, f"chunk {ch.index} does not rebuild cos/sin"


def test_more_chunks_than_layers_is_named_error():
    model = build("gpt", n_layer=2)
    args, kwargs = batch("gpt", 2)
    cap = capture(model, args, kwargs)
    with pytest.raises(ptdp.ConfigError, match="only 2 layers"):
        split(cap.gm, 4)
    assert len(legal_cuts(cap.gm)) >= 1

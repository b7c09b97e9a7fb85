"""Codegen: regional compilation (identical layers compiled once), the torch.compile
backend (same passes on Dynamo's graph), and the dump / inspect tools."""
import re
from unittest import mock

import pytest
import torch

import ptdp_compiler as ptdp
from ptdp_compiler.capture import capture, user_tensors
from ptdp_compiler.codegen import compile_stats
from ptdp_compiler.codegen import regional
from ptdp_compiler.codegen.compile import compile_whole_graph

from models import assert_close_tensor, batch, build


def _graph_inputs(cap, model, args, kwargs):
    users = user_tensors(cap, args, kwargs)
    params = dict(model.named_parameters())
    out = []
    for kind, name in cap.inputs:
        out.append(params[name] if kind == "param" else model.get_buffer(name)
                   if kind == "buffer" else cap.constants[name] if kind == "constant"
                   else users[name])
    return out


def test_region_keys_match_identical_layers_only():
    model = build("gpt", n_layer=4)
    args, kwargs = batch("gpt", 2)
    cap = capture(model, args, kwargs)
    regions = regional.split_regions(cap.gm, _graph_inputs(cap, model, args, kwargs))
    keys = [r.key for r in regions]
    # embedding, 4 layers, final norm + head + loss
    assert len(keys) == 6
    assert len(set(keys[1:5])) == 1 and len(set(keys)) == 3
    wider = build("gpt", n_layer=4, n_embd=64)
    capw = capture(wider, args, kwargs)
    kw = [r.key for r in regional.split_regions(capw.gm, _graph_inputs(capw, wider, args, kwargs))]
    assert kw[1] != keys[1], "a layer of another width must not reuse the compiled code"


@pytest.mark.parametrize("name", ["llama"])   # rotary tables: recomputed in every region
def test_regional_matches_whole_graph(name):
    model = build(name, num_hidden_layers=3)
    args, kwargs = batch(name, 2)
    cap = capture(model, args, kwargs)
    inputs = _graph_inputs(cap, model, args, kwargs)
    params = list(model.parameters())
    results = []
    for use_regions in (True, False):
        regional.set_regional(use_regions)
        try:
            fn = ptdp.codegen.compile_graph(cap.gm, inputs, "aot_eager")
        finally:
            regional.set_regional(None)
        assert isinstance(fn, regional.RegionalProgram) == use_regions
        loss = fn(*inputs)[0]
        results.append((loss, torch.autograd.grad(loss, params)))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)   # aot_eager runs the same ATen ops either way
    for (n, _), a, b in zip(model.named_parameters(), g1, g2):
        assert_close_tensor(n, a, b, rtol=1e-6)


def test_deep_model_compiles_no_more_kernels_than_shallow_and_never_recompiles():
    """Real Inductor compiles (tiny widths), with the caches off so kernels are generated."""
    import torch._functorch.config as fconf
    import torch._inductor.config as iconf
    from torch._inductor import metrics
    from torch._inductor.graph import GraphLowering
    seen, sources = {}, []
    with iconf.patch(fx_graph_cache=False), fconf.patch(enable_autograd_cache=False), \
            mock.patch.object(GraphLowering, "save_output_code", staticmethod(sources.append)):
        for layers in (2, 4):
            model = build("gpt", n_layer=layers, n_embd=16, n_head=2)
            args, kwargs = batch("gpt", 2)
            want = model(*args, **kwargs)
            want.backward()
            metrics.generated_kernel_count = 0
            before = compile_stats["compiles"]
            pm = ptdp.parallelize(model, codegen="inductor")
            loss = pm.train_step(*args, **kwargs)
            compiles = compile_stats["compiles"] - before
            seen[layers] = (metrics.generated_kernel_count, compiles)
            assert_close_tensor("loss", loss, want, rtol=1e-5)
            grads = pm.full_grads()
            for n, p in model.named_parameters():
                assert_close_tensor(n, grads[n], p.grad, rtol=1e-4)
            for _ in range(2):
                pm.train_step(*args, **kwargs)
            assert compile_stats["compiles"] - before == compiles, "recompiled after step 1"
    (k2, c2), (k4, c4) = seen[2], seen[4]
    assert k2 > 0 and c2 == 3
    assert k4 <= k2 and c4 == c2
    # one compile per input signature means kernels specialised to it: no size symbols
    # (``s12 = primals_3.size()[0]``) read at run time in any generated module
    assert sources and not [m for src in sources for m in re.findall(r"\n\s+s\d+ = ", src)]


# ---- the torch.compile backend ---------------------------------------------------------------
def _steps_single(name, steps):
    model = build(name)
    model.loss_type = "ForCausalLM"
    args, kwargs = batch(name, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(*args, **kwargs, use_cache=False).loss
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return out


def _steps_backend(name, steps):
    import warnings
    torch._dynamo.reset()
    model = build(name)
    model.loss_type = "ForCausalLM"   # keeps HF's loss in the same Dynamo graph
    args, kwargs = batch(name, 2)
    b = ptdp.backend(tp=2, sequence_parallel=True, codegen="aot_eager")
    step = torch.compile(model, backend=b)
    out, opt = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            loss = step(*args, **kwargs, use_cache=False).loss
            if opt is None:
                opt = torch.optim.SGD(b.parameters(), lr=0.1)
            loss.backward()
            out.append((loss.item(), b.full_grads()))
            opt.step()
            opt.zero_grad()
    local = {n: tuple(p.shape) for n, p in b.named_parameters()}
    return out, b.graphs_compiled, local


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_backend_tp2_sp_trains_like_single_device(world, name):
    want = _steps_single(name, 3)
    results = world(2, _steps_backend, name, 3, timeout=240)
    for got, graphs, local in results:
        assert graphs == 1, "the training step should be one Dynamo graph, compiled once"
        full = dict(build(name).named_parameters())
        assert any(local[n] != tuple(full[n].shape) for n in local), "nothing was sharded"
        for (lw, gw), (lg, gg) in zip(want, got):
            assert abs(lg - lw) <= 1e-5 * abs(lw)
            for n in gw:
                assert_close_tensor(n, gg[n], gw[n], rtol=1e-5)


def test_backend_refuses_pipeline_parallelism_and_bad_config():
    with pytest.raises(ptdp.ConfigError, match="parallelize"):
        ptdp.backend(tp=2, pp=2)
    with pytest.raises(ptdp.ConfigError, match="sequence_parallel"):
        ptdp.backend(tp=1, sequence_parallel=True)


def test_backend_needs_a_loss_in_the_graph():
    model = build("gpt")
    b = ptdp.backend(codegen="aot_eager")
    torch._dynamo.reset()
    f = torch.compile(lambda ids: model.tok_emb(ids), backend=b)
    ids = batch("gpt", 2)[0][0]
    with pytest.raises(Exception, match="no scalar loss"):
        f(ids)


# ---- dump / inspect ----------------------------------------------------------------------------
def _forward_kernel_calls(kernel_dir):
    """kernel_calls of every forward output module in ``kernel_dir``."""
    from ptdp_compiler.dump import kernel_calls
    sources = [f.read_text() for f in sorted(kernel_dir.glob("output_code_*.py"))]
    return [kernel_calls(src) for src in sources
            if re.search(r"# AOT ID: \['\d+_forward'\]", src)]


def test_inspect_writes_every_ranks_graphs_diffs_drawing_and_kernels(tmp_path):
    """inspect at tp=2 x pp=2 + SP: every rank's graphs, the tensor-parallel diff, the layer
    drawing, and rank 0's Inductor kernels, in which the residual add, the dropout mask and
    LayerNorm are one kernel on the sequence shard, launched after the reduce-scatter and
    before the all-gather (one Inductor compile checks both: CI's time)."""
    from ptdp_compiler.dump import inspect_model
    model = build("gpt", n_layer=2, n_embd=16, n_head=2, dropout=0.1)
    args, kwargs = batch("gpt", 2)
    dirs = inspect_model(model, args, kwargs, str(tmp_path), tp=2, pp=2,
                         sequence_parallel=True, kernel_ranks=(0,))
    assert len(dirs) == 4
    for r, d in enumerate(dirs):
        files = set(p.name for p in (tmp_path / f"rank{r}").iterdir())
        assert {"00_captured.py", "01_tensor_parallel+sequence_parallel.diff",
                "summary.txt"} <= files
        assert f"02_chunk{r // 2}.py" in files, "pp rank r//2 owns chunk r//2"
        diff = (tmp_path / f"rank{r}" / "01_tensor_parallel+sequence_parallel.diff")\
            .read_text()
        assert "+" in diff and "ptdp.sp_gather" in diff, "the diff shows the inserted collectives"
        svg = (tmp_path / f"rank{r}" / f"layer_chunk{r // 2}.svg").read_text()
        assert "collectives (red)" in svg and "#e8453c" in svg
    kdir = tmp_path / "rank0" / "kernels" / "chunk0"
    kernels = list(kdir.iterdir())
    # forward and backward output code of the two distinct regions (embedding, layer)
    assert len(kernels) >= 2 and any("def call(" in k.read_text() for k in kernels)
    assert not (tmp_path / "rank1" / "kernels").exists()
    assert "fuses" in (kdir / "fusions.txt").read_text()
    layer = max(_forward_kernel_calls(kdir),
                key=lambda calls: sum(c.name == "ptdp.sp_scatter_bias" for c in calls))
    names = [c.name for c in layer]
    norms = [i for i, c in enumerate(layer) if c.kind == "fused"
             and {"add", "mul", "native_layer_norm"} <= set(c.ops)]
    assert norms, [c.ops for c in layer]
    for i in norms:
        assert "ptdp.sp_scatter_bias" in names[:i] and names[i + 1] == "ptdp.sp_gather", names


# ---- Inductor's compute/communication reordering (comm_reorder=True) ---------------------------
def test_comm_reorder_is_in_the_inductor_cache_key_and_keeps_the_cache_usable():
    """On and off must never share compiled code, and the reorder pass object must pickle
    (an unpicklable one makes Inductor bypass its cache for every reordered graph)."""
    import torch._inductor.config as iconf
    from torch._inductor.codecache import FxGraphCachePickler
    from ptdp_compiler.codegen.inductor_options import reorder_compile_kwargs
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))

    def config_key(patches):   # the config part of Inductor's FX graph / AOTAutograd key
        with iconf.patch(patches):
            return FxGraphCachePickler(gm).get_key(iconf.save_config_portable(
                ignore_private_configs=False, readonly_values=True))
    assert reorder_compile_kwargs(False) == {}
    on = reorder_compile_kwargs(True)
    assert config_key({}) != config_key(on["config_patches"])
    assert config_key(on["config_patches"]) == config_key(reorder_compile_kwargs(True)[
        "config_patches"]), "the key must be stable across compiles, or nothing is reused"
    with pytest.raises(ptdp.ConfigError, match="codegen='inductor'"):
        ptdp.parallelize(build("gpt"), codegen="aot_eager", comm_reorder=True)
    with pytest.raises(ptdp.ConfigError, match="comm_reorder"):
        ptdp.parallelize(build("gpt"), comm_reorder="yes")


def assert_reorder_report(report):
    """comm_reorder=True's report (``inductor_options.reorder_report``) of a tp + SP
    program: forward and backward graphs scheduled, SP all-gathers / reduce-scatters moved
    away from their waits, with more compute between a collective and its wait. Used by
    test_pipeline's whole-stack Inductor case, which compiles with comm_reorder=True (one
    cold Inductor compile for both: CI's time)."""
    assert report, "Inductor scheduled graphs with collectives but reported nothing"
    assert {e["graph"] for e in report} == {"forward", "backward"}
    rows = [c for e in report for c in e["collectives"]]
    ops = {c["op"] for c in rows}
    assert any("all_gather" in o for o in ops) and any("reduce_scatter" in o for o in ops), ops
    moved = [c for c in rows if c["moved"]]
    assert any("all_gather" in c["op"] or "reduce_scatter" in c["op"] for c in moved), rows
    # the point of moving them: more compute between a collective and its wait
    assert any(c["overlap"][1] > c["overlap"][0] for c in moved), rows
    assert all(e["moved"] == [c["op"] for c in e["collectives"] if c["moved"]]
               for e in report)


@pytest.mark.parametrize("codegen", ["aot_eager"])
def test_split_backward_defers_weight_grads_and_matches_the_unsplit_backward(codegen):
    """Each layer's backward compiled as input-gradient and weight-gradient halves: inside
    ``defer_weight_grads`` the weight gradients (and their post-accumulate hooks) wait for
    ``run()``; the result equals the unsplit backward's, with each hook fired once. (Inductor's
    split halves run in test_pipeline's whole-stack Inductor case, interleaved 1F1B.)"""
    from ptdp_compiler.codegen import split_backward as sb
    model = build("gpt", n_layer=2)
    args, kwargs = batch("gpt", 2)
    cap = capture(model, args, kwargs)
    inputs = _graph_inputs(cap, model, args, kwargs)
    params = dict(model.named_parameters())
    ptdp.codegen.compile_graph(cap.gm, inputs, codegen)(*inputs)[0].backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    fired = {n: 0 for n in params}
    for n, p in params.items():
        p.grad = None
        p.register_post_accumulate_grad_hook(lambda _p, n=n: fired.__setitem__(n, fired[n] + 1))
    fn = ptdp.codegen.compile_graph(cap.gm, inputs, codegen, split_backward=True)
    loss = fn(*inputs)[0]
    with sb.defer_weight_grads() as queue:
        loss.backward()
    # both layers and the head deferred; the embedding region has no input gradient to
    # send, so it is not split and its weights' gradients are already there
    assert len(queue) == 3
    layer_params = [n for n in params if n.startswith("blocks.")]
    assert all(params[n].grad is None and fired[n] == 0 for n in layer_params)
    assert params["pos_emb.weight"].grad is not None
    queue.run()
    assert all(fired[n] == 1 for n in layer_params), fired
    for n, p in params.items():
        assert_close_tensor(n, p.grad, want[n], rtol=1e-5)
    # outside defer_weight_grads the split backward computes everything at once
    for p in params.values():
        p.grad = None
    fn(*inputs)[0].backward()
    for n, p in params.items():
        assert_close_tensor(n, p.grad, want[n], rtol=1e-5)


def test_aot_eager_views_run_on_any_strides():
    """AOTAutograd records a view as legal on the fake strides; at run time a few kernels
    hand back other strides (softplus_backward of a transposed input: Qwen3-Next, Doge,
    OLMo-Hybrid crashed). After views_as_reshapes every view runs and computes the same."""
    import torch.fx as fx
    from ptdp_compiler.passes.views_as_reshapes import views_as_reshapes
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.aten.view.default, (x, [-1])))
    gm = fx.GraphModule(torch.nn.Module(), g)
    transposed = torch.arange(12.0).view(3, 4).t()      # what the fake tensor did not have
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(transposed)
    assert torch.equal(views_as_reshapes(gm)(transposed), transposed.reshape(-1))


def _steps_backend_dp_shard(name, steps):
    import warnings
    import torch.distributed as dist
    torch._dynamo.reset()
    model = build(name)
    model.loss_type = "ForCausalLM"
    args, kwargs = batch(name, 4)
    r = dist.get_rank()
    args = tuple(a[2 * r:2 * r + 2].clone() for a in args)
    kwargs = {k: v[2 * r:2 * r + 2].clone() for k, v in kwargs.items()}
    b = ptdp.backend(dp_shard=2, codegen="aot_eager")
    step = torch.compile(model, backend=b)
    out, opt = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            loss = step(*args, **kwargs, use_cache=False).loss
            if opt is None:
                opt = torch.optim.SGD(b.parameters(), lr=0.1)
            loss.backward()
            out.append(b.full_grads())
            opt.step()
            opt.zero_grad()
    held = sum(p.numel() for p in b.parameters())
    return out, held


def test_backend_dp_shard_trains_like_ddp_on_one_device(world):
    """dp_shard=2 through torch.compile: the mean of the two ranks' gradients (DDP's
    semantics), each rank holding half of every parameter."""
    model = build("llama")
    args, kwargs = batch("llama", 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    for _ in range(2):
        opt.zero_grad()
        for r in range(2):
            half = model(*(a[2 * r:2 * r + 2] for a in args), use_cache=False,
                         **{k: v[2 * r:2 * r + 2] for k, v in kwargs.items()}).loss / 2
            half.backward()
        want.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    full = sum(p.numel() for p in model.parameters())
    for got, held in world(2, _steps_backend_dp_shard, "llama", 2, timeout=240):
        assert held <= full / 2 + 64, (held, full)
        for gw, gg in zip(want, got):
            for n in gw:
                assert_close_tensor(n, gg[n], gw[n], rtol=1e-5)


@torch.library.custom_op("ptdp_test::fused_backward", mutates_args=())
def _fused_backward(g: torch.Tensor, x: torch.Tensor,
                    w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused backward in one kernel, as transformers' grouped-GEMM backward is: (grad
    input, grad weight) of y = x @ w."""
    return g @ w.t(), x.t() @ g


@_fused_backward.register_fake
def _(g, x, w):
    return g.new_empty(x.shape), g.new_empty(w.shape)


def test_split_backward_hands_a_fused_backward_to_w_by_its_items():
    """A D-half op with several outputs (grad input for D, grad weight for W, from one
    kernel: transformers' grouped-GEMM backward in MoE layers) reaches W as its items,
    never as a tuple: Inductor compiles graphs that output tensors only (Mixtral and
    DeepSeek-V3 at pp=2 under Inductor failed on it)."""
    import operator
    from torch._inductor.compile_fx import compile_fx_inner
    from torch.fx.experimental.proxy_tensor import make_fx
    from ptdp_compiler.codegen.split_backward import split_backward_graph

    def backward(x, w, g):
        gi, gw = torch.ops.ptdp_test.fused_backward(g, x, w)
        return gi * 2, gw * 3
    inputs = [torch.randn(4, 8), torch.randn(8, 6), torch.randn(4, 6)]
    gm = make_fx(backward)(*inputs)
    sg = split_backward_graph(gm, {1})
    assert sg is not None
    outs = next(iter(sg.d_gm.graph.find_nodes(op="output"))).args[0]
    assert all(not isinstance(o.meta.get("val"), (tuple, list)) for o in outs)
    assert any(o.target is operator.getitem for o in outs)   # the grad-weight item
    d_out = compile_fx_inner(sg.d_gm, inputs)(list(inputs))
    stash = list(d_out[len(sg.d_out_index):])
    w_out = sg.w_gm(*[inputs[i] for i in sg.w_input_index], *stash)
    want = backward(*inputs)
    assert_close_tensor("grad input", d_out[0], want[0], rtol=1e-5)
    assert_close_tensor("grad weight", w_out[0], want[1], rtol=1e-5)

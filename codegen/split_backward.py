"""Split a compiled backward into an input-gradient part and a deferred weight-gradient part.

In a pipeline, the previous stage waits for this chunk's *input* gradient; the weight
gradients are needed only by the optimizer at the end of the step. A chunk that
computes both before sending makes the previous stage wait for work it does not need
(on the critical path of 1F1B: the last microbatch's whole backward on the last stage).
Splitting them is the B/W split of zero-bubble pipelining (Qi et al. 2023); a compiler
can do it without touching the model because it owns the backward graph.

How. AOTAutograd's backward graph returns one gradient per forward input. For a graph
whose weight inputs are known (placeholders with ``ptdp_input_kind == "param"``),
``split_backward_graph`` cuts it in two:

- **D** (input gradients): every node the non-weight gradients need; it also returns
  the intermediate values the weight gradients will read (typically each linear's
  output gradient) — the *stash*;
- **W** (weight gradients): the remaining nodes, reading the backward graph's inputs
  and the stash.

Both halves go to the same compiler as an unsplit backward (Inductor via
``compile_fx``'s ``inner_compile`` hook, or plain FX for ``aot_eager``).

At run time ``SplitBackward`` runs D and then either W right away (the gradients are
then exactly those of the unsplit backward), or — inside ``defer_weight_grads()`` — it
returns ``None`` for the weight gradients and queues W with the parameters it must
accumulate into. The parameters are found on the autograd node itself: a pre-hook
registered on each compiled region's backward node (``track_backward_node``) names the
node about to run, and its ``next_functions`` hold the ``AccumulateGrad`` of every weight
input. ``DeferredWeightGrads.run`` later computes W and accumulates like autograd's
``AccumulateGrad`` does (then calls the parameters' post-accumulate-grad hooks, which is
where data-parallel buckets learn a gradient is ready). When anything about a call
does not fit (a weight input that is not a leaf parameter, e.g. a cast), W runs right
away: deferring is an optimisation and never changes the numbers.

Guarantees: D then W computes the same values as the unsplit graph (each node runs
once, in one of the two halves); with deferral, ``param.grad`` after ``run()`` equals
what the unsplit backward would have accumulated.
"""
from __future__ import annotations

import operator

import collections
import contextlib
import dataclasses
from typing import Callable, Optional

import torch
import torch.fx as fx

from ptdp_compiler.graph_utils import ancestors

# per process: split backward calls that deferred W / ran W inline
split_stats = collections.Counter()


@dataclasses.dataclass
class SplitGraphs:
    d_gm: fx.GraphModule        # (*backward inputs) -> (*input grads, *stash)
    w_gm: fx.GraphModule        # (*W's backward inputs, *stash) -> (*weight grads)
    n_outputs: int              # outputs of the original backward
    d_out_index: list           # original output index of each of D's gradient outputs
    w_out_index: list           # original output index of each of W's outputs
    w_input_index: list         # backward inputs W reads, by position


def weight_input_positions(gm: fx.GraphModule) -> list:
    """Positions of ``gm``'s placeholders that are parameters (their gradients are W's)."""
    return [i for i, ph in enumerate(gm.graph.find_nodes(op="placeholder"))
            if ph.meta.get("ptdp_input_kind") == "param"]


def split_backward_graph(bw: fx.GraphModule, weight_outputs: set) -> Optional[SplitGraphs]:
    """Cut ``bw`` so that outputs at ``weight_outputs`` are computed by a separate graph.

    Returns None when there is nothing to split (no weight gradient, or no other
    gradient: then the whole backward is one or the other)."""
    out_node = next(iter(bw.graph.find_nodes(op="output")))
    outs = list(out_node.args[0])
    phs = list(bw.graph.find_nodes(op="placeholder"))
    d_idx = [i for i, o in enumerate(outs) if isinstance(o, fx.Node) and i not in weight_outputs]
    w_idx = [i for i, o in enumerate(outs) if isinstance(o, fx.Node) and i in weight_outputs]
    if not d_idx or not w_idx:
        return None
    d_nodes = ancestors([outs[i] for i in d_idx])
    w_nodes = ancestors([outs[i] for i in w_idx]) - d_nodes
    # an op of D with several outputs (a fused backward returning grad input and grad
    # weight) is handed to W by its items, never as a tuple: Inductor outputs tensors only
    for n in list(w_nodes):
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in d_nodes:
            w_nodes.discard(n)
            d_nodes.add(n)
    if not any(n.op == "call_function" for n in w_nodes):
        return None            # every weight gradient is a by-product of D: nothing to defer
    # W reads: backward inputs (placeholders) and D's values (the stash)
    w_inputs, stash = [], []
    for n in bw.graph.nodes:
        if n not in w_nodes or n.op == "placeholder":
            continue
        for a in n.all_input_nodes:
            if a.op == "placeholder" and a not in w_inputs:
                w_inputs.append(a)
            elif a in d_nodes and a.op != "placeholder" and a not in stash:
                stash.append(a)
    for i in w_idx:             # a weight gradient that IS a backward input or a D value
        o = outs[i]
        if o.op == "placeholder" and o not in w_inputs:
            w_inputs.append(o)
        elif o in d_nodes and o.op != "placeholder" and o not in stash:
            stash.append(o)
    w_inputs.sort(key=phs.index)

    # D: the whole input list (AOTAutograd's calling convention), D's nodes, grads + stash
    dg = fx.Graph()
    env: dict = {}
    for n in bw.graph.nodes:
        if n.op == "placeholder" or (n in d_nodes and n.op != "output"):
            env[n] = dg.node_copy(n, env.__getitem__)
    dg.output(tuple(env[outs[i]] for i in d_idx) + tuple(env[s] for s in stash))
    # W: its backward inputs, then the stash as placeholders
    wg = fx.Graph()
    wenv: dict = {}
    for p in w_inputs:
        wenv[p] = wg.node_copy(p)
    for j, s in enumerate(stash):
        ph = wg.placeholder(f"stash_{j}")
        ph.meta.update(s.meta)
        wenv[s] = ph
    for n in bw.graph.nodes:
        if n in w_nodes and n.op == "call_function":
            wenv[n] = wg.node_copy(n, wenv.__getitem__)
    wg.output(tuple(wenv[outs[i]] for i in w_idx))
    d_gm, w_gm = fx.GraphModule(bw, dg), fx.GraphModule(bw, wg)
    d_gm.graph.lint()
    w_gm.graph.lint()
    return SplitGraphs(d_gm, w_gm, len(outs), d_idx, w_idx, [phs.index(p) for p in w_inputs])


def w_example_inputs(sg: SplitGraphs, bw_inputs: list) -> list:
    """Compile-time example inputs of W: the backward's own for the backward inputs it
    reads, the fake values of D's outputs for the stash."""
    stash = list(sg.w_gm.graph.find_nodes(op="placeholder"))[len(sg.w_input_index):]
    return [bw_inputs[i] for i in sg.w_input_index] + [ph.meta.get("val") for ph in stash]


# ---- run time ------------------------------------------------------------------------------
class DeferredWeightGrads:
    """Weight-gradient work queued by the backward passes run under ``defer_weight_grads``."""

    def __init__(self):
        self.jobs: list = []
        self._silenced: dict = {}      # param -> its post-accumulate hooks, held back

    def silence(self, params):
        """Hold back ``params``' post-accumulate-grad hooks until the backward returns.

        Autograd runs a leaf's AccumulateGrad — and its post-accumulate hooks — even when
        the gradient is None, so a data-parallel bucket would take the parameter's
        gradient as final before the deferred weight gradient is added."""
        for p in params:
            hooks = getattr(p, "_post_accumulate_grad_hooks", None)
            if p is not None and hooks and p not in self._silenced:
                self._silenced[p] = dict(hooks)
                hooks.clear()

    def restore_hooks(self):
        for p, saved in self._silenced.items():
            p._post_accumulate_grad_hooks.update(saved)
        self._silenced = {}

    def __len__(self):
        return len(self.jobs)

    def run(self):
        """Compute every queued weight gradient and accumulate it into ``param.grad``."""
        jobs, self.jobs = self.jobs, []
        for w_fn, w_args, params in jobs:
            for p, g in zip(params, w_fn(w_args)):
                if g is not None:
                    _accumulate(p, g)


def _accumulate(p: torch.Tensor, g: torch.Tensor):
    """What autograd's AccumulateGrad does for a leaf, then its post-accumulate hooks."""
    with torch.no_grad():
        if p.grad is None:
            p.grad = g.detach()
        else:
            p.grad.add_(g)
    hooks = getattr(p, "_post_accumulate_grad_hooks", None) or {}
    for hook in list(hooks.values()):
        hook(p)


_queue: Optional[DeferredWeightGrads] = None
_current_node = None        # the compiled backward node the autograd engine runs next


@contextlib.contextmanager
def defer_weight_grads():
    """Backward passes run inside queue their weight gradients instead of computing them;
    call ``.run()`` on the yielded queue to compute and accumulate them."""
    global _queue
    prev, _queue = _queue, DeferredWeightGrads()
    try:
        yield _queue
    finally:
        _queue.restore_hooks()
        _queue = prev


def _compiled_backward_node(outputs):
    """The autograd node of a compiled region call (AOTAutograd's CompiledFunction), found
    from the call's outputs (possibly behind view nodes AOTAutograd regenerates)."""
    todo = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    for _ in range(4):
        nxt = []
        for fn in todo:
            if "CompiledFunctionBackward" in fn.name():
                return fn
            nxt.extend(f for f, _ in fn.next_functions if f is not None)
        todo = nxt
    return None


def _set_current(node):
    def prehook(grad_outputs):
        global _current_node
        _current_node = node
    return prehook


def track_backward_node(outputs) -> None:
    """Name this call's backward node to ``SplitBackward`` when the engine runs it."""
    node = _compiled_backward_node(outputs)
    if node is not None:
        node.register_prehook(_set_current(node))


def _weight_params(node, w_out_index: list):
    """The leaf parameter behind each weight output of ``node``, or None if any is not one."""
    if node is None:
        return None
    nf = node.next_functions
    params = []
    for i in w_out_index:
        if i >= len(nf):
            return None
        fn = nf[i][0]
        if fn is None:
            params.append(None)          # input did not require grad after all
            continue
        if fn.name() != "torch::autograd::AccumulateGrad":
            return None
        params.append(fn.variable)
    return params


class SplitBackward:
    """A compiled backward as two compiled halves (boxed calling convention: a list)."""

    def __init__(self, sg: SplitGraphs, d_fn: Callable, w_fn: Callable):
        self.sg, self.d_fn, self.w_fn = sg, d_fn, w_fn
        self._boxed_call = True     # an instance attribute: wrappers copy __dict__

    def __call__(self, args):
        global _current_node
        sg = self.sg
        args = list(args)
        w_args = [args[i] for i in sg.w_input_index]
        node, _current_node = _current_node, None
        d_out = list(self.d_fn(args))
        args.clear()
        n_d = len(sg.d_out_index)
        w_args += d_out[n_d:]
        grads: list = [None] * sg.n_outputs
        for i, g in zip(sg.d_out_index, d_out[:n_d]):
            grads[i] = g
        params = _weight_params(node, sg.w_out_index) if _queue is not None else None
        if params is not None:
            _queue.silence(params)
            _queue.jobs.append((self.w_fn, w_args, params))
            split_stats["deferred"] += 1
        else:
            for i, g in zip(sg.w_out_index, self.w_fn(w_args)):
                grads[i] = g
            split_stats["inline"] += 1
        return grads


def boxed_fx(gm: fx.GraphModule) -> Callable:
    """``gm`` as a boxed callable (a list in, a list out), as ``aot_eager`` runs graphs."""
    def run(args):
        out = gm(*args)
        args.clear()
        return list(out)
    return run


try:   # Inductor's compiled-graph interface (what compile_fx's inner_compile returns)
    from torch._inductor.output_code import OutputCode as _OutputCode
except ImportError:  # pragma: no cover
    _OutputCode = object


class SplitBackwardCode(SplitBackward, _OutputCode):
    """``SplitBackward`` over two Inductor-compiled halves, returned from ``inner_compile``."""

    def post_compile(self, example_inputs, constants, graph_kwargs) -> None:
        pass    # each half was post-compiled by compile_fx_inner

    def prepare_for_serialization(self) -> None:
        raise RuntimeError("a split backward is not cached by AOTAutograd")

    def set_triton_bundle(self, triton_bundle) -> None:
        pass

"""``pm.dump(path)`` and ``python -m ptdp_compiler inspect``: what the compiler produced, on disk.

Per rank and chunk (``rank{r}/``):

    00_captured.py            the captured ATen graph (readable FX code)
    01_<pass>.py / .diff      the graph after each graph-changing pass, and the unified
                              diff against the graph before it
    chunk{k}.py               pipeline chunk k of this rank (pp > 1), and its diff view
    layer_chunk{k}.svg        one transformer layer of chunk k drawn top to bottom,
                              collectives in red, matmuls in blue (named by their weight's
                              module): the most repeated region holding attention or two or
                              more weight matmuls, found from dataflow (``segments``)
    embedding_chunk{k}.svg,   the embedding and the head + loss regions, where the chunk
    head_chunk{k}.svg         has them, each labelled as what it is
    kernels/…                 the generated kernel source (Inductor's output code) of every
                              distinct compiled region of every chunk, and fusions.txt:
                              each module's kernels in launch order, the ops every fused
                              kernel holds, GEMM library calls and collectives between them
    summary.txt               pass log, regions, collectives, compiled-region counts

The inspect command builds every rank's graphs in this one process with a ``fake``
process group (``FakeStore``): collectives are recorded in the graph, never run.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import operator
import os
import re
from typing import Optional

import torch
import torch.fx as fx

TORCH_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional")
_aten = torch.ops.aten
_MATMULS = frozenset({_aten.linear, _aten.mm, _aten.addmm, _aten.bmm, _aten.matmul,
                      _aten.scaled_dot_product_attention, _aten.embedding})   # drawn blue


def is_collective(n: fx.Node) -> bool:
    """A torch functional collective or one of ptdp's (``collectives.TP_COLLECTIVES``),
    not another ptdp op such as the dropout-mask one."""
    from .collectives import TP_COLLECTIVES
    return n.op == "call_function" and (
        n.target in TP_COLLECTIVES
        or getattr(n.target, "namespace", None) in TORCH_COLLECTIVE_NAMESPACES)


@functools.lru_cache(maxsize=1)
def _ptdp_collective_names() -> frozenset:
    from .collectives import TP_COLLECTIVES
    return frozenset(str(op).rsplit(".", 1)[0] for op in TP_COLLECTIVES)


def is_collective_op(name: str) -> bool:
    """``is_collective`` for an op named ``namespace.op`` in generated code."""
    return name.split(".", 1)[0] in TORCH_COLLECTIVE_NAMESPACES or \
        name in _ptdp_collective_names()


def readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def _write(path: str, text: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _diff(a: str, b: str, name_a: str, name_b: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), name_a, name_b,
                                         n=2))


# ---- drawing --------------------------------------------------------------------------------
@dataclasses.dataclass
class Segment:
    """One region of a chunk (the regional compiler's cut: one layer, or the embedding /
    head around them), classified from its dataflow."""
    kind: str               # "layer" | "embedding" | "head" | joined ("embedding+layer") | "other"
    gm: fx.GraphModule
    count: int              # regions of the chunk with the same structure (this one included)
    weight_matmuls: int     # matmuls / linears / lookups that read a parameter
    collectives: int


def _weight_derived(gm: fx.GraphModule) -> set:
    """Parameters, and values computed from parameters alone (a transpose, an ``f`` on a
    weight): what a matmul reading a weight reads."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.meta.get("ptdp_input_kind") == "param":
                out.add(n)
        elif n.op == "call_function" and n.all_input_nodes and \
                all(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def classify(gm: fx.GraphModule, count: int = 1) -> Segment:
    """What a region is, by dataflow (never by names): a lookup on a weight: the
    embedding; attention or two or more matmuls on weights: a transformer layer; a scalar
    output (the loss): the head."""
    weights = _weight_derived(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    packets = [getattr(n.target, "overloadpacket", n.target) for n in calls]
    reads_weight = [any(a in weights for a in n.all_input_nodes) for n in calls]
    lookups = sum(1 for p, w in zip(packets, reads_weight) if p is _aten.embedding and w)
    matmuls = sum(1 for p, w in zip(packets, reads_weight) if w and
                  (p in _MATMULS or "grouped_mm" in str(p)) and p is not _aten.embedding)
    attention = any(p in (_aten.scaled_dot_product_attention, _aten._softmax, _aten.softmax)
                    for p in packets)
    out = next(iter(gm.graph.find_nodes(op="output")))
    scalar = any(isinstance(getattr(a, "meta", {}).get("val"), torch.Tensor)
                 and a.meta["val"].dim() == 0 for a in out.all_input_nodes)
    # a region can hold two of them where the cutter found no single-tensor cut between
    # (Hugging Face Llama: the embedding and the first layer share one region)
    parts = [name for name, present in (("embedding", lookups), ("layer", attention or
                                                                  matmuls >= 2),
                                        ("head", scalar)) if present]
    return Segment("+".join(parts) or "other", gm, count, matmuls + lookups,
                   sum(1 for n in calls if is_collective(n)))


SEGMENT_TITLES = {"layer": "one transformer layer", "embedding": "the embedding",
                  "head": "the head and loss",
                  "embedding+layer": "the embedding and the first layer (one region)",
                  "layer+head": "the last layer, head and loss (one region)"}


def segments(gm: fx.GraphModule) -> list:
    """Every region of ``gm`` in order, classified (``classify``); the whole graph as one
    region when the cutter finds no cut."""
    from .codegen.regional import split_regions
    ph = list(gm.graph.find_nodes(op="placeholder"))
    try:
        regions = split_regions(gm, [None] * len(ph))
    except Exception:   # a graph the region cutter cannot handle: one segment
        regions = []
    if not regions:
        return [classify(gm)]
    counts = collections.Counter(r.key for r in regions)
    return [classify(r.gm, counts[r.key]) for r in regions]


def pick_layer(gm: fx.GraphModule) -> fx.GraphModule:
    """The transformer layer ``dump`` draws (see ``dump_rank``); the whole graph when no
    region is a layer."""
    seg = _pick(segments(gm), "layer")
    return gm if seg is None else seg.gm


def _pick(segs: list, kind: str) -> Optional[Segment]:
    """The segment of ``kind`` to draw: a region that is only that, else one that holds it
    with another; the most repeated, then the one with most weight matmuls (a full
    attention + MLP block over a dense-only first layer of an MoE model)."""
    mine = [s for s in segs if s.kind == kind] or \
        [s for s in segs if kind in s.kind.split("+")]
    return max(mine, key=lambda s: (s.count, s.weight_matmuls, s.collectives), default=None)


def _from_inputs_alone(gm: fx.GraphModule) -> set:
    """Nodes computed from token ids, buffers and constants only: no parameter and no
    activation (a region's boundary input carries no input kind) among their sources."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.meta.get("ptdp_input_kind") in ("user", "buffer", "constant"):
                out.add(n)
        elif n.op == "get_attr" or (n.op == "call_function" and
                                    all(a in out for a in n.all_input_nodes)):
            out.add(n)
    return out


def weight_name(n: fx.Node) -> str:
    """The module a matmul's weight belongs to (``q_proj`` of ``model.layers.1.self_attn
    .q_proj.weight``), for the drawing's labels only: roles are decided by dataflow."""
    for a in n.all_input_nodes:
        for src in [a] + list(a.all_input_nodes):   # the weight, or an f / view of it
            name = src.meta.get("ptdp_input_name") if src.op == "placeholder" and \
                src.meta.get("ptdp_input_kind") == "param" else None
            if isinstance(name, str):
                parts = name.split(".")
                return parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") \
                    else parts[-1]
    return ""


def draw_graph(gm: fx.GraphModule, path: str, title: str = "") -> Optional[str]:
    """Draw ``gm`` as a layered DAG (matplotlib; SVG or PNG by extension). Collectives red."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # parameters are left out (they would make a wide top row); getitem adds no information;
    # values computed from the inputs alone (masks, positions, rotary tables: recomputed in
    # every region) are counted in the title, not drawn: the picture is the layer's dataflow
    hidden = _from_inputs_alone(gm)
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function", "get_attr")
             and n.meta.get("ptdp_input_kind") != "param" and n not in hidden
             and not (n.op == "call_function" and n.target is operator.getitem)]
    keep = set(nodes)
    level = {}
    for n in gm.graph.nodes:
        if n not in keep:
            continue
        ins = [a for a in n.all_input_nodes if a in keep]
        level[n] = 1 + max((level[a] for a in ins), default=-1)
    rows = collections.defaultdict(list)
    for n in nodes:
        rows[level[n]].append(n)
    width = max(len(r) for r in rows.values())
    pos = {}
    for lv, row in rows.items():
        for i, n in enumerate(row):
            pos[n] = ((i + 0.5) * width / len(row), -lv)
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * width), max(4, 0.55 * len(rows))))
    for n in nodes:
        for a in n.all_input_nodes:
            if a in pos:
                (x0, y0), (x1, y1) = pos[a], pos[n]
                ax.annotate("", xy=(x1, y1 + 0.18), xytext=(x0, y0 - 0.18),
                            arrowprops=dict(arrowstyle="->", color="0.6", lw=0.6))
    for n in nodes:
        x, y = pos[n]
        op = str(n.target).split(".")[-2] if n.op == "call_function" and "." in str(n.target) \
            else (n.op if n.op != "placeholder" else n.name)
        if is_collective(n):
            face, label = "#e8453c", str(n.target).replace("ptdp.", "").split(".")[0]
        elif n.op == "placeholder":
            kind = n.meta.get("ptdp_input_kind", "in")
            face, label = "#d9d9d9", f"{kind}: {n.meta.get('ptdp_input_name', n.name)}"[-28:]
        elif n.op == "call_function" and getattr(n.target, "overloadpacket", None) in _MATMULS:
            face, label = "#5b8def", f"{op} {weight_name(n)}".rstrip()
        else:
            face, label = "#f4f4f4", op
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            label += f"\n{list(v.shape)}"
        ax.text(x, y, label, ha="center", va="center", fontsize=6,
                bbox=dict(boxstyle="round,pad=0.25", fc=face, ec="0.3", lw=0.5))
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-len(rows), 1)
    ax.axis("off")
    ncoll = sum(1 for n in nodes if is_collective(n))
    nhid = sum(1 for n in hidden if n.op == "call_function")
    ax.set_title(f"{title} — {len(nodes)} nodes, {ncoll} collectives (red)" +
                 (f"; {nhid} ops on the inputs alone (masks, positions, rotary) not drawn"
                  if nhid else ""), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- kernels --------------------------------------------------------------------------------
# Inductor names a generated kernel after the ATen ops fused into it ("original_aten"
# descriptive names): cpp_fused_add_native_dropout_native_layer_norm_5 on CPU,
# triton_poi_fused_add_gelu_3 / triton_red_fused_… / triton_per_fused_… on CUDA
_FUSED = re.compile(r"^\s+((?:cpp|triton_(?:poi|red|per|tem))_fused_(\w+?)_\d+)(?:\.run)?\(")
_EXTERN = re.compile(r"extern_kernels\.(\w+)\(")
_TORCH_OP = re.compile(r"torch\.ops\.(\w+)\.(\w+)\.\w+\(")


@dataclasses.dataclass
class KernelCall:
    kind: str          # fused (generated by Inductor) | extern (GEMM library) | collective | op
    name: str          # kernel name, or namespace.op
    ops: tuple = ()    # fused kernels: the ops in it, as Inductor's name lists them


def _op_names() -> frozenset:
    # not cached: ops registered later (ptdp's collectives on import) must be known
    return frozenset(n.split("::", 1)[1].split(".", 1)[0]
                     for n in torch._C._dispatch_get_all_op_names() if "::" in n)


def split_op_names(joined: str, known: Optional[frozenset] = None) -> tuple:
    """``add_native_dropout_native_layer_norm`` → ``("add", "native_dropout",
    "native_layer_norm")``: the fewest registered op names whose ``_``-join is ``joined``
    (op names contain ``_`` themselves), or ``(joined,)`` when no split exists."""
    known = known if known is not None else _op_names()
    toks = joined.split("_")
    best = {0: ()}   # best[i]: the split of toks[:i] with the fewest names
    for i in range(len(toks)):
        if i not in best:
            continue
        for j in range(i + 1, len(toks) + 1):
            name = "_".join(toks[i:j])
            if name in known and (j not in best or len(best[j]) > len(best[i]) + 1):
                best[j] = best[i] + (name,)
    return best.get(len(toks), (joined,))


def kernel_calls(source: str) -> list:
    """Every kernel one Inductor output module launches, in launch order (parsed from
    its ``call``): what was fused into which kernel, which matmuls went to the GEMM
    library, and where the collectives sit between them."""
    body = source.split("def call(", 1)[-1]
    calls, known = [], _op_names()
    for line in body.splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = _FUSED.match(line)
        if m:
            calls.append(KernelCall("fused", m.group(1), split_op_names(m.group(2), known)))
            continue
        m = _EXTERN.search(line)
        if m:
            calls.append(KernelCall("extern", m.group(1)))
            continue
        m = _TORCH_OP.search(line)
        if m and m.group(1) != "inductor":
            name = f"{m.group(1)}.{m.group(2)}"
            calls.append(KernelCall("collective" if is_collective_op(name) else "op", name))
    return calls


def kernel_report(sources: dict) -> str:
    """``fusions.txt``: per output module (forward/backward of one distinct region), its
    kernels in launch order with the ops each fused kernel holds."""
    out = []
    for fname, src in sources.items():
        aot = re.search(r"# AOT ID: \['([^']*)'\]", src)
        calls = kernel_calls(src)
        count = collections.Counter(c.kind for c in calls)
        out.append(f"{fname} ({aot.group(1) if aot else 'graph'}): {count['fused']} fused "
                   f"kernels, {count['extern']} library calls (GEMMs), {count['collective']} "
                   f"collectives, {count['op']} other ops run as fallbacks")
        for c in calls:
            if c.kind == "fused":
                out.append(f"  {c.name}\n      fuses {' + '.join(c.ops)}")
            else:
                out.append(f"  {c.kind + ': ' + c.name}")
        out.append("")
    return "\n".join(out)


def compile_kernels(gm: fx.GraphModule, out_dir: str) -> int:
    """Compile ``gm`` with Inductor (regionally) and write every generated output module
    (wrapper + kernels) to ``out_dir``; returns the number of files written."""
    from torch._inductor.graph import GraphLowering

    from .codegen import compile_graph
    from .codegen.regional import example_tensor
    sources: list = []
    original = GraphLowering.save_output_code
    GraphLowering.save_output_code = staticmethod(lambda code: sources.append(code))
    try:
        inputs = []
        for ph in gm.graph.find_nodes(op="placeholder"):
            kind = ph.meta.get("ptdp_input_kind")
            inputs.append(example_tensor(ph, requires_grad=kind in ("param", None)))
        import torch._functorch.config as fconf
        with fconf.patch(force_non_lazy_backward_lowering=True):   # backward kernels too
            compile_graph(gm, inputs, "inductor")
    finally:
        GraphLowering.save_output_code = original
    seen = []
    for src in sources:
        if src not in seen:
            seen.append(src)
    named = {f"output_code_{i:02d}.py": src for i, src in enumerate(seen)}
    for fname, src in named.items():
        _write(os.path.join(out_dir, fname), src)
    _write(os.path.join(out_dir, "fusions.txt"), kernel_report(named))
    return len(seen)


# ---- one rank -------------------------------------------------------------------------------
def dump_rank(out_dir: str, program, kernels: bool = True, header: str = "") -> dict:
    """Write one rank's files (see module doc) for a ``program.Program``: its pipeline
    chunks (pp > 1) or the whole program as one chunk."""
    os.makedirs(out_dir, exist_ok=True)
    before = readable(program.captured.gm)
    _write(os.path.join(out_dir, "00_captured.py"), before)
    after = readable(program.gm)
    stages = [name for name, _ in program.plan.pass_log]
    changed = "tensor_parallel" in stages
    name = "+".join(s for s in stages if s in ("tensor_parallel", "sequence_parallel")) \
        if changed else "passes"
    _write(os.path.join(out_dir, f"01_{name}.py"), after)
    _write(os.path.join(out_dir, f"01_{name}.diff"),
           _diff(before, after, "00_captured.py", f"01_{name}.py") or "(no change)\n")
    lines = [header, "passes:"] + [f"  {n}: {s}" for n, s in program.plan.pass_log]
    chunked = program.stage is not None
    chunks = [(k, c.gm) for k, c in sorted(program.chunks.items())] if chunked \
        else [(0, program.gm)]
    info = {"files": [], "kernels": 0}
    for k, cgm in chunks:
        text = readable(cgm)
        if chunked:
            _write(os.path.join(out_dir, f"02_chunk{k}.py"), text)
            _write(os.path.join(out_dir, f"02_chunk{k}.diff"),
                   _diff(after, text, f"01_{name}.py", f"02_chunk{k}.py"))
        segs = segments(cgm)
        drawn: list = []
        for kind in ("layer", "embedding", "head"):
            seg = _pick(segs, kind)
            if seg is None or any(seg is d for d in drawn):
                continue
            drawn.append(seg)
            alike = f" ({seg.count} alike in this chunk)" if seg.count > 1 else ""
            svg = draw_graph(seg.gm, os.path.join(out_dir, f"{kind}_chunk{k}.svg"),
                             f"chunk {k}: {SEGMENT_TITLES.get(seg.kind, seg.kind)}{alike}")
            if svg:
                info["files"].append(svg)
        lines.append(f"chunk {k} segments: " + ", ".join(s.kind for s in segs))
        ncoll = sum(1 for n in cgm.graph.nodes if is_collective(n))
        lines.append(f"chunk {k}: {sum(1 for n in cgm.graph.nodes if n.op == 'call_function')} "
                     f"ops, {ncoll} collectives in the forward graph")
        if kernels:
            n = compile_kernels(cgm, os.path.join(out_dir, "kernels", f"chunk{k}"))
            info["kernels"] += n
            lines.append(f"  {n} Inductor output modules (forward/backward of each distinct "
                         f"region) in kernels/chunk{k}/, their kernels and fusions in "
                         f"kernels/chunk{k}/fusions.txt")
    _write(os.path.join(out_dir, "summary.txt"), "\n".join(lines) + "\n")
    return info


def dump_parallel_module(pm, path: str, kernels: bool = True) -> str:
    """``ParallelModule.dump``: this rank's programs under ``path/rank{r}[/program{i}]``."""
    if not pm._programs:
        raise RuntimeError("nothing compiled yet: call train_step once first, then dump")
    base = os.path.join(path, f"rank{pm.coords.rank}")
    progs = list(pm._programs.values())
    for i, prog in enumerate(progs):
        d = base if len(progs) == 1 else os.path.join(base, f"program{i}")
        dump_rank(d, prog.program, kernels, header=pm.explain() if i == 0 else "")
    return base


# ---- the inspect command --------------------------------------------------------------------
def inspect_model(model, args, kwargs, out: str, tp: int = 1, pp: int = 1, dp: int = 1,
                  virtual_stages: int = 1, sequence_parallel: bool = False,
                  kernel_ranks=(0,)) -> list:
    """Every rank's transformed graphs (and, for ``kernel_ranks``, kernels) with a fake
    process group — no ranks launched. Returns the rank directories written."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .config import ParallelConfig
    from .errors import ConfigError
    from .program import build_program
    from .runtime.mesh import build_mesh
    if dist.is_initialized():
        raise ConfigError("inspect builds its own fake process group; run it outside an "
                          "initialised torch.distributed world")
    cfg = ParallelConfig(tp=tp, pp=pp, dp=dp, virtual_stages=virtual_stages,
                         sequence_parallel=sequence_parallel, codegen="inductor")
    try:   # the same named errors as parallelize; pp may be refused only for execution
        cfg.validate()
    except ConfigError as e:
        if "pp" not in str(e):
            raise
    world = tp * pp * dp
    params = dict(model.named_parameters())
    written = []
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            coords = build_mesh(dp, pp, tp)
            program = build_program(model, cfg, (args, kwargs, None), coords, params,
                                    until="passes")
            d = os.path.join(out, f"rank{rank}")
            hdr = (f"rank {rank}/{world}: dp={coords.dp_rank} pp={coords.pp_rank} "
                   f"tp={coords.tp_rank} (fake process group)")
            dump_rank(d, program, kernels=rank in kernel_ranks, header=hdr)
            written.append(d)
        finally:
            dist.destroy_process_group()
    return written


def load_model_file(path: str, seq: int = 16, batch: int = 2):
    """``(model, args, kwargs)`` from a Python file: its ``model`` / ``build()`` and
    ``example_inputs`` / ``example_kwargs`` if defined; otherwise the file's top-level
    ``nn.Module`` class that takes one dataclass config with defaults (e.g.
    ``examples/models/gpt.py``), fed random token ids (``config.vocab_size``) of shape
    ``(batch, seq)`` for every argument of its ``forward``."""
    import dataclasses
    import importlib.util
    import inspect as _inspect
    spec = importlib.util.spec_from_file_location("_ptdp_inspect_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = getattr(mod, "model", None)
    if model is None and callable(getattr(mod, "build", None)):
        model = mod.build()
    if model is not None:
        return model, tuple(getattr(mod, "example_inputs", ())), \
            dict(getattr(mod, "example_kwargs", {}))
    for cls in reversed([v for v in vars(mod).values() if isinstance(v, type)
                         and issubclass(v, torch.nn.Module) and v.__module__ == mod.__name__]):
        params = list(_inspect.signature(cls.__init__).parameters.values())[1:]
        if len(params) != 1:
            continue
        cfg_cls = params[0].annotation
        cfg_cls = getattr(mod, cfg_cls, None) if isinstance(cfg_cls, str) else cfg_cls
        if not dataclasses.is_dataclass(cfg_cls):
            continue
        torch.manual_seed(0)
        model = cls(cfg_cls())
        vocab = getattr(model, "cfg", cfg_cls()).vocab_size if hasattr(cfg_cls(), "vocab_size") \
            else 128
        fwd = list(_inspect.signature(cls.forward).parameters)[1:]
        g = torch.Generator().manual_seed(1)
        args = tuple(torch.randint(0, vocab, (batch, seq), generator=g) for _ in fwd)
        return model, args, {}
    raise SystemExit(f"{path} must define `model` (or `build()`) and `example_inputs`, or one "
                     "nn.Module class built from a dataclass config with defaults")

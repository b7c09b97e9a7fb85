"""ptdp_compiler against PyTorch's own tensor-parallel and pipelining stack, eager and
compiled, same run.

For the project's GPT (examples/models/gpt.py) and Hugging Face Llama (GQA), at
(tp=2), (tp=2, SP), (pp=2, 1F1B), (pp=2, v=2 interleaved) and (tp=2, pp=2), three
programs train the same model from the same seed on the same inputs with the same
number of microbatches, on the same gloo CPU ranks, in interleaved rounds (each round
steps all three, the order rotating) so that machine noise hits them alike:

- ptdp: ``ptdp.parallelize(model, tp=..., pp=..., ...)`` on the unmodified model.
- native eager: what PyTorch's documentation shows — DTensor ``parallelize_module`` with
  ColwiseParallel / RowwiseParallel / SequenceParallel / PrepareModuleInput plans and
  ``loss_parallel``, and ``torch.distributed.pipelining`` (manual ``PipelineStage``
  split, Schedule1F1B / ScheduleInterleaved1F1B). The model edits the native stack
  needs live in ``native_model_edits`` below and are counted (changed source lines).
- native compiled: the same, plus torchtitan's compile recipe — after the TP plan, each
  transformer block wrapped in its own ``torch.compile(block, fullgraph=True)``
  (Inductor), embeddings / head / loss left eager. Its loss must equal the eager
  native loss (printed as a sanity check, ``compiled_loss_diff``).

A step is forward + backward of one global batch (no optimizer: every side would run
the same torch.optim code). Reported per configuration: median seconds per step after
warm-up (the slowest rank's time) per side, ``ratio_eager`` = native eager / ptdp and
``ratio_compiled`` = native compiled / ptdp (> 1: ptdp faster), bytes sent per step
summed over ranks, read from the torch profiler's c10d / gloo events of one more step per
side (``benchmarks/pg_traffic.py``: ``*_bytes`` counts each collective as NCCL's ring
would send it, ``*_gloo_bytes`` what gloo sent — a reduce-scatter runs as a full-size
all-reduce there), the loss differences, and — where ptdp is slower — the top ops of
one profiled step per side.

    python benchmarks/vs_torch_native.py [--models gpt,llama] [--configs tp2,pp2_1f1b]
        [--steps 5] [--repeats 3] [--size hidden,seq,batch,layers]
        [--codegen inductor|aot_eager] [--json PATH]

A ptdp configuration this version refuses (ConfigError) is reported as "pending".
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import json
import os
import statistics
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import ptdp_compiler as ptdp  # noqa: E402
from benchmarks.pg_traffic import ProcessGroupTraffic  # noqa: E402

LOSS_PARALLEL_PP = True   # vocab-parallel loss on the last stage too (as with pp=1)
# model and batch size: "hidden,seq,batch,layers" (read from the environment, so the
# spawned rank processes see what main() was asked for)
SIZE_ENV = "PTDP_VS_NATIVE_SIZE"
DEFAULT_SIZE = "256,128,8,8"
HIDDEN, SEQ, BATCH, LAYERS = (int(x) for x in os.environ.get(SIZE_ENV, DEFAULT_SIZE).split(","))
VOCAB, HEADS = 1024, 4

CONFIGS = {   # name -> ptdp.parallelize keywords (the native side reads the same numbers)
    "tp2": dict(tp=2),
    # native DTensor plans keep each all-gathered linear input for backward; ptdp's default
    # re-gathers it (Megatron's memory-saving choice), sp_regather=False makes the same trade
    "tp2_sp": dict(tp=2, sequence_parallel=True, sp_regather=False),
    "pp2_1f1b": dict(pp=2, microbatches=4),
    "pp2_v2_interleaved": dict(pp=2, virtual_stages=2, microbatches=4),
    "tp2_pp2": dict(tp=2, pp=2, microbatches=4),
}


# ---- models and inputs ------------------------------------------------------------------
def build_model(name: str):
    torch.manual_seed(0)
    if name == "gpt":
        from examples.models.gpt import GPT, GPTConfig
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=LAYERS, n_head=HEADS,
                             n_embd=HIDDEN))
    import transformers as T
    T.logging.set_verbosity_error()
    m = T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,
        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        use_cache=False))
    m.train()
    return m


def make_batch(name: str):
    """(ids, targets) of one global batch; every target counts (equal-size microbatches
    then make the mean of microbatch losses the global mean on both sides)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if name == "gpt":
        return ids, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, ids.clone()


def ptdp_inputs(name, ids, tgt):
    """(args, kwargs) of the unmodified model's forward."""
    return ((ids,), {"targets": tgt}) if name == "gpt" else ((), {"input_ids": ids, "labels": tgt})


# ---- byte counting, identical for every side ----------------------------------------------
def _group_size(kw: dict) -> int:
    """The size of every process group a layout uses (the profiler's events do not say
    which group an op ran on, so the configurations keep them all one size)."""
    sizes = {kw.get("tp", 1), kw.get("pp", 1)} - {1}
    if len(sizes) > 1:
        raise ValueError(f"{kw}: groups of different sizes; bytes per op need one group size")
    return sizes.pop() if sizes else 1


# ---- the native side: model edits the native stack needs --------------------------------
def _gpt_attention_forward_tp(self, x):
    B, T, C = x.shape
    hd = C // self.n_head
    q = self.query(x).view(B, T, -1, hd).transpose(1, 2)
    k = self.key(x).view(B, T, -1, hd).transpose(1, 2)
    v = self.value(x).view(B, T, -1, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
    y = y.transpose(1, 2).contiguous().view(B, T, -1)
    return self.resid_drop(self.proj(y))


def _gpt_forward_stage(self, idx, targets=None):
    if self.tok_emb is not None:
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
    else:
        x = idx
    for block in self.blocks:
        x = block(x)
    if self.head is None:
        return x
    return self.head(self.ln_f(x))


def _gpt_keep_stage(model, first_block, last_block, first, last):
    model.blocks = nn.ModuleList(model.blocks[first_block:last_block])
    if not first:
        model.tok_emb = model.pos_emb = None
    if not last:
        model.ln_f = model.head = None


class _LlamaStage(nn.Module):
    def __init__(self, m, first_layer, last_layer, first, last):
        super().__init__()
        m.model.layers = nn.ModuleList(m.model.layers[first_layer:last_layer])
        if not first:
            m.model.embed_tokens = None
        if not last:
            m.model.norm, m.lm_head = nn.Identity(), None
        self.m, self.first, self.last = m, first, last

    def forward(self, x):
        inp = {"input_ids": x} if self.first else {"inputs_embeds": x}
        h = self.m.model(**inp, use_cache=False).last_hidden_state
        return self.m.lm_head(h) if self.last else h


def _changed_lines(original, edited) -> int:
    """Lines added or changed going from ``original``'s source to ``edited``'s."""
    a = textwrap.dedent(inspect.getsource(original)).splitlines()[1:]   # skip the def line
    b = textwrap.dedent(inspect.getsource(edited)).splitlines()[1:]
    return sum(1 for d in difflib.ndiff(a, b) if d.startswith("+ ") and d[2:].strip())


def _body_lines(obj) -> int:
    src = textwrap.dedent(inspect.getsource(obj)).splitlines()
    return sum(1 for s in src[1:] if s.strip() and not s.strip().startswith(("#", '"""')))


def native_model_edits(model_name: str, kw: dict) -> int:
    """Source lines of model code the native stack needs changed for this layout."""
    from examples.models import gpt
    n = 0
    if model_name == "gpt":
        if kw.get("tp", 1) > 1:      # head count / width literal in view(): use -1
            n += _changed_lines(gpt.CausalSelfAttention.forward, _gpt_attention_forward_tp)
        if kw.get("pp", 1) > 1:      # forward tolerates missing parts; loss to the schedule
            n += _changed_lines(gpt.GPT.forward, _gpt_forward_stage) + _body_lines(_gpt_keep_stage)
    elif kw.get("pp", 1) > 1:        # HF Llama: TP needs no edit (it reshapes with -1)
        n += _body_lines(_LlamaStage)
    return n


def _tp_plan(model_name: str, model: nn.Module, sp: bool, loss_par: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, SequenceParallel)
    act = Shard(1) if sp else Replicate()
    head = ColwiseParallel(input_layouts=act, output_layouts=Shard(-1) if loss_par else Replicate(),
                           use_local_output=not loss_par)
    gather = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    plan = {}
    if model_name == "gpt":
        if model.tok_emb is not None:
            plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=act)
            # SP: the positions' table is added to a sequence-sharded activation
            if sp:
                plan["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
        if model.head is not None:
            plan["head"] = head
            if sp:
                plan["ln_f"] = SequenceParallel()
        for i, _ in enumerate(model.blocks):
            p = f"blocks.{i}."
            for lin in ("attn.query", "attn.key", "attn.value", "mlp.fc"):
                plan[p + lin] = ColwiseParallel()
            for lin in ("attn.proj", "mlp.out"):
                plan[p + lin] = RowwiseParallel(output_layouts=act)
            if sp:
                plan[p + "ln1"] = plan[p + "ln2"] = SequenceParallel()
                plan[p + "attn"] = plan[p + "mlp"] = PrepareModuleInput(**gather)
        return plan
    root = "m." if isinstance(model, _LlamaStage) else ""
    lm = model.m if isinstance(model, _LlamaStage) else model
    if lm.model.embed_tokens is not None:
        plan[root + "model.embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=act, use_local_output=not sp)
    if lm.lm_head is not None:
        plan[root + "lm_head"] = head
        if sp:
            plan[root + "model.norm"] = SequenceParallel()
    for i, _ in enumerate(lm.model.layers):
        p = f"{root}model.layers.{i}."
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                    "mlp.up_proj"):
            plan[p + lin] = ColwiseParallel()
        for lin in ("self_attn.o_proj", "mlp.down_proj"):
            plan[p + lin] = RowwiseParallel(output_layouts=act, use_local_output=not sp)
        if sp:
            plan[p + "input_layernorm"] = plan[p + "post_attention_layernorm"] = SequenceParallel()
            plan[p + "self_attn"] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()})
            plan[p + "mlp"] = PrepareModuleInput(**gather)
    return plan


def _apply_tp(model_name, model, tp_mesh, sp, loss_par=True):
    from torch.distributed.tensor.parallel import parallelize_module
    if model_name == "gpt":
        for blk in model.blocks:
            blk.attn.forward = _gpt_attention_forward_tp.__get__(blk.attn)
    tied = model_name == "gpt" and model.head is not None and model.tok_emb is not None
    parallelize_module(model, tp_mesh, _tp_plan(model_name, model, sp, loss_par))
    if tied:   # parallelize_module distributes each module's copy: tie them again
        model.head.weight = model.tok_emb.weight
    return model


def _compile_blocks(model_name: str, model: nn.Module, tp: int, sp: bool) -> int:
    """torchtitan's recipe (``apply_compile`` in its parallelize files): once the TP plan is
    applied, each transformer block is wrapped in its own ``torch.compile(block,
    fullgraph=True)`` (Inductor) and registered back under its name; embeddings, the head and
    the loss stay eager. The blocks share one code object, so one compile serves all."""
    if model_name == "gpt":
        blocks = model.blocks
    else:
        lm = model.m if isinstance(model, _LlamaStage) else model
        blocks = lm.model.layers
        emb = lm.model.embed_tokens
        if emb is not None and tp > 1 and not sp:
            # HF Llama hands the embedding's to_local() view straight to the first compiled
            # block; on torch 2.13 that block's backward then gives the embedding's
            # Redistribute a plain-tensor gradient (AttributeError: '_local_tensor'). A copy
            # in between avoids it (GPT adds the position embedding there anyway).
            emb.register_forward_hook(lambda mod, args, out: out.clone())
    for name, blk in list(blocks.named_children()):
        blocks.register_module(name, torch.compile(blk, fullgraph=True))
    return len(blocks)


class NativeRunner:
    """One training step of the native stack for a model and layout."""

    def __init__(self, model_name: str, kw: dict, compiled: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        self.name, tp, pp = model_name, kw.get("tp", 1), kw.get("pp", 1)
        self.compiled = compiled
        self.sp = kw.get("sequence_parallel", False)
        self.m_count, v = kw.get("microbatches", 1), kw.get("virtual_stages", 1)
        self.tp, self.pp = tp, pp
        if pp == 1:
            mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
            self.model = _apply_tp(model_name, build_model(model_name), mesh, self.sp)
            if compiled:
                _compile_blocks(model_name, self.model, tp, self.sp)
            self.modules = [self.model]
            return
        mesh = init_device_mesh("cpu", (pp, tp), mesh_dim_names=("pp", "tp"))
        pp_rank, self.pp_group = mesh["pp"].get_local_rank(), mesh["pp"].get_group()
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B,
                                                  ScheduleInterleaved1F1B)
        n_stages = pp * v
        per = LAYERS // n_stages
        stages, self.modules = [], []
        for s in range(pp_rank, n_stages, pp):   # stage s lives on pipeline rank s % pp
            m = build_model(model_name)
            first, last = s == 0, s == n_stages - 1
            if model_name == "gpt":
                m.forward = _gpt_forward_stage.__get__(m)
                _gpt_keep_stage(m, s * per, (s + 1) * per, first, last)
            else:
                m = _LlamaStage(m, s * per, (s + 1) * per, first, last)
            if tp > 1:
                _apply_tp(model_name, m, mesh["tp"], self.sp, loss_par=LOSS_PARALLEL_PP)
            if compiled:    # torchtitan compiles each stage's blocks after TP, before pipelining
                _compile_blocks(model_name, m, tp, self.sp)
            self.modules.append(m)
            # shapes given up front, as the pipelining docs' manual split does: the stage
            # then needs no shape-inference forward (which cannot run TP collectives)
            mb = BATCH // self.m_count
            act = torch.empty(mb, SEQ, HIDDEN)
            stages.append(PipelineStage(
                m, s, n_stages, torch.device("cpu"), group=self.pp_group,
                input_args=torch.empty(mb, SEQ, dtype=torch.long) if first else act,
                output_args=torch.empty(mb, SEQ, VOCAB) if last else act,
                input_grads=None if first else act, output_grads=None if last else act))
        self.first = 0 in [st.stage_index for st in stages]
        self.last = n_stages - 1 in [st.stage_index for st in stages]
        self.loss_parallel = tp > 1 and LOSS_PARALLEL_PP
        loss = self._loss
        self.schedule = (ScheduleInterleaved1F1B(stages, self.m_count, loss_fn=loss) if v > 1
                         else Schedule1F1B(stages[0], self.m_count, loss_fn=loss))
        self.tied = self._tied_params() if model_name == "gpt" else []

    def _loss(self, logits, tgt):
        if self.name == "gpt":
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
        return self.modules[-1].m.loss_function(logits, tgt, VOCAB)

    def _tied_params(self):
        """The GPT ties its head to the token embedding; split over pipeline ranks the two
        copies' gradients must be summed (what Megatron's embedding group does)."""
        out = []
        for m in self.modules:
            if m.tok_emb is not None:
                out.append(m.tok_emb.weight)
            if m.head is not None:
                out.append(m.head.weight)
        return out

    def zero_grad(self):
        for m in self.modules:
            m.zero_grad(set_to_none=True)

    def finish_grads(self):
        """Make every gradient what an optimizer needs, as ptdp's step leaves them: DTensor
        leaves the gradient of a replicated parameter used on sequence shards (norm weights
        under SequenceParallel) as a Partial sum, reduced only when something reads it."""
        for m in self.modules:
            for p in m.parameters():
                g = p.grad
                if hasattr(g, "redistribute") and g.placements != p.placements:
                    p.grad = g.redistribute(g.device_mesh, p.placements)

    def step(self, ids, tgt):
        from torch.distributed.tensor.parallel import loss_parallel
        import contextlib
        self.zero_grad()
        use_lp = self.tp > 1 and (self.pp == 1 or self.loss_parallel)
        ctx = loss_parallel() if use_lp else contextlib.nullcontext()
        if self.pp == 1:
            with ctx:
                if self.name == "gpt":
                    loss = self.model(ids, targets=tgt)
                else:
                    loss = self.model(input_ids=ids, labels=tgt, use_cache=False).loss
                loss.backward()
            self.finish_grads()
            return loss.detach().float().mean().item() if not hasattr(loss, "full_tensor") \
                else loss.full_tensor().item()
        losses = []
        with ctx:
            if self.first:
                self.schedule.step(ids, target=tgt if self.last else None,
                                   losses=losses if self.last else None)
            elif self.last:
                self.schedule.step(target=tgt, losses=losses)
            else:
                self.schedule.step()
        self.finish_grads()
        if len(self.tied) == 1:     # this rank holds one of the two tied copies
            p = self.tied[0]
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(g, group=self.pp_group)
        loss = torch.zeros((), dtype=torch.float64)
        if losses:
            ls = [l.full_tensor() if hasattr(l, "full_tensor") else l for l in losses]
            loss += torch.stack([l.detach().double() for l in ls]).mean()
        # the step's loss on every rank, as ptdp's train_step returns it (one scalar
        # all-reduce over the pipeline ranks on both sides)
        dist.all_reduce(loss, group=self.pp_group)
        return loss.item()


# ---- one configuration, run on every rank -----------------------------------------------
def _timed(fn):
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dt = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)      # the step takes as long as its slowest rank
    return out, dt.item()


def _top_ops(fn, k=6) -> list:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    evs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in evs) or 1
    return [f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in evs[:k]]


SIDES = ("ptdp", "native_eager", "native_compiled")


def job(model_name: str, cfg_name: str, steps: int, warmup: int, codegen: str) -> dict:
    """Three programs of one model and layout on this rank — ptdp, the native stack in eager
    and the native stack with torchtitan's per-block ``torch.compile`` — stepped in
    interleaved rounds (the order rotates each round) so machine noise hits all three."""
    kw = CONFIGS[cfg_name]
    ids, tgt = make_batch(model_name)
    row = {"model": model_name, "config": cfg_name}
    try:
        pm = ptdp.parallelize(build_model(model_name), codegen=codegen, **kw)
    except ptdp.ConfigError as e:
        pm, row["ptdp_pending"] = None, str(e)
    eager = NativeRunner(model_name, kw)
    compiled = NativeRunner(model_name, kw, compiled=True)
    p_args, p_kwargs = ptdp_inputs(model_name, ids, tgt)
    fns = {"native_eager": lambda: eager.step(ids, tgt),
           "native_compiled": lambda: compiled.step(ids, tgt)}
    if pm is not None:
        fns["ptdp"] = lambda: pm.train_step(*p_args, **p_kwargs).item()
    sides = [s for s in SIDES if s in fns]
    times = {s: [] for s in sides}
    losses = dict.fromkeys(SIDES)
    for i in range(warmup + steps):      # interleaved rounds; the first ones compile
        k = i % len(sides)
        for side in sides[k:] + sides[:k]:
            losses[side], dt = _timed(fns[side])
            if i >= warmup:
                times[side].append(dt)
    for side in SIDES:
        row[f"{side}_s"] = statistics.median(times[side]) if side in times else None
        row[f"{side}_loss"] = losses[side]
        if side not in fns:
            row[f"{side}_bytes"] = row[f"{side}_gloo_bytes"] = None
            row[f"{side}_ops"] = {}
            continue
        with ProcessGroupTraffic(_group_size(kw)) as traffic:   # one more step, profiled
            fns[side]()
        row[f"{side}_bytes"] = traffic.total("nccl_bytes")
        row[f"{side}_gloo_bytes"] = traffic.total("gloo_bytes")
        row[f"{side}_ops"] = traffic.totals("nccl_bytes", by=("kind",))
    for side in ("native_eager", "native_compiled"):   # profile where ptdp is the slower one
        if pm is None or row["ptdp_s"] <= row[f"{side}_s"]:
            continue
        for who in ("ptdp", side):
            if who == "ptdp" and "ptdp_top_ops" in row:
                continue
            if dist.get_rank() == 0:
                row[f"{who}_top_ops"] = _top_ops(fns[who])
            else:
                fns[who]()
    return row


def _merge(rank_rows: list) -> dict:
    """Rank 0's timings; bytes summed over ranks; the loss from a rank that has it."""
    row = dict(rank_rows[0])
    for side in SIDES:
        if row.get(f"{side}_bytes") is not None:
            for k in ("bytes", "gloo_bytes"):
                row[f"{side}_{k}"] = int(sum(r[f"{side}_{k}"] for r in rank_rows))
            ops = {}
            for r in rank_rows:
                for k, v in r[f"{side}_ops"].items():
                    ops[k] = ops.get(k, 0) + v
            row[f"{side}_ops"] = {k: int(v) for k, v in sorted(ops.items())}
        row[f"{side}_loss"] = next((r[f"{side}_loss"] for r in rank_rows
                                    if r[f"{side}_loss"] is not None), None)
    return row


def _diff(a, b):
    return abs(a - b) if a is not None and b is not None else None


def run(models, configs, steps=5, warmup=2, codegen="aot_eager", timeout=900,
        repeats=1) -> list:
    """One row per (config, model): each repeat is a fresh set of three programs measured in
    the same world; the row keeps the repeat with the median ratio against the compiled
    native side and lists every repeat's ratios."""
    rows = []
    for cfg_name in configs:
        kw = CONFIGS[cfg_name]
        world = kw.get("tp", 1) * kw.get("pp", 1)
        with ptdp.LocalWorld(world) as w:
            for model_name in models:
                runs = []
                for _ in range(repeats):
                    try:
                        runs.append(_merge(w.run(job, model_name, cfg_name, steps, warmup,
                                                 codegen, timeout=timeout)))
                    except ptdp.RankError as e:
                        runs = [{"model": model_name, "config": cfg_name,
                                 "error": str(e)[:400]}]
                        break
                if "error" in runs[0]:
                    rows.append(runs[0])
                    print(f"[{time.strftime('%H:%M:%S')}] {model_name} {cfg_name}: error "
                          f"{runs[0]['error'][:300]}", file=sys.stderr, flush=True)
                    continue
                for row in runs:
                    for side in ("eager", "compiled"):
                        row[f"ratio_{side}"] = (row[f"native_{side}_s"] / row["ptdp_s"]) \
                            if row.get("ptdp_s") else None
                row = sorted(runs, key=lambda r: r["ratio_compiled"] or 0.0)[len(runs) // 2]
                for side in ("eager", "compiled"):
                    row[f"ratio_{side}_runs"] = " / ".join(
                        f"{r[f'ratio_{side}']:.2f}" for r in runs if r[f"ratio_{side}"] is not None)
                row["loss_diff"] = _diff(row["ptdp_loss"], row["native_eager_loss"])
                # the sanity check of the compiled native side: its loss is the eager one's
                row["compiled_loss_diff"] = _diff(row["native_compiled_loss"],
                                                  row["native_eager_loss"])
                row["status"] = "pending" if "ptdp_pending" in row else "measured"
                row["native_model_lines"] = native_model_edits(model_name, kw)
                row["ptdp_model_lines"] = 0
                row["ptdp_codegen"] = codegen
                rows.append(row)
                print(f"[{time.strftime('%H:%M:%S')}] {model_name} {cfg_name}: ratio_eager "
                      f"{_fmt(row['ratio_eager'], '.2f')}, ratio_compiled "
                      f"{_fmt(row['ratio_compiled'], '.2f')}", file=sys.stderr, flush=True)
    return rows


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else str(x if x is not None else "-")


def print_table(rows):
    print(f"{'model':6} {'config':19} {'ptdp s':>8} {'eager s':>8} {'comp. s':>8} "
          f"{'r eager':>7} {'r comp.':>7} {'ptdp KB':>9} {'native KB':>9} {'loss diff':>9} "
          f"{'comp diff':>9} {'lines n/p':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['config']:19} error: {r['error'][:200]}")
            continue
        kb = lambda b: b / 1024 if b is not None else None  # noqa: E731
        print(f"{r['model']:6} {r['config']:19} {_fmt(r['ptdp_s'], '8.4f'):>8} "
              f"{_fmt(r['native_eager_s'], '8.4f'):>8} {_fmt(r['native_compiled_s'], '8.4f'):>8} "
              f"{_fmt(r['ratio_eager'], '7.2f'):>7} {_fmt(r['ratio_compiled'], '7.2f'):>7} "
              f"{_fmt(kb(r['ptdp_bytes']), '9.1f'):>9} "
              f"{_fmt(kb(r['native_eager_bytes']), '9.1f'):>9} "
              f"{_fmt(r['loss_diff'], '9.2e'):>9} {_fmt(r['compiled_loss_diff'], '9.2e'):>9} "
              f"{r['native_model_lines']:>5}/{r['ptdp_model_lines']}"
              + ("  (ptdp pending)" if r["status"] == "pending" else ""))
    for r in rows:
        if "error" in r:
            continue
        ok = r["compiled_loss_diff"] is not None and r["compiled_loss_diff"] <= 1e-4
        print(f"sanity {r['model']} {r['config']}: native compiled loss "
              f"{_fmt(r['native_compiled_loss'], '.6f')} vs native eager "
              f"{_fmt(r['native_eager_loss'], '.6f')} vs ptdp {_fmt(r['ptdp_loss'], '.6f')}: "
              + ("ok" if ok else "MISMATCH"))
    for r in rows:
        if r.get("ptdp_top_ops"):
            print(f"\n{r['model']} {r['config']}: ptdp slower; one profiled step (rank 0, self CPU)")
            for who in SIDES:
                if r.get(f"{who}_top_ops"):
                    print(f"  {who}: " + "; ".join(r[f"{who}_top_ops"]))


NOTE = ("ptdp: parallelize(codegen={codegen}) of the unmodified model (tp2_sp with "
        "sp_regather=False: it keeps the all-gathered linear inputs for backward, as the native "
        "DTensor plan does, instead of Megatron's re-gather; pp rows with ptdp's default "
        "split_backward=True: each chunk sends its input gradient before computing weight "
        "gradients, which fill the schedule's waits — the native schedules compute the whole "
        "backward before sending); native eager: DTensor "
        "parallelize_module (+ SequenceParallel, loss_parallel) and torch.distributed.pipelining "
        "(static-shape PipelineStage, Schedule1F1B / ScheduleInterleaved1F1B); native compiled: "
        "the same with torchtitan's recipe, torch.compile(block, fullgraph=True) (Inductor) of "
        "each transformer block after the TP plan. GPT {layers} layers "
        "h={hidden} s={seq} batch {batch}, Llama the same with GQA 4/2 heads, vocab {vocab}; "
        "microbatches 4 with pp; step = forward+backward with every gradient final (native: "
        "Partial DTensor gradients redistributed, tied embedding summed over pp; all return the "
        "loss on every rank), median of {steps} interleaved rounds after {warmup} warm-up, "
        "slowest rank; ratio_eager = native_eager_s / ptdp_s, ratio_compiled = "
        "native_compiled_s / ptdp_s (> 1: ptdp faster); the row is the repeat with the median "
        "ratio_compiled of {repeats} (ratio_*_runs list all); compiled_loss_diff = |native "
        "compiled loss − native eager loss|; bytes = sent per step summed over ranks, from the "
        "profiler's c10d/gloo events (*_bytes: as NCCL's ring would send them; *_gloo_bytes: "
        "what gloo sent); *_model_lines = model source lines the side needed changed.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,llama")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--codegen", default="inductor", choices=("aot_eager", "inductor"),
                    help="ptdp's code generator (its default: inductor)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh program pairs per row; the row reports the median ratio")
    ap.add_argument("--size", default=None, help='"hidden,seq,batch,layers" '
                    f"(default {DEFAULT_SIZE}; also the {SIZE_ENV} environment variable)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.size:   # the rank processes read the size from the environment when they import us
        os.environ[SIZE_ENV] = a.size
        global HIDDEN, SEQ, BATCH, LAYERS
        HIDDEN, SEQ, BATCH, LAYERS = (int(x) for x in a.size.split(","))
    load_before = os.getloadavg()[0]
    rows = run(a.models.split(","), a.configs.split(","), a.steps, a.warmup, a.codegen,
               repeats=a.repeats)
    load_after = os.getloadavg()[0]
    print_table(rows)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"benchmark": "vs_torch_native", "device": "cpu (gloo)",
                       "torch": torch.__version__,
                       "command": "python benchmarks/vs_torch_native.py " + " ".join(
                           sys.argv[1:] if argv is None else argv),
                       # the machine's 1-minute load average before / after the run
                       # (other jobs on the same cores make the ratios noisier)
                       "load_average": [round(load_before, 1), round(load_after, 1)],
                       "cpus": os.cpu_count(),
                       "size": {"hidden": HIDDEN, "seq": SEQ, "batch": BATCH,
                                "layers": LAYERS, "vocab": VOCAB},
                       "note": NOTE.format(codegen=a.codegen, steps=a.steps, warmup=a.warmup,
                                           repeats=a.repeats, layers=LAYERS, hidden=HIDDEN,
                                           seq=SEQ, batch=BATCH, vocab=VOCAB),
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""ptdp_compiler against PyTorch's own tensor-parallel and pipelining stack, same run.

For the project's GPT (examples/models/gpt.py) and Hugging Face Llama (GQA), at
(tp=2), (tp=2, SP), (pp=2, 1F1B), (pp=2, v=2 interleaved) and (tp=2, pp=2), both
sides train the same model from the same seed on the same inputs with the same
number of microbatches, on the same gloo CPU ranks, interleaving their steps so
that machine noise hits both alike:

- ptdp: ``ptdp.parallelize(model, tp=..., pp=..., ...)`` on the unmodified model.
- native: what PyTorch's documentation shows — DTensor ``parallelize_module`` with
  ColwiseParallel / RowwiseParallel / SequenceParallel / PrepareModuleInput plans and
  ``loss_parallel``, and ``torch.distributed.pipelining`` (manual ``PipelineStage``
  split, Schedule1F1B / ScheduleInterleaved1F1B). The model edits the native stack
  needs live in ``native_model_edits`` below and are counted (changed source lines).

A step is forward + backward of one global batch (no optimizer: both sides would run
the same torch.optim code). Reported per configuration: median seconds per step after
warm-up (the slowest rank's time), the ratio native/ptdp (> 1: ptdp faster), bytes
sent per step summed over ranks (one TorchDispatchMode counts every c10d / functional
collective and p2p op for both sides, including those DTensor issues inside its own op
dispatch, with the ring model: all-reduce 2(t-1)/t·n,
all-gather (t-1)·n_local, reduce-scatter (t-1)/t·n, send n), the difference of the
two losses, and — where ptdp is slower — the top ops of one profiled step per side.

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
from torch.utils._python_dispatch import (TorchDispatchMode,  # noqa: E402
                                          is_traceable_wrapper_subclass)

import ptdp_compiler as ptdp  # noqa: E402

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


# ---- byte counting, identical for both sides --------------------------------------------
_RING = {  # op name -> bytes this rank sends, from (bytes of the op's tensor, group size)
    "all_reduce": lambda n, t: 2 * (t - 1) * n / t, "allreduce_": lambda n, t: 2 * (t - 1) * n / t,
    "all_gather_into_tensor": lambda n, t: (t - 1) * n, "_allgather_base_": lambda n, t: (t - 1) * n,
    "allgather_": lambda n, t: (t - 1) * n,
    "reduce_scatter_tensor": lambda n, t: (t - 1) * n / t,
    "_reduce_scatter_base_": lambda n, t: (t - 1) * n / t,
    "reduce_scatter_": lambda n, t: (t - 1) * n / t,
    "all_to_all_single": lambda n, t: (t - 1) * n / t,
    "broadcast": lambda n, t: (t - 1) * n / t, "broadcast_": lambda n, t: (t - 1) * n / t,
    "send": lambda n, t: n,
}
for _k in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):   # list-of-tensor forms
    _RING[_k + "_coalesced"] = _RING[_k]
for _k, _v in (("allreduce_coalesced_", "all_reduce"), ("allgather_coalesced_", "allgather_"),
               ("allgather_into_tensor_coalesced_", "allgather_"),
               ("reduce_scatter_tensor_coalesced_", "reduce_scatter_")):
    _RING[_k] = _RING[_v]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _group_size(args, kwargs) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, str):
            try:
                return _resolve_process_group(a).size()
            except Exception:
                continue
        if isinstance(a, dist.ProcessGroup):
            return a.size()
        if hasattr(a, "size") and type(a).__name__.startswith("ScriptObject"):
            try:
                return a.size()
            except Exception:
                continue
    return dist.get_world_size()


class CommBytes(TorchDispatchMode):
    """Adds the bytes every collective / send this rank runs would put on the wire.

    Sees ``c10d.*`` ops (torch.distributed calls, pipelining's p2p) and
    ``_c10d_functional.*`` ops (DTensor, ptdp); a ``torch.library.custom_op`` (ptdp's
    f/g ops wrap functional collectives) runs its Python body under a fresh counter so
    the collectives inside it are seen.
    """

    def __init__(self, totals: dict):
        super().__init__()
        self.totals = totals

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(is_traceable_wrapper_subclass(t) for t in _tensors((args, kwargs))):
            # a DTensor op: let DTensor run it with this mode still active, so the
            # collectives it issues inside its own dispatch (loss_parallel's statistics,
            # redistributions inside an op's sharding strategy) are counted too
            return NotImplemented
        ns, name = func.namespace, func._opname
        if ns in ("c10d", "_c10d_functional") and name in _RING:
            first = next(_tensors(args), None)
            ts = list(_tensors(args[0])) if args else []
            n = sum(t.numel() * t.element_size() for t in ts) if ts else 0
            t = 2 if name == "send" else _group_size(args, kwargs)
            if first is not None and t > 1:
                self.totals[name] = self.totals.get(name, 0) + _RING[name](n, t)
        else:
            from torch._library.custom_ops import OPDEFS
            opdef = OPDEFS.get(f"{ns}::{name}")
            if opdef is not None:   # run its Python body with a counter pushed again
                with CommBytes(self.totals):
                    return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


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


class NativeRunner:
    """One training step of the native stack for a model and layout."""

    def __init__(self, model_name: str, kw: dict):
        from torch.distributed.device_mesh import init_device_mesh
        self.name, tp, pp = model_name, kw.get("tp", 1), kw.get("pp", 1)
        self.sp = kw.get("sequence_parallel", False)
        self.m_count, v = kw.get("microbatches", 1), kw.get("virtual_stages", 1)
        self.tp, self.pp = tp, pp
        if pp == 1:
            mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
            self.model = _apply_tp(model_name, build_model(model_name), mesh, self.sp)
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


def job(model_name: str, cfg_name: str, steps: int, warmup: int, codegen: str) -> dict:
    kw = CONFIGS[cfg_name]
    ids, tgt = make_batch(model_name)
    row = {"model": model_name, "config": cfg_name}
    try:
        pm = ptdp.parallelize(build_model(model_name), codegen=codegen, **kw)
    except ptdp.ConfigError as e:
        pm, row["ptdp_pending"] = None, str(e)
    native = NativeRunner(model_name, kw)
    p_args, p_kwargs = ptdp_inputs(model_name, ids, tgt)
    p_step = (lambda: pm.train_step(*p_args, **p_kwargs).item()) if pm else None
    n_step = lambda: native.step(ids, tgt)  # noqa: E731
    p_times, n_times, p_loss, n_loss = [], [], None, None
    for i in range(warmup + steps):      # interleaved: noise on the shared machine hits both
        if p_step:
            p_loss, dt = _timed(p_step)
            if i >= warmup:
                p_times.append(dt)
        n_loss, dt = _timed(n_step)
        if i >= warmup:
            n_times.append(dt)
    p_bytes, n_bytes = {}, {}
    if p_step:
        with CommBytes(p_bytes):
            p_step()
    with CommBytes(n_bytes):
        n_step()
    row.update(ptdp_s=statistics.median(p_times) if p_times else None,
               native_s=statistics.median(n_times), ptdp_loss=p_loss, native_loss=n_loss,
               ptdp_bytes=sum(p_bytes.values()) if p_step else None,
               native_bytes=sum(n_bytes.values()), ptdp_ops=p_bytes, native_ops=n_bytes)
    slower = p_step is not None and row["ptdp_s"] > row["native_s"]
    if slower and dist.get_rank() == 0:
        row["ptdp_top_ops"] = _top_ops(p_step)
    elif slower:
        p_step()
    if slower and dist.get_rank() == 0:
        row["native_top_ops"] = _top_ops(n_step)
    elif slower:
        n_step()
    return row


def _merge(rank_rows: list) -> dict:
    """Rank 0's timings; bytes summed over ranks; the loss from a rank that has it."""
    row = dict(rank_rows[0])
    for side in ("ptdp", "native"):
        if row.get(f"{side}_bytes") is not None:
            row[f"{side}_bytes"] = int(sum(r[f"{side}_bytes"] for r in rank_rows))
            ops = {}
            for r in rank_rows:
                for k, v in r[f"{side}_ops"].items():
                    ops[k] = ops.get(k, 0) + v
            row[f"{side}_ops"] = {k: int(v) for k, v in sorted(ops.items())}
        row[f"{side}_loss"] = next((r[f"{side}_loss"] for r in rank_rows
                                    if r[f"{side}_loss"] is not None), None)
    return row


def run(models, configs, steps=5, warmup=2, codegen="aot_eager", timeout=900,
        repeats=1) -> list:
    """One row per (config, model): each repeat is a fresh pair of programs measured in the
    same world; the row keeps the repeat with the median ratio and lists every ratio."""
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
                    continue
                for row in runs:
                    row["ratio"] = (row["native_s"] / row["ptdp_s"]) if row.get("ptdp_s") \
                        else None
                ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
                row = sorted(runs, key=lambda r: r["ratio"] or 0.0)[len(runs) // 2]
                row["ratio_runs"] = " / ".join(f"{x:.2f}" for x in ratios)
                pl, nl = row.get("ptdp_loss"), row.get("native_loss")
                row["loss_diff"] = abs(pl - nl) if pl is not None and nl is not None else None
                row["status"] = "pending" if "ptdp_pending" in row else "measured"
                row["native_model_lines"] = native_model_edits(model_name, kw)
                row["ptdp_model_lines"] = 0
                row["ptdp_codegen"] = codegen
                row["native_ran"] = "eager DTensor / torch.distributed.pipelining"
                rows.append(row)
    return rows


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else str(x if x is not None else "-")


def print_table(rows):
    print(f"{'model':6} {'config':19} {'ptdp s':>8} {'native s':>8} {'ratio':>6} "
          f"{'ptdp KB':>9} {'native KB':>9} {'loss diff':>9} {'lines n/p':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['config']:19} error: {r['error'][:200]}")
            continue
        kb = lambda b: b / 1024 if b is not None else None  # noqa: E731
        print(f"{r['model']:6} {r['config']:19} {_fmt(r['ptdp_s'], '8.4f'):>8} "
              f"{_fmt(r['native_s'], '8.4f'):>8} {_fmt(r['ratio'], '6.2f'):>6} "
              f"{_fmt(kb(r['ptdp_bytes']), '9.1f'):>9} {_fmt(kb(r['native_bytes']), '9.1f'):>9} "
              f"{_fmt(r['loss_diff'], '9.2e'):>9} {r['native_model_lines']:>5}/{r['ptdp_model_lines']}"
              + ("  (ptdp pending)" if r["status"] == "pending" else ""))
    for r in rows:
        if r.get("ptdp_top_ops"):
            print(f"\n{r['model']} {r['config']}: ptdp slower; one profiled step (rank 0, self CPU)")
            print("  ptdp:   " + "; ".join(r["ptdp_top_ops"]))
            print("  native: " + "; ".join(r["native_top_ops"]))


NOTE = ("ptdp: parallelize(codegen={codegen}) of the unmodified model (tp2_sp with "
        "sp_regather=False: it keeps the all-gathered linear inputs for backward, as the native "
        "DTensor plan does, instead of Megatron's re-gather; pp rows with ptdp's default "
        "split_backward=True: each chunk sends its input gradient before computing weight "
        "gradients, which fill the schedule's waits — the native schedules compute the whole "
        "backward before sending); native: eager DTensor "
        "parallelize_module (+ SequenceParallel, loss_parallel) and torch.distributed.pipelining "
        "(static-shape PipelineStage, Schedule1F1B / ScheduleInterleaved1F1B). GPT {layers} layers "
        "h={hidden} s={seq} batch {batch}, Llama the same with GQA 4/2 heads, vocab {vocab}; "
        "microbatches 4 with pp; step = forward+backward with every gradient final (native: "
        "Partial DTensor gradients redistributed, tied embedding summed over pp; both return the "
        "loss on every rank), median of {steps} after {warmup} warm-up, slowest rank; "
        "ratio = native_s / ptdp_s, the row is the median-ratio repeat of {repeats} (ratio_runs "
        "lists all); bytes = sent per step summed over ranks (ring model, same counter both sides); "
        "*_model_lines = model source lines the side needed changed.")


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
    rows = run(a.models.split(","), a.configs.split(","), a.steps, a.warmup, a.codegen,
               repeats=a.repeats)
    print_table(rows)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"benchmark": "vs_torch_native", "device": "cpu (gloo)",
                       "torch": torch.__version__,
                       "command": "python benchmarks/vs_torch_native.py " + " ".join(
                           sys.argv[1:] if argv is None else argv),
                       "size": {"hidden": HIDDEN, "seq": SEQ, "batch": BATCH,
                                "layers": LAYERS, "vocab": VOCAB},
                       "note": NOTE.format(codegen=a.codegen, steps=a.steps, warmup=a.warmup,
                                           repeats=a.repeats, layers=LAYERS, hidden=HIDDEN,
                                           seq=SEQ, batch=BATCH, vocab=VOCAB),
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

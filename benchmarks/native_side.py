"""The native side of benchmarks/vs_torch_native.py: PyTorch's own stack (DTensor tensor
parallel plans, torchtitan's per-block torch.compile, torch.distributed.pipelining) on the
same models, with the edits that stack needs counted."""
from __future__ import annotations

import difflib
import inspect
import textwrap

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import vs_native_setup as S   # sizes read at run time (main may reset them)
from benchmarks.vs_native_setup import build_model

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
        per = S.LAYERS // n_stages
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
                _apply_tp(model_name, m, mesh["tp"], self.sp, loss_par=S.LOSS_PARALLEL_PP)
            if compiled:    # torchtitan compiles each stage's blocks after TP, before pipelining
                _compile_blocks(model_name, m, tp, self.sp)
            self.modules.append(m)
            # shapes given up front, as the pipelining docs' manual split does: the stage
            # then needs no shape-inference forward (which cannot run TP collectives)
            mb = S.BATCH // self.m_count
            act = torch.empty(mb, S.SEQ, S.HIDDEN)
            stages.append(PipelineStage(
                m, s, n_stages, torch.device("cpu"), group=self.pp_group,
                input_args=torch.empty(mb, S.SEQ, dtype=torch.long) if first else act,
                output_args=torch.empty(mb, S.SEQ, S.VOCAB) if last else act,
                input_grads=None if first else act, output_grads=None if last else act))
        self.first = 0 in [st.stage_index for st in stages]
        self.last = n_stages - 1 in [st.stage_index for st in stages]
        self.loss_parallel = tp > 1 and S.LOSS_PARALLEL_PP
        loss = self._loss
        self.schedule = (ScheduleInterleaved1F1B(stages, self.m_count, loss_fn=loss) if v > 1
                         else Schedule1F1B(stages[0], self.m_count, loss_fn=loss))
        self.tied = self._tied_params() if model_name == "gpt" else []

    def _loss(self, logits, tgt):
        if self.name == "gpt":
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
        return self.modules[-1].m.loss_function(logits, tgt, S.VOCAB)

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

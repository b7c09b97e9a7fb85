"""Human-readable reports of what the compiler did."""
from __future__ import annotations

from .codegen import compile_stats
from .passes import op_histogram


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def explain(pm) -> str:
    c, co = pm.config, pm.coords
    lines = [f"ptdp_compiler plan for {type(pm.module).__name__} on rank {co.rank}/{co.world}",
             f"  mesh (dp, pp, tp) = ({c.dp}, {c.pp}, {c.tp}); this rank at "
             f"dp={co.dp_rank} pp={co.pp_rank} tp={co.tp_rank}"
             + (f"; ep={c.ep} carved out of dp, this rank at ep={co.ep_rank}"
                if getattr(c, "ep", 1) > 1 else "")
             + (f"; dp_shard={c.dp_shard} at {co.dp_shard_rank}" if c.dp_shard > 1 else "")
             + (f"; cp={c.cp} at {co.cp_rank}" if c.cp > 1 else ""),
             f"  microbatches={c.microbatches} schedule={c.schedule} codegen={c.codegen} "
             f"recompute={c.recompute} sequence_parallel={c.sequence_parallel}"]
    lines += ["  " + pm.auto_plan.summary()] if getattr(pm, "auto_plan", None) else []
    nparam = sum(p.numel() for p in pm.parameters())
    lines.append(f"  parameters: {len(pm._params)} tensors, {nparam:,} elements on this rank")
    if pm._buckets.num_buckets:
        lines.append(f"  data-parallel gradient buckets: {pm._buckets.num_buckets} "
                     f"({_fmt_bytes(pm._buckets.nbytes)}), reduced with SUM of "
                     "loss-weighted gradients, overlapped with backward")
    else:
        lines.append("  data-parallel gradient buckets: none (nothing to reduce: gradients "
                     "stay where autograd puts them)")
    if c.pp > 1:
        from .codegen.split_backward import split_stats
        lines.append(
            "  split backward: " + (
                "on — chunks after the first send input gradients before computing weight "
                f"gradients (this process so far: {split_stats['deferred']} deferred, "
                f"{split_stats['inline']} run inline)" if c.split_backward else "off"))
    if not pm._programs:
        lines.append("  (no step run yet: capture and compile happen on the first train_step)")
        return "\n".join(lines)
    for i, prog in enumerate(pm._programs.values()):
        gm = prog.program.gm
        plan = prog.program.plan
        shapes = [tuple(t.shape) for t in prog.captured.example_user_inputs]
        nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function")
        lines.append(f"  program {i}: user inputs {shapes}; graph of {nodes} ops")
        top = ", ".join(f"{k.split('.')[1] if k.startswith('aten.') else k}×{v}"
                        for k, v in op_histogram(gm).most_common(8))
        lines.append(f"    most frequent ops: {top}")
        lines.append(f"    loss weighting: {plan.loss_weighting}")
        for name, summary in plan.pass_log:
            lines.append(f"    pass {name}: {summary}")
        if hasattr(getattr(plan, "recompute", None), "layers"):   # a RecomputeReport
            from .passes.recompute import explain_lines
            lines.extend(explain_lines(gm, plan.recompute))
        lines.append("    parameter placements:")
        for pp_ in plan.params.values():
            extra = ""
            if pp_.local_shape is not None:
                extra += f" -> local {pp_.local_shape}"
            if pp_.grad_tp_reduce:
                extra += " (grad summed over tp)"
            if getattr(pp_, "fsdp_numel", None):
                extra += (f" (flat 1/{c.dp_shard} over dp_shard: {pp_.fsdp_numel} elements, "
                          "gathered per layer)")
            if getattr(pp_, "ep", 1) > 1:
                extra += f" (experts: dim 0 split over ep={pp_.ep})"
            if pp_.role:
                extra += f"  [{pp_.role}]"
            placement = pp_.placement or "Replicate"   # None: replicated
            lines.append(f"      {pp_.name:<40} {str(pp_.full_shape):<16} {placement}{extra}")
        if getattr(plan, "coverage", None):
            from .passes.tp_coverage import table
            lines.extend(table(plan.coverage))
        rewrites = getattr(plan, "tp_rewrites", None)
        if rewrites:
            lines.append("    rewritten shapes (full -> this rank):")
            for node, old, new in rewrites:
                lines.append(f"      {node:<28} {list(old)} -> {list(new)}")
        if plan.collectives:
            lines.append("    collectives:")
            for col in plan.collectives:
                b = f", {_fmt_bytes(col.bytes_per_microbatch)}/microbatch" \
                    if col.bytes_per_microbatch else ""
                lines.append(f"      {col.kind} over {col.axis} at {col.where}{b}"
                             f"{' — ' + col.note if col.note else ''}")
    try:   # this rank's predicted peak, broken down (planner/memory.py)
        lines.extend(pm.predict_memory().lines("  "))
    except Exception as e:   # a report must not fail on its estimate
        lines.append(f"  predicted peak memory: not available ({type(e).__name__}: {e})")
    lines.append(f"  compiles so far in this process: {compile_stats['compiles']} "
                 f"({compile_stats['seconds']:.1f} s)")
    return "\n".join(lines)

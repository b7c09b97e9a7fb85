"""The README's two pictures, regenerated from the code (committed under docs/figures/).

    python -m benchmarks.readme_figures            # both (about a minute on 2 CPU cores)

- ``timeline_interleaved.png``: the last step of an interleaved 1F1B run (pp=4 × v=2
  chunks per rank, 8 microbatches, 4 gloo ranks) as the ranks ran it: ``pm.timeline``
  (ptdp_compiler/timeline.py), the picture of Narayanan et al. 2021 Fig. 4 with the
  measured bubble. The model is examples/models/sleepy.py, compiled and run like any
  other, whose layers sleep a fixed time: on a shared CPU real compute time is noise, and
  the picture is meant to show the schedule.
- ``llama_layer_tp2_sp.png``: one transformer layer of Hugging Face's Llama (the model
  zoo's tiny config, transformers' own class) at tp=2 with sequence parallelism, as
  ``inspect`` / ``pm.dump`` draw it (ptdp_compiler/dump.py): the layer chosen by dataflow,
  collectives red, matmuls blue, on a fake process group (nothing runs).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "docs", "figures")


def _timeline_job(path: str):
    import torch
    import ptdp_compiler as ptdp
    from examples.models.sleepy import SleepyStack
    torch.manual_seed(0)
    pm = ptdp.parallelize(SleepyStack(layers=8, ms=15), pp=4, virtual_stages=2, microbatches=8,
                          schedule="interleaved", codegen="aot_eager")
    ids = torch.randint(0, 8, (16, 4), generator=torch.Generator().manual_seed(1))
    for _ in range(3):   # the last of a few steps: warmed up
        pm.train_step(ids, ids)
    return pm.timeline(path)["bubble"]


def timeline(out_dir: str = OUT) -> str:
    import ptdp_compiler as ptdp
    trace = os.path.join(out_dir, "timeline_interleaved.json")
    bubble = ptdp.launch(_timeline_job, trace, world_size=4, timeout=600)[0]
    os.remove(trace)   # the Chrome trace is regenerated on demand; the picture is committed
    print(f"timeline: measured bubble {bubble:.3f}")
    return os.path.join(out_dir, "timeline_interleaved.png")


def llama_layer(out_dir: str = OUT) -> str:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from benchmarks.zoo_models import batch, build
    from ptdp_compiler.config import ParallelConfig
    from ptdp_compiler.dump import draw_graph, pick_layer
    from ptdp_compiler.program import build_program
    from ptdp_compiler.runtime.mesh import build_mesh
    model = build("llama")
    args, kwargs = batch("llama", 2)
    cfg = ParallelConfig(tp=2, sequence_parallel=True)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        prog = build_program(model, cfg, (args, kwargs, None), build_mesh(1, 1, 2),
                             dict(model.named_parameters()), until="passes")
    finally:
        dist.destroy_process_group()
    path = os.path.join(out_dir, "llama_layer_tp2_sp.png")
    draw_graph(pick_layer(prog.gm), path,
               "Hugging Face Llama, tp=2 + SP, rank 0: one layer")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--only", choices=["timeline", "layer"])
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.only != "layer":
        print(timeline(a.out))
    if a.only != "timeline":
        print(llama_layer(a.out))


if __name__ == "__main__":
    main()

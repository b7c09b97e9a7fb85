"""benchmarks/report.py on synthetic JSON files, the README's figures against the results,
benchmarks/pg_traffic.py on 2 gloo ranks, and the GPU benchmark's code path on CPU."""
import json

import pytest
import torch

from benchmarks import report


def _write(d, name, rows, **extra):
    (d / f"{name}.json").write_text(json.dumps({"benchmark": name, "device": "cpu", "torch": "x",
                                                "rows": rows, **extra}))


def test_report_renders_tables_unknown_keys_and_missing(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _write(res, "vs_torch_native",
           [{"model": "gpt", "config": "tp2", "ptdp_s": 0.05, "native_eager_s": 0.1,
             "native_compiled_s": 0.08, "ratio_eager": 2.0, "ratio_compiled": 1.6,
             "ptdp_bytes": 10, "native_eager_bytes": 20, "loss_diff": 0.0,
             "brand_new_key": "a|b", "ptdp_ops": {"all_reduce": 10}}],
           command="python benchmarks/vs_torch_native.py --steps 5")
    _write(res, "some_future_bench", [{"x": 1}, {"y": None}])
    (res / "broken.json").write_text("{not json")
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{report.BEGIN}\nold text\n{report.END}\nbottom\n")

    report.main(["--readme", str(readme), "--results", str(res)])
    text = readme.read_text()

    assert text.startswith("top\n") and text.endswith("bottom\n") and "old text" not in text
    assert "`python benchmarks/vs_torch_native.py --steps 5`" in text
    header = next(l for l in text.splitlines() if l.startswith("| model"))
    assert header.split(" | ")[:4] == ["| model", "config", "ptdp_s",    # preferred order first
                                       "native_eager_s"]
    assert "brand_new_key" in header and "ptdp_ops" not in header       # nested values left out
    assert "a\\|b" in text                                              # cells cannot break rows
    assert "| x | y |" in text and "### some_future_bench" in text
    assert "unreadable" in text                                         # a bad file is named
    assert "Not yet measured" in text and "benchmarks/tp_comm.py" in text
    # idempotent: a second run gives the same file
    report.main(["--readme", str(readme), "--results", str(res)])
    assert readme.read_text() == text


def test_report_fills_readme_figures_from_the_json(tmp_path):
    """Prose figures (<!-- fig:NAME -->text<!-- /fig -->) are recomputed from the tables'
    JSON; a figure without its JSON keeps its text; an unknown name is refused."""
    res = tmp_path / "results"
    res.mkdir()
    _write(res, "pipeline", [{"bubble_measured": 0.26, "bubble_formula": 0.25},
                             {"bubble_measured": 0.127, "bubble_formula": 0.1},
                             {"bubble_measured": None, "bubble_formula": None}])
    readme = tmp_path / "README.md"
    readme.write_text(f"bubble <!-- fig:pipeline_bubble -->1.02–1.20×<!-- /fig --> and "
                      f"<!-- fig:activation_range -->0.1–3%<!-- /fig -->\n"
                      f"{report.BEGIN}\n{report.END}\n")
    report.main(["--readme", str(readme), "--results", str(res)])
    text = readme.read_text()
    assert "<!-- fig:pipeline_bubble -->1.04–1.27×<!-- /fig -->" in text
    assert "<!-- fig:activation_range -->0.1–3%<!-- /fig -->" in text   # no JSON: kept
    readme.write_text(f"<!-- fig:no_such_figure -->1<!-- /fig -->\n{report.BEGIN}\n{report.END}\n")
    with pytest.raises(SystemExit):
        report.main(["--readme", str(readme), "--results", str(res)])


def test_readme_figures_agree_with_the_results():
    """Every figure the README's (and docs/*.md's) prose quotes is what the JSON in
    benchmarks/results gives (run ``python -m benchmarks.report`` after re-running a
    benchmark); the generated tables in docs/benchmarks.md are what it renders."""
    import os
    results = os.path.join(report.ROOT, "benchmarks", "results")
    files = report.figure_files()
    assert os.path.join(report.ROOT, "README.md") in files
    for path in files:
        with open(path) as f:
            text = f.read()
        new, stale = report.fill_figures(text, results)
        assert not stale, path
        assert report.FIGURE.findall(text) == report.FIGURE.findall(new), path
    with open(os.path.join(report.ROOT, report.TABLES_FILE)) as f:
        tables = f.read()
    assert report.BEGIN in tables and report.END in tables


def test_pg_traffic_counts_what_gloo_ran():
    """benchmarks/pg_traffic.py on 2 gloo ranks: a reduce-scatter inside a custom op (which a
    TorchDispatchMode would not see) is counted, gloo runs it as a full-size all-reduce
    (twice NCCL's ring bytes), the all-reduce of a functional collective's backward is marked so."""
    import ptdp_compiler as ptdp
    rows = ptdp.launch(_pg_traffic_job, world_size=2)
    ops = rows[0]
    assert [(o["kind"], o["phase"], o["gloo_algorithm"]) for o in ops] == [
        ("all_gather", "forward", "all_gather"), ("reduce_scatter", "forward", "all_reduce"),
        ("all_reduce", "forward", "all_reduce"), ("all_reduce", "backward", "all_reduce"),
        ("all_reduce", "forward", "all_reduce")]
    ag, rs, ar, ar_bwd, scalar = ops
    assert scalar["payload_bytes"] == 8 and scalar["nccl_bytes"] == 8   # 2·(t−1)/t·8
    assert ag["payload_bytes"] == 4 * 8 * 4 and ag["gloo_bytes"] == ag["nccl_bytes"] == 128
    assert rs["payload_bytes"] == 4 * 8 * 4 and rs["gloo_bytes"] == 2 * rs["nccl_bytes"] == 128
    assert ar["gloo_bytes"] == ar["nccl_bytes"] == ar_bwd["nccl_bytes"] == 128


@torch.library.custom_op("ptdp_test::rs_inside", mutates_args=())
def _rs_inside(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    out = x.new_empty(x.shape[0] // 2, *x.shape[1:])
    dist.reduce_scatter_tensor(out, x.contiguous())
    return out


def _pg_traffic_job():
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc
    from benchmarks.pg_traffic import ProcessGroupTraffic
    x = torch.ones(4, 8, requires_grad=True)
    with ProcessGroupTraffic(2) as traffic:
        out = torch.empty(8, 8)
        dist.all_gather_into_tensor(out, x.detach())
        _rs_inside(x.detach())
        y = fc.all_reduce(x * 2, "sum", dist.group.WORLD)   # its backward all-reduces
        fc.wait_tensor(y).sum().backward()
        dist.all_reduce(torch.zeros((), dtype=torch.float64))   # a 0-d tensor: 8 bytes
    return traffic.ops


def test_report_refuses_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        report.main(["--readme", str(readme), "--results", str(tmp_path)])


def test_gpu_throughput_smoke_run_on_cpu_matches_eager_loss(tmp_path):
    """The GPU benchmark's own code path (same script, tiny sizes, CPU), so a GPU session
    spends its minutes measuring rather than debugging; ptdp's loss must equal eager's."""
    from benchmarks import gpu_throughput
    out = tmp_path / "g.json"
    rc = gpu_throughput.main(["--device", "cpu", "--hidden", "64", "--heads", "4", "--seq", "32",
                              "--layers", "2", "--vocab", "128", "--codegen", "aot_eager",
                              "--modes", "eager,ptdp,ptdp:none", "--warmup", "1", "--iters", "1",
                              "--rounds", "2", "--dtype", "bfloat16",
                              "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [r["mode"] for r in rows] == ["eager", "ptdp", "ptdp:none"]
    assert all(r["loss_ok"] for r in rows[1:]) and rows[0]["loss"] > 0
    assert all(r["step_ms"] > 0 and r["mfu"] is None for r in rows)   # no peak known for a CPU
    assert gpu_throughput.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4

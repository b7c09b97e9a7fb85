"""benchmarks/report.py on synthetic JSON files (no distributed runs)."""
import json

import pytest

from benchmarks import report


def _write(d, name, rows, **extra):
    (d / f"{name}.json").write_text(json.dumps({"benchmark": name, "device": "cpu", "torch": "x",
                                                "rows": rows, **extra}))


def test_report_renders_tables_unknown_keys_and_missing(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _write(res, "vs_torch_native",
           [{"model": "gpt", "config": "tp2", "ptdp_s": 0.05, "native_s": 0.1, "ratio": 2.0,
             "ptdp_bytes": 10, "native_bytes": 20, "loss_diff": 0.0, "brand_new_key": "a|b",
             "ptdp_ops": {"all_reduce": 10}}],
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
    assert header.split(" | ")[:3] == ["| model", "config", "ptdp_s"]   # preferred order first
    assert "brand_new_key" in header and "ptdp_ops" not in header       # nested values left out
    assert "a\\|b" in text                                              # cells cannot break rows
    assert "| x | y |" in text and "### some_future_bench" in text
    assert "unreadable" in text                                         # a bad file is named
    assert "Not yet measured" in text and "benchmarks/tp_comm.py" in text
    # idempotent: a second run gives the same file
    report.main(["--readme", str(readme), "--results", str(res)])
    assert readme.read_text() == text


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

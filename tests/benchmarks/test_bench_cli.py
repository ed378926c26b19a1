"""``lowcost bench``: a quick run writes rows and a plot into a folder of our choosing (and leaves the README
alone); a provider that disagrees with the reference is refused before timing; the README tables are
regenerated between their markers only; bad input is one line with exit status 2."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lowcost.cli import main

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_list(capsys):
    assert main(["bench", "--list"]) == 0
    assert {"lora_linear", "apply", "checkpoint", "offload", "warmstart"} <= set(capsys.readouterr().out.split())


def test_quick_run_writes_rows_and_a_plot(tmp_path):
    readme = (ROOT / "README.md").read_bytes()
    assert main(["bench", "lora_linear", "--quick", "--results", str(tmp_path)]) == 0
    with (tmp_path / "lora_linear.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["provider"] for r in rows} >= {"linear (floor)", "lowcost-torch"} and len(rows) >= 4
    assert all(r["git"] and r["hardware"] and r["torch"] == torch.__version__ for r in rows)
    png = tmp_path / "lora_linear_cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ROOT / "README.md").read_bytes() == readme


def test_a_wrong_kernel_is_refused_before_timing(monkeypatch):
    bench = _load("bench_lora_linear")
    harness = sys.modules["harness"]
    backend = importlib.import_module("lowcost.ops._torch_backend")
    real_forward = backend.forward

    def off_by_a_little(*args):
        y, u = real_forward(*args)
        return y * 1.001, u

    layers, _, ours = bench.make_layers(48, 40, 4, 8.0, 0.05, torch.float32, torch.device("cpu"))
    x, grad = torch.randn(24, 48), torch.randn(24, 40)
    bench.check_layers(layers, ours, x, grad, 0.05)                     # the real kernel passes
    monkeypatch.setattr(backend, "forward", off_by_a_little)
    with pytest.raises(harness.ProviderMismatch, match="lowcost-torch .*disagrees.* y off by"):
        bench.check_layers(layers, ours, x, grad, 0.05)


def test_check_providers_rules():
    harness = _load("harness")
    ref = {"y": torch.ones(3, dtype=torch.float64)}
    assert harness.check_providers(ref, {"a": {"y": torch.ones(3)}}, 1e-6) == {"a": 0.0}
    with pytest.raises(harness.ProviderMismatch, match="NaN|off by nan"):
        harness.check_providers(ref, {"a": {"y": torch.tensor([1.0, float("nan"), 1.0])}}, 1e-6)
    with pytest.raises(harness.ProviderMismatch, match="shape"):
        harness.check_providers(ref, {"a": {"y": torch.ones(4)}}, 1e-6)
    with pytest.raises(harness.ProviderMismatch, match="gave no 'y'"):
        harness.check_providers(ref, {"a": {}}, 1e-6)


def test_readme_tables_only_between_markers(tmp_path):
    tables = _load("readme_tables")
    results = tmp_path / "results"
    results.mkdir()
    header = "date,git,hardware,torch,provider,M,K,N,r,dtype,dropout,median_ms,p20_ms,p80_ms,repeats,saved_bytes\n"
    rows = "".join(f"2030-01-01T00:00:00Z,abc,CPU X,2.13,{p},8,4,6,2,float32,0.0,{t},{t},{t},3,1024\n"
                   for p, t in (("linear (floor)", 1.0), ("peft", 2.0), ("lowcost-torch", 1.5)))
    (results / "lora_linear.csv").write_text(header + rows)
    readme = tmp_path / "README.md"
    readme.write_text("intro 1.23 ms typed\n<!-- lowcost-bench:lora_linear -->\nold\n<!-- /lowcost-bench:lora_linear -->\n"
                      "<!-- lowcost-bench:apply -->\nkept\n<!-- /lowcost-bench:apply -->\nend\n")
    assert tables.update_readme(readme, results) == ["lora_linear"]
    text = readme.read_text()
    assert text.startswith("intro 1.23 ms typed\n") and text.endswith("kept\n<!-- /lowcost-bench:apply -->\nend\n")
    assert "old" not in text and "| 8×4×6, p=0.0 | 1.0 ms [1.0, 1.0] | 2.0 ms [2.0, 2.0] | 1.5 ms [1.5, 1.5] | 0.75 |" in text


@pytest.mark.parametrize("argv, match", [
    (["bench"], "name at least one benchmark"),
    (["bench", "lora_lin"], "unknown benchmark 'lora_lin'"),
    (["bench", "lora_linear", "apply", "--args", "--repeats 2"], "name exactly one"),
    (["bench", "lora_linear", "--benchmarks", "/nonexistent"], "source checkout"),
    (["bench", "--tables-only", "--quick"], "--tables-only"),
])
def test_bad_input(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowcost bench: error:") and match in err and "\n" not in err

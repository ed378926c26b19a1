"""benchmarks/device/bench_targets.py (the GPU targets of issues #12 and #13) runs end to end without a GPU
(--dry-run: tiny shapes, the torch backend on the CPU), so the device script's ``targets`` part is known to work
before a GPU is lent: every provider gets a row, the ratios are against the right floor, and the summary lines
that run.sh copies into its summary are printed."""
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_writes_a_row_per_provider(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "device" / "bench_targets.py"), "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "targets.csv") as handle:
        rows = list(csv.DictReader(handle))
    layer = {row["provider"]: row for row in rows if row["part"] == "layer"}
    qlora = {row["provider"]: row for row in rows if row["part"] == "qlora"}
    assert {"frozen", "lowcost torch p=0.0", "lowcost torch p=0.05"} <= layer.keys()
    assert {"torch bf16 W", "torch nf4 W"} <= qlora.keys()
    assert float(layer["frozen"]["ratio"]) == 1.0 and float(qlora["torch bf16 W"]["ratio"]) == 1.0
    assert all(float(row["median_ms"]) > 0 for row in rows)
    assert "target #12" in done.stdout and "target #13" in done.stdout


def test_refuses_to_run_without_a_gpu_unless_dry():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU; this one has one")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device" / "bench_targets.py")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr

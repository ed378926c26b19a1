"""Launching a distributed scenario under torchrun from a test: two CPU processes on gloo, with a timeout.

``torchrun(script, args)`` runs any script that way (the ``lowcost finetune`` test uses it);
``torchrun_scenario(name, out_dir)`` runs ``worker.py name out_dir`` under ``torch.distributed.run
--standalone`` (a free port, so parallel test runs do not collide) in its own process group; if it has not
finished within ``timeout`` seconds the whole group is killed and the test fails with the output's tail,
so a hang fails CI instead of blocking it. Each rank writes ``rank<r>.json``; they are returned as a list.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
WORKER = HERE / "worker.py"


def _environment(timeout: int) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               LOWCOST_DIST_TIMEOUT=str(max(30, timeout // 2)),
               PYTHONPATH=os.pathsep.join([str(HERE), str(TESTS), env.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the workers use the torch backend on CPU; no Triton kernel runs
    return env


def torchrun(script: Path, args=(), nprocs: int = 2, timeout: int = 300, torchrun_args=(), env=None) -> str:
    """Runs ``torchrun [torchrun_args] script args`` (killed after ``timeout`` s); returns its output.
    AssertionError, with the output's tail, when it fails or hangs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
           *map(str, torchrun_args), str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**_environment(timeout), **(env or {})}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{script.name} {' '.join(map(str, args[:1]))} did not finish within {timeout}s "
                             f"(hang?); output tail:\n{output[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(map(str, args[:1]))} failed (exit {proc.returncode}); "
                             f"output tail:\n{output[-6000:]}")
    return output


def torchrun_scenario(name: str, out_dir: Path, nprocs: int = 2, timeout: int = 300, args=()) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = torchrun(WORKER, [name, out_dir, *args], nprocs, timeout)
    results = []
    for rank in range(nprocs):
        path = out_dir / f"rank{rank}.json"
        assert path.is_file(), f"scenario {name!r}: rank {rank} wrote no results; output tail:\n{output[-3000:]}"
        results.append(json.loads(path.read_text()))
    return results

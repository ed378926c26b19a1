"""``lowcost.cli.program``, the entry of the ``lowcost`` program: it exits with ``main``'s code, and after a
torchrun run that destroyed the process group it created it skips interpreter finalisation (a gloo native
thread can otherwise abort the finished process while the interpreter finalises; see ``program``)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, sys
    import lowcost.cli as cli
    from lowcost.cli import _distributed_run
    atexit.register(lambda: print("finalised", flush=True))
    cli.main = lambda argv=None: 3
    _distributed_run.GROUP_DESTROYED = sys.argv[1] == "destroyed"
    print("ran", flush=True)
    cli.program()
""")


@pytest.mark.parametrize("group, finalised", [("destroyed", False), ("none", True)])
def test_exit_code_and_finalisation(group, finalised):
    out = subprocess.run([sys.executable, "-c", SCRIPT, group], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0] == "ran" and ("finalised" in lines) == finalised, out.stdout

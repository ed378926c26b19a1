"""``lowcost.cli.program``, the entry of the ``lowcost`` program: it exits with ``main``'s code, and under
torchrun with several processes (where ``lowcost finetune`` creates and destroys the process group) it skips
interpreter finalisation (a gloo native thread can otherwise abort the finished process while the interpreter
finalises; see ``lowcost.distributed.exiting``). Also ``exit_skipping_finalisation`` itself."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit
    import lowcost.cli as cli
    atexit.register(lambda: print("finalised", flush=True))
    cli.main = lambda argv=None: 3
    print("ran", flush=True)
    cli.program()
""")

HELPER = textwrap.dedent("""
    import atexit, sys
    from lowcost.distributed import exit_skipping_finalisation
    atexit.register(lambda: print("finalised", flush=True))
    print("buffered, not flushed", end="")
    sys.stderr.write("on stderr")
    exit_skipping_finalisation(int(sys.argv[1]))
""")


def _run(script: str, args=(), world_size=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("world_size, finalised", [("2", False), ("4", False), ("1", True), (None, True),
                                                   ("two", True)])
def test_exit_code_and_finalisation(world_size, finalised):
    out = _run(SCRIPT, world_size=world_size)
    assert out.returncode == 3, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0] == "ran" and ("finalised" in lines) == finalised, out.stdout


@pytest.mark.parametrize("code", [0, 5])
def test_exit_skipping_finalisation_flushes_and_skips_atexit(code):
    out = _run(HELPER, [str(code)])
    assert out.returncode == code, out.stderr[-2000:]
    assert out.stdout == "buffered, not flushed" and out.stderr == "on stderr"


@pytest.mark.parametrize("code", [-1, 256, True, "0"])
def test_exit_skipping_finalisation_refuses_a_bad_code(code):
    from lowcost.distributed import exit_skipping_finalisation
    with pytest.raises(ValueError, match=r"code must be an exit status, an int in \[0, 255\]"):
        exit_skipping_finalisation(code)

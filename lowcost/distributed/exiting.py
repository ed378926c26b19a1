"""``exit_skipping_finalisation``: how a process that used a gloo process group ends without a spurious abort.

After ``torch.distributed.destroy_process_group()`` a native thread of gloo (or of DCP's writers) can
outlive the group. If the interpreter is finalising when that thread next tries to take the GIL, the
thread is terminated and the process dies with SIGABRT ("terminate called without an active exception",
no Python frame), although the work had finished and every file was written: torchrun then reports the
run as failed. Seen in about 1 of 30 two-process launches, more often on a loaded machine.

Skipping finalisation removes the race: flush stdout and stderr and end the process with ``os._exit``.
That also skips ``atexit`` handlers and the flushing of files left open, so call it only once everything
the process writes is closed (lowcost writes its files inside ``with`` blocks)::

    try:
        train_and_save()
    finally:
        torch.distributed.destroy_process_group()
    lowcost.distributed.exit_skipping_finalisation(0)
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_skipping_finalisation(code: int = 0) -> NoReturn:
    """Flushes stdout and stderr, then ends the process with exit status ``code`` at once (``os._exit``),
    without finalising the interpreter (see the module docstring for the race this avoids)."""
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
        raise ValueError(f"code must be an exit status, an int in [0, 255], got {code!r}")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):   # None, a closed pipe or a closed file: nothing to flush
            pass
    os._exit(code)

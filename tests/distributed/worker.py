"""torchrun entry point of the distributed tests: ``worker.py SCENARIO OUT_DIR [ARGS...]``.

Initialises gloo (with a timeout, so a collective that never completes raises instead of hanging), runs
``scenario_<SCENARIO>.run(out_dir, *args)`` and writes its result dict to ``OUT_DIR/rank<r>.json``.

The process ends with ``os._exit`` once the result is written and the process group destroyed: about one
run in thirty (more often on a loaded machine), a native thread left over from gloo/DCP tried to take the
GIL while the interpreter was finalising, and the rank died with SIGABRT ("terminate called without an
active exception", no Python frame) after its scenario had passed. Skipping finalisation removes that race;
every file the scenario writes is closed before.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    warnings.filterwarnings("ignore")
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    timeout = datetime.timedelta(seconds=int(os.environ.get("LOWCOST_DIST_TIMEOUT", "120")))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        result = importlib.import_module(f"scenario_{scenario}").run(out_dir, *sys.argv[3:])
        (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    finally:
        dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

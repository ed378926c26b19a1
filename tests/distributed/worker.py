"""torchrun entry point of the distributed tests: ``worker.py SCENARIO OUT_DIR [ARGS...]``.

Initialises gloo (with a timeout, so a collective that never completes raises instead of hanging), runs
``scenario_<SCENARIO>.run(out_dir, *args)`` and writes its result dict to ``OUT_DIR/rank<r>.json``.

The process ends with ``lowcost.distributed.exit_skipping_finalisation`` once the result is written and the
process group destroyed (a gloo/DCP native thread could otherwise abort the rank while the interpreter
finalises, after its scenario had passed; see that function).
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

from lowcost.distributed import exit_skipping_finalisation


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
    exit_skipping_finalisation(0)


if __name__ == "__main__":
    main()

"""torchrun entry of test_finetune_torchrun.py: ``torchrun_finetune.py REPORT_DIR ROOT ONE_RUN FINETUNE_ARGS...``.

Every rank runs, in one launch (the process group is created here, so ``lowcost finetune`` joins it and
leaves it alive between the calls):

1. ``lowcost finetune FINETUNE_ARGS --batch 3 --out ROOT/refused``: must be refused before any work;
2. for MODE in ddp, fsdp: ``lowcost finetune FINETUNE_ARGS --distributed MODE --out ROOT/MODE``. On ranks
   other than 0 a Python audit hook records every file-system change under ROOT (opening for writing,
   mkdir, rename, remove, chmod, rmtree);
3. rank 0 copies ROOT/MODE to ROOT/MODE-resumed without its newest checkpoint and final outputs (as if the
   run had been killed after the one before), then every rank runs step 2's command there with ``--resume``;
4. ONE_RUN, a run of one process with FINETUNE_ARGS, is copied the same way to ROOT/one-resumed and resumed
   there by the two processes: with ``--distributed fsdp`` (refused: its optimizer state is whole), then DDP;
5. ROOT/fsdp is copied the same way to ROOT/fsdp-to-ddp and resumed there with ``--distributed ddp`` (the
   sharded DCP state loaded into whole tensors, at the same world size).

Each rank writes ``REPORT_DIR/rank<r>.json``: exit codes, the refusals' messages, the recorded changes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

os.environ.pop("TQDM_DISABLE", None)  # the test checks that rank 0, and only rank 0, shows a progress bar

import torch.distributed as dist  # noqa: E402

from cli_helpers import strip_last_checkpoint  # noqa: E402

_WATCHED: list[str] = []
_CHANGES: list[list] = []
_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "shutil.rmtree", "os.truncate",
           "os.link", "os.symlink"}


def _writes(event: str, args: tuple) -> bool:
    if event in _EVENTS:
        return True
    if event != "open":
        return False
    _, mode, flags = args
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _audit(event: str, args: tuple) -> None:
    if not _WATCHED or not _writes(event, args) or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    if any(path == root or path.startswith(root + os.sep) for root in _WATCHED):
        _CHANGES.append([event, path])


def _finetune(argv: list[str], capture: bool = False) -> tuple[int, str]:
    """(exit code, what it wrote to stderr when ``capture``; else it goes to this rank's stderr log)."""
    from lowcost.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err) if capture else contextlib.nullcontext():
        code = main(["finetune", *argv])
    return code, err.getvalue()


def _run_and_resume(args: list[str], out: Path, rank: int) -> dict:
    result = {"code": _finetune([*args, "--out", str(out)])}
    dist.barrier()
    if rank == 0:
        strip_last_checkpoint(out, out.with_name(out.name + "-resumed"))
    dist.barrier()
    result["resumed"] = _finetune([*args, "--out", str(out.with_name(out.name + "-resumed")), "--resume"])
    return result


def _resume_one_process_run(args: list[str], one: Path, out: Path, rank: int) -> dict:
    if rank == 0:
        strip_last_checkpoint(one, out)
    dist.barrier()
    resumed = [*args, "--out", str(out), "--resume"]
    return {"fsdp": _finetune([*resumed, "--distributed", "fsdp"], capture=True), "ddp": _finetune(resumed)}


def _resume_fsdp_run_under_ddp(args: list[str], fsdp_run: Path, out: Path, rank: int) -> tuple[int, str]:
    if rank == 0:
        strip_last_checkpoint(fsdp_run, out)
    dist.barrier()
    return _finetune([*args, "--distributed", "ddp", "--out", str(out), "--resume"])


def main() -> None:
    report, root, one, args = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {}
    try:
        result["refused"] = _finetune([*args, "--batch", "3", "--out", str(root / "refused")], capture=True)
        if rank != 0:
            sys.addaudithook(_audit)
            _WATCHED.append(os.path.abspath(root))
        for mode in ("ddp", "fsdp"):
            result[mode] = _run_and_resume([*args, "--distributed", mode], root / mode, rank)
        result["one"] = _resume_one_process_run(args, one, root / "one-resumed", rank)
        _WATCHED.clear()
        result["changes"] = _CHANGES
        result["fsdp-to-ddp"] = _resume_fsdp_run_under_ddp(args, root / "fsdp", root / "fsdp-to-ddp", rank)
    finally:
        dist.destroy_process_group()
    (report / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    from lowcost.distributed import exit_skipping_finalisation
    exit_skipping_finalisation(0)  # a gloo thread could abort interpreter finalisation (see that function)


if __name__ == "__main__":
    main()

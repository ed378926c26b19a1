"""The output directory of ``lowcost finetune`` and its checkpoints, written so that nothing saved is lost.

Layout of ``--out DIR``::

    run.json                 the options of the run (written first: marks DIR as holding a run)
    checkpoints/step-000020/ adapter/ (PEFT layout), trainer_state.pt, state.json — every --save-every steps
    adapter/                 the final adapter (PEFT layout); tokenizer/ too when --new-tokens added words
    metrics.json, loss.png   written at the end

A checkpoint is assembled in a temporary directory next to its final place, every file and the directory
are fsync'ed, and one ``rename`` publishes it: a crash (or SIGKILL) mid-save leaves a stray ``.tmp-*``
directory, which is ignored and removed later, and the previous checkpoint intact. The two newest
checkpoints are kept. ``trainer_state.pt`` (optimizer, scheduler, RNG states) is read back with
``torch.load(weights_only=True)``, which cannot run code; the adapter is safetensors; the rest is JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from lowcost.cli import CLIError

RUN_FILE = "run.json"
OUTPUTS = (RUN_FILE, "metrics.json", "loss.png", "adapter", "tokenizer", "checkpoints")
_STEP = re.compile(r"^step-(\d+)$")
KEEP = 2


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Builds a directory with ``fill(tmp)`` and renames it to ``final`` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fill(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_file(path: Path, text: str) -> None:
    """Atomically replaces ``path`` with ``text`` (temp file, fsync, rename)."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Fails before any work if ``out`` cannot take this run: not a directory, not writable, or holding
    another run without ``--overwrite`` / ``--resume``."""
    if overwrite and resume:
        raise CLIError("--overwrite and --resume exclude each other")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    holds_run = (out / RUN_FILE).is_file()
    if resume and not holds_run:
        raise CLIError(f"--resume: {out} holds no run to resume ({RUN_FILE} missing)")
    if holds_run and not (overwrite or resume):
        raise CLIError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"--out {out}: not writable ({exc.strerror or exc})") from None


def clear_outputs(out: Path) -> None:
    """--overwrite: removes what an earlier run wrote (and only that)."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Published checkpoints, oldest first."""
    root = out / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()] \
        if root.is_dir() else []
    return sorted(found)


def save_checkpoint(out: Path, step: int, save_adapter: Callable[[Path], None], trainer_state: dict,
                    state: dict) -> Path:
    """Publishes checkpoint ``step`` atomically and prunes all but the newest ``KEEP``."""
    def fill(tmp: Path) -> None:
        save_adapter(tmp / "adapter")
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    path = publish_dir(out / "checkpoints" / f"step-{step:06d}", fill)
    prune_checkpoints(out)
    return path


def prune_checkpoints(out: Path) -> None:
    """Removes all but the newest ``KEEP`` checkpoints and the ``.tmp-*`` directories of interrupted saves
    (call it on the one process that writes, once the newest checkpoint is published)."""
    for _, old in checkpoints(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in (out / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)


def latest_checkpoint(out: Path) -> Optional[tuple[Path, dict, dict]]:
    """(directory, trainer_state, state) of the newest checkpoint, or None."""
    found = checkpoints(out)
    if not found:
        return None
    path = found[-1][1]
    trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return path, trainer_state, state


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

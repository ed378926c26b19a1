"""A resumable training state (adapters, optimizer, step, RNG) saved with torch.distributed.checkpoint.

    save_training_state("ckpt/", model, optimizer, step)        # every rank calls it
    info = load_training_state("ckpt/", model, optimizer)       # any world size, sharded or not
    for step in range(info.step, total): ...

What is saved: the trainable parameters only (the frozen base is the user's pretrained checkpoint, not
state), the optimizer's tensors, the step, and each rank's CPU (and current CUDA device's) RNG state.
DCP reshards on load, so a state saved by W ranks under FSDP2 loads into W' ranks, into DDP or into a
plain single-process model.

Files, no pickle anywhere: DCP writes each rank's shards as safetensors through torch's
``HuggingFaceStorageWriter`` (shard offsets in the safetensors header, read back by
``HuggingFaceStorageReader``; DCP's default writer would pickle its ``.metadata``). The optimizer's
non-tensor hyperparameters (lr, betas, ...), the step and the world size go to ``training_state.json``.
The directory is written as ``.<name>.incomplete`` next to it and renamed into place by rank 0 once every
rank has finished, so a crash never leaves a half-written state under the final name.

RNG on resume: at the same world size every rank gets its own generator state back (dropout continues
exactly). At another world size rank r takes saved rank r's state when there was one and a state derived
from (rank 0's state, r) otherwise; the masks then differ from an uninterrupted run anyway, because they
depend on how the global batch is split across ranks (``ResumeInfo.rng`` says which happened).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowcost.patch.ranks import barrier, is_main, unwrap, world

STATE_NAME = "training_state.json"
FORMAT = "lowcost-training-state"
VERSION = 1
_MODEL, _OPTIM, _RNG_CPU, _RNG_CUDA = "model.", "optim.", "rng.cpu", "rng.cuda"


@dataclass(frozen=True)
class ResumeInfo:
    """What ``load_training_state`` restored. rng: "restored" (same world size: every rank its own state)
    or "resharded" (world size changed: saved rank r's state for r < saved_world_size, derived above)."""
    step: int
    saved_world_size: int
    world_size: int
    rng: str


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kwargs)


def _model_and_optimizer_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(tensors keyed for DCP, non-tensor optimizer values) for the trainable parameters."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    params = get_model_state_dict(model, options=_options(ignore_frozen_params=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(flatten_optimizer_state_dict=True))
    tensors = {_MODEL + k: v for k, v in params.items()}
    tensors.update({_OPTIM + k: v for k, v in optim.items() if isinstance(v, torch.Tensor)})
    others = {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}
    return tensors, others


def _gathered_rng() -> dict[str, torch.Tensor]:
    """Every rank's generator state as rows of a (world, bytes) uint8 tensor, identical on all ranks."""
    states = {_RNG_CPU: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states[_RNG_CUDA] = torch.cuda.get_rng_state()
    size = world()[1]
    if size == 1:
        return {k: v[None] for k, v in states.items()}
    out = {}
    for key, state in states.items():
        rows = [torch.empty_like(state) for _ in range(size)]
        torch.distributed.all_gather(rows, state)
        out[key] = torch.stack(rows)
    return out


def _jsonable(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"optimizer value {value!r} ({type(value).__name__}) cannot be saved as JSON")


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"__tuple__"}:
        return tuple(_from_json(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


@contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' a single process when no process group exists; here that is the intent."""
    with warnings.catch_warnings():
        if world()[1] == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _incomplete(path: Path) -> Path:
    return path.parent / f".{path.name}.incomplete"


def save_training_state(directory, model: nn.Module, optimizer, step: int) -> Path:
    """Saves the trainable parameters, ``optimizer``, ``step`` and the RNG states to ``directory``.

    Collective under torch.distributed: every rank must call it. An existing ``directory`` is replaced
    only once the new state is complete. Returns the directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    path = Path(directory)
    model = unwrap(model)
    tensors, others = _model_and_optimizer_state(model, optimizer)
    tensors.update(_gathered_rng())
    work = _incomplete(path)
    if is_main():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    barrier()
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(work), save_distributed=True))
    barrier()
    if is_main():
        meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world()[1],
                "optimizer": {k: _jsonable(v) for k, v in others.items()}}
        (work / STATE_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _swap_into_place(work, path)
    barrier()
    return path


def _swap_into_place(work: Path, path: Path) -> None:
    """Renames ``work`` to ``path``; an old ``path`` is moved aside first and deleted after."""
    old = path.parent / f".{path.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(work, path)
    shutil.rmtree(old, ignore_errors=True)


def _read_meta(path: Path) -> dict:
    state = path / STATE_NAME
    if not state.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no {STATE_NAME}: not a state written by "
                                f"lowcost.distributed.save_training_state (or the save did not finish)")
    try:
        meta = json.loads(state.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{state} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{state}: format {meta.get('format')!r} version {meta.get('version')!r}; expected "
                         f"{FORMAT!r} version {VERSION}")
    return meta


def _saved_shapes(path: Path) -> dict[str, torch.Size]:
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    metadata = HuggingFaceStorageReader(str(path)).read_metadata()
    return {k: v.size for k, v in metadata.state_dict_metadata.items()}


def load_training_state(directory, model: nn.Module, optimizer) -> ResumeInfo:
    """Loads a state written by ``save_training_state`` into ``model`` and ``optimizer`` (see module doc).

    ``model`` must hold the same trainable parameters (same names and shapes; any world size, sharded or
    not) and ``optimizer`` must be of the same kind over them. Collective under torch.distributed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(directory)
    meta = _read_meta(path)
    model = unwrap(model)
    tensors, _ = _model_and_optimizer_state(model, optimizer)
    shapes = _saved_shapes(path)
    _check_keys(path, tensors, shapes)
    rng = {k: torch.empty(shapes[k], dtype=torch.uint8) for k in (_RNG_CPU, _RNG_CUDA) if k in shapes}
    tensors.update(rng)
    with _quiet_single_process():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    params = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    set_model_state_dict(model, params, options=_options(ignore_frozen_params=True, strict=False))
    optim = {k[len(_OPTIM):]: v for k, v in tensors.items() if k.startswith(_OPTIM)}
    optim.update({k: _from_json(v) for k, v in meta["optimizer"].items()})
    set_optimizer_state_dict(model, optimizer, optim, options=_options(flatten_optimizer_state_dict=True))
    how = _restore_rng(rng)
    return ResumeInfo(step=int(meta["step"]), saved_world_size=int(meta["world_size"]), world_size=world()[1],
                      rng=how)


def _check_keys(path: Path, tensors: dict, shapes: dict) -> None:
    """Every tensor the model/optimizer needs must be in the files, with the same global shape."""
    missing = sorted(k for k in tensors if k not in shapes)
    wrong = [f"{k}: saved {tuple(shapes[k])} vs now {tuple(v.shape)}" for k, v in sorted(tensors.items())
             if k in shapes and tuple(shapes[k]) != tuple(v.shape)]
    problems = ([f"missing ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"]
                if missing else []) + ([f"shape mismatches: {'; '.join(wrong[:8])}"] if wrong else [])
    if problems:
        raise ValueError(f"training state {str(path)!r} does not fit this model/optimizer: " + " | ".join(problems))


def _restore_rng(rng: dict[str, torch.Tensor]) -> str:
    """Sets this rank's generator states from the saved rows; "restored" or "resharded" (see module doc)."""
    rank, size = world()
    for key, rows in rng.items():
        state = rows[rank].clone() if rank < rows.shape[0] else _derived_state(rows[0], rank, key)
        if key == _RNG_CPU:
            torch.set_rng_state(state)
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(state)
    saved = next(iter(rng.values())).shape[0] if rng else size
    return "restored" if saved == size else "resharded"


def _derived_state(base: torch.Tensor, rank: int, key: str) -> torch.Tensor:
    """A generator state for a rank that did not exist when saving: seeded from (saved rank 0's state, rank)."""
    digest = hashlib.blake2b(base.numpy().tobytes() + f":{rank}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)
    if key == _RNG_CPU:
        return generator.get_state()
    torch.cuda.manual_seed(int.from_bytes(digest, "little") % 2**63)
    return torch.cuda.get_rng_state()

"""``lowcost finetune`` under ``torchrun --nproc_per_node N``: data parallelism with DDP on lowcost's engine.

torchrun starts N copies of the command and sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address.
With WORLD_SIZE > 1 the command joins the process group (gloo on the CPU, NCCL on GPUs, each process on
``cuda:LOCAL_RANK``), patches the model on every rank (``lowcost.apply`` is collective and checks that the
ranks agree), wraps it in ``DistributedDataParallel`` and trains on the same global batches as one process:

- ``--batch`` is the *global* micro-batch. Every rank builds the same stream of global micro-batches and keeps
  its contiguous rows (``lowcost.distributed.shard_batch``), so the world size must divide ``--batch``.
  The last micro-batch of an epoch may hold fewer sequences; it is padded with copies of its first row whose
  labels are all ignored (they add nothing to the loss), so every rank still gets the same number of rows.
- Each rank's mean loss is weighted by its share of the step's target tokens times the world size; DDP
  averages the gradients, so the gradient is that of the global token mean, as in one process. The logged
  loss is the sum of the ranks' weighted losses (an all-reduce); held-out sums are all-reduced likewise.
- Dropout masks come from ``lowcost.distributed.seed_rank(seed + 1)``: different on every rank (so a run with
  dropout depends on the world size), identical on recompute.
- Only rank 0 prints, shows the progress bar and writes files. A checkpoint holds every rank's RNG state,
  so ``--resume`` continues exactly at the same world size. At another one (``--batch`` stays the global
  micro-batch, so the batches are the same) it continues the curve to fp32 rounding; only dropout masks,
  which depend on how a batch is split, cannot continue (every rank starts a fresh stream).

``--distributed fsdp`` shards instead (``lowcost.distributed.shard_model``: FSDP2's ``fully_shard`` on every
decoder block, then the root). The adapter is then gathered by ``save_adapter`` (collective, rank 0 writes)
and the optimizer state, sharded like the parameters, goes into the checkpoint as
``lowcost.distributed.save_training_state`` (DCP, safetensors) under ``training_state/``; every rank writes
its shards into rank 0's temporary directory before rank 0 publishes it (``publish_together``). DCP reshards
that state on ``--resume`` at any world size, one process included; a whole optimizer state (one process,
DDP) cannot be resumed under FSDP2 and is refused.
``--mixed-precision bf16`` passes FSDP2 a ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; in
one process and under DDP it runs the forward passes (and the loss) under ``torch.autocast(bf16)`` instead
(``lowcost.ops.autocast`` gives lowcost's ops their casting rules), parameters and gradients staying fp32.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from lowcost.cli import CLIError
from lowcost.cli._encode import IGNORE


def environment_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when absent)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise CLIError(f"WORLD_SIZE={text!r} in the environment: expected an integer (torchrun sets it)") from None
    if size < 1:
        raise CLIError(f"WORLD_SIZE={size} in the environment: expected >= 1")
    return size


def check_batch(batch: int, world_size: int) -> None:
    """--batch is the global micro-batch: every rank must get the same number of its sequences."""
    if world_size > 1 and batch % world_size:
        below = batch // world_size * world_size
        choices = f"{below} or {below + world_size}" if below else f"{world_size}"
        raise CLIError(f"--batch {batch} is not divisible by the world size {world_size} (torchrun processes): "
                       f"--batch is the global micro-batch and every rank must get the same number of sequences; "
                       f"use --batch {choices}")


@dataclass
class Ranks:
    """This process's place in the run: (rank, world size), and the collectives the loop needs."""
    rank: int = 0
    world: int = 1
    comm_device: torch.device = torch.device("cpu")
    owns_group: bool = False         # the command created the process group (and destroys it at the end)
    mode: str = "ddp"                # --distributed: "ddp" or "fsdp"

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.mode == "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def split(self, batch: dict) -> dict:
        """This rank's rows of a collated global batch (padded to a multiple of the world size first)."""
        if self.world == 1:
            return batch
        from lowcost.distributed import shard_batch
        return shard_batch(pad_rows(batch, -batch["input_ids"].shape[0] % self.world), self.rank, self.world)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64 all-reduce); the values themselves in one process."""
        if self.world == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def rng_states(self, device: torch.device) -> list[dict]:
        """Every rank's generator states (``_rundir.rng_state``), rank order; collective."""
        from lowcost.cli._rundir import rng_state
        mine = rng_state(device)
        if self.world == 1:
            return [mine]
        gathered: list = [None] * self.world
        torch.distributed.all_gather_object(gathered, {k: v.cpu() for k, v in mine.items()})
        return gathered


def pad_rows(batch: dict, extra: int) -> dict:
    """``batch`` with ``extra`` copies of its first row appended, their labels IGNORE and chars 0 (no target)."""
    if extra == 0:
        return batch
    out = {}
    for key, value in batch.items():
        filler = value[:1].expand(extra, *value.shape[1:]).clone()
        if key == "labels":
            filler.fill_(IGNORE)
        elif key == "chars":
            filler.zero_()
        out[key] = torch.cat([value, filler])
    return out


def _device(name: Optional[str], local_rank: int) -> torch.device:
    from lowcost.cli import _options as opt
    dev = opt.device(name)
    if dev.type != "cuda":
        return dev
    if name is not None and dev.index is not None:
        raise CLIError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
    if local_rank >= torch.cuda.device_count():
        raise CLIError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s) "
                       "(start at most that many processes per node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def start(device_name: Optional[str], batch: int, mode: str = "ddp") -> tuple[Ranks, torch.device]:
    """(Ranks, this process's device): joins torchrun's process group when WORLD_SIZE > 1; ``mode``:
    --distributed (ddp or fsdp)."""
    from lowcost.cli import _options as opt
    world = environment_world_size()
    if world == 1:
        return Ranks(), opt.device(device_name)
    check_batch(batch, world)
    if not torch.distributed.is_available():
        raise CLIError(f"WORLD_SIZE={world}: this torch build has no torch.distributed")
    dev = _device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    owns = not torch.distributed.is_initialized()   # a caller (a test, a launcher) may have created it
    if owns:
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if torch.distributed.get_world_size() != world:
        raise CLIError(f"WORLD_SIZE={world} but the process group has {torch.distributed.get_world_size()} ranks")
    comm = dev if dev.type == "cuda" else torch.device("cpu")
    return Ranks(torch.distributed.get_rank(), world, comm, owns, mode), dev


def stop(ranks: Ranks) -> None:
    """Destroys the process group if ``start`` created it (``lowcost.cli.program`` then ends the process
    with ``lowcost.distributed.exit_skipping_finalisation``)."""
    if ranks.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_mixed_precision(mixed: Optional[str], dtype: str) -> None:
    """--mixed-precision bf16 computes in bf16 on fp32 parameters (FSDP2's MixedPrecisionPolicy when sharded,
    torch.autocast otherwise): it needs fp32 parameters (--dtype float32) to keep as the master copy."""
    if mixed is None:
        return
    if mixed != "bf16":
        raise CLIError(f"--mixed-precision {mixed!r}: expected bf16")
    if dtype != "float32":
        raise CLIError(f"--mixed-precision {mixed} keeps fp32 parameters and computes in {mixed}; it needs "
                       f"--dtype float32 (the default), got --dtype {dtype}")


def check_autocast_device(mixed: Optional[str], dev: torch.device) -> None:
    """torch.autocast in bf16 needs a device that computes in bf16 (every CPU; a GPU of compute capability
    8.0 or more: on an older one torch would emulate it slowly, or refuse)."""
    if mixed is None or dev.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        return
    major, minor = torch.cuda.get_device_capability(dev)
    raise CLIError(f"--mixed-precision {mixed}: {dev} (compute capability {major}.{minor}) has no native bf16 "
                   "(needs 8.0 or more); train in fp32 without --mixed-precision")


def forward_context(mixed: Optional[str], ranks: Ranks, dev: torch.device) -> Callable:
    """A factory of the context the forward passes run in: ``torch.autocast(dev.type, bf16)`` for
    --mixed-precision bf16 in one process and under DDP; nothing extra otherwise (fp32, or FSDP2, whose
    MixedPrecisionPolicy casts the parameters itself)."""
    if mixed is None or ranks.sharded:
        return contextlib.nullcontext
    return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)


class AutocastForward(torch.nn.Module):
    """``module`` whose forward runs inside ``context()`` (torch.autocast): the loss comes out of it; the
    backward runs outside, as torch recommends (its dtypes follow the forward's)."""

    def __init__(self, module: torch.nn.Module, context: Callable):
        super().__init__()
        self.module, self.context = module, context

    def forward(self, *args, **kwargs):
        with self.context():
            return self.module(*args, **kwargs)


def mixed_precision_policy(mixed: Optional[str]):
    """FSDP2's MixedPrecisionPolicy for --mixed-precision (None: fp32 throughout).

    bf16: each block's parameters are all-gathered and computed in bf16 (8-bit mantissa), the sharded fp32
    parameters stay the optimizer's master copy, and gradients are reduce-scattered in fp32, so the update
    and the saved adapter are fp32."""
    if mixed is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap(model, ranks: Ranks, dev: torch.device, mixed: Optional[str] = None):
    """The module the training loop runs: ``model`` itself in one process or sharded in place by FSDP2
    (its trainable parameters become DTensors: collect them again; ``mixed``: --mixed-precision, FSDP2's
    policy), DDP around it otherwise; with ``mixed`` and no FSDP2, that module's forward under autocast."""
    if ranks.sharded:
        from lowcost.distributed import shard_model
        return shard_model(model, mp_policy=mixed_precision_policy(mixed))
    trained = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    context = forward_context(mixed, ranks, dev)
    return trained if context is contextlib.nullcontext else AutocastForward(trained, context)


@contextlib.contextmanager
def quiet_unless_main(ranks: Ranks):
    """Inside it, stdout of ranks other than 0 goes nowhere (their errors still reach stderr)."""
    if ranks.main:
        yield
        return
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()              # "Loading weights" bars: rank 0's is enough
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _share(value):
    """Rank 0's ``value`` on every rank."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def publish_together(final: Path, ranks: Ranks, fill_all: Callable[[Path], None],
                     fill_main: Optional[Callable[[Path], None]] = None) -> None:
    """``_rundir.publish_dir`` for a directory that every rank writes into: rank 0 makes the temporary
    directory, every rank runs ``fill_all(tmp)`` (collective writers), rank 0 runs ``fill_main(tmp)`` and
    publishes it with one rename once every rank is done."""
    from lowcost.cli._rundir import publish_dir
    from lowcost.patch.ranks import barrier
    if not ranks.main:
        fill_all(Path(_share(None)))
        barrier()
        return

    def fill(tmp: Path) -> None:
        _share(str(tmp))
        fill_all(tmp)
        barrier()
        if fill_main is not None:
            fill_main(tmp)
    publish_dir(final, fill)


def save_sharded_checkpoint(out: Path, step: int, model, optimizer, trainer_state: dict, state: dict,
                            ranks: Ranks) -> None:
    """A checkpoint of an FSDP2 run (collective): adapter (gathered), training_state/ (DCP: adapters,
    optimizer shards, step, every rank's RNG), and trainer_state.pt / state.json from rank 0."""
    import json
    from lowcost.api import save_adapter
    from lowcost.cli._rundir import prune_checkpoints
    from lowcost.distributed import save_training_state

    def fill_all(tmp: Path) -> None:
        save_adapter(model, tmp / "adapter")
        save_training_state(tmp / "training_state", model, optimizer, step)

    def fill_main(tmp: Path) -> None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    publish_together(out / "checkpoints" / f"step-{step:06d}", ranks, fill_all, fill_main)
    if ranks.main:
        prune_checkpoints(out)

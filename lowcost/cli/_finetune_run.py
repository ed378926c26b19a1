"""The stages of ``lowcost finetune`` after its options were checked: prepare the data (and new tokens),
patch the model, train with checkpoints, write the outputs and the one-line summary."""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from lowcost.cli import CLIError
from lowcost.cli._encode import collate, pad_id, sequences
from lowcost.cli._measure import PeakMemory, SavedBytes, mib, optimizer_state_bytes, trainable
from lowcost.cli._train import Batches, History, Plan, evaluate, make_optimizer, run as run_steps


@dataclass
class Setup:
    model: object
    tokenizer: object
    device: torch.device
    batches: Batches
    held: list                       # collated held-out batches
    plan: Plan
    data: dict                       # what the data became
    new_tokens: Optional[dict] = None
    step0: Optional[dict] = None
    measured: dict = field(default_factory=dict)
    params: list = field(default_factory=list)
    report: object = None
    fresh: bool = True               # False: resuming from a checkpoint
    ranks: object = None             # _distributed_run.Ranks under torchrun (None: one process)
    trained: object = None           # the module the loop runs (DDP around ``model`` under torchrun)
    counts: Optional[tuple] = None   # (trainable, all) parameters, counted before FSDP2 sharded them
    forward_context: Callable = contextlib.nullcontext   # --mixed-precision bf16 without FSDP2: torch.autocast


def _held_batches(seqs, batch: int, pad: int) -> list:
    return [collate(seqs[i:i + batch], pad) for i in range(0, len(seqs), batch)]


def _add_tokens(args, model, tokenizer, words, held_records, kind, dev, fresh: bool, ranks=None) -> dict:
    """Adds the --new-tokens words; returns counts and the step-0 held-out figures before and after."""
    from lowcost.warmstart import add_tokens
    result: dict = {"file": args.new_tokens}
    if held_records and fresh:
        seqs, _ = sequences(held_records, kind, tokenizer, args.seq_len)
        result["before"] = evaluate(model, _held_batches(seqs, args.batch, pad_id(tokenizer)), dev, ranks=ranks)
    try:
        report = add_tokens(model, tokenizer, words)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"--new-tokens {args.new_tokens}: {exc}") from None
    result.update(words=len(words), added=report.total("added"), existing=report.total("existing"),
                  new_ids=report.extra.get("new_ids", []))
    return result


def prepare(args, model, tokenizer, data, words, dev, fresh: bool, ranks=None) -> Setup:
    """Splits and encodes the data, adds new tokens, evaluates step 0 (``fresh``: no checkpoint to resume
    from) and plans the steps. ``ranks``: under torchrun (every rank prepares the same global data)."""
    from lowcost.cli._data import split
    from lowcost.cli.finetune import total_steps
    train_records, held_records = split(data, args.eval_fraction, args.seed)
    new_tokens = (_add_tokens(args, model, tokenizer, words, held_records, data.kind, dev, fresh, ranks)
                  if words else None)
    train, dropped = sequences(train_records, data.kind, tokenizer, args.seq_len)
    held, held_dropped = sequences(held_records, data.kind, tokenizer, args.seq_len)
    if not train:
        raise CLIError(f"--data {data.path}: no training sequence left (every chat lost its response to --seq-len "
                       f"{args.seq_len} truncation)" if dropped else f"--data {data.path}: no training sequence")
    pad = pad_id(tokenizer)
    batches = Batches(train, args.batch, args.seed, pad)
    steps = total_steps(args, batches.per_epoch)
    plan = Plan(total_steps=steps, grad_accum=args.grad_accum, lr=args.lr,
                warmup=args.warmup if args.warmup is not None else math.ceil(0.05 * steps),
                max_grad_norm=args.max_grad_norm,
                eval_every=args.eval_every or max(1, math.ceil(steps / 5)),
                save_every=args.save_every or max(1, math.ceil(steps / 10)))
    info = {"kind": data.kind, "records": len(data.records), "skipped_lines": data.skipped,
            "train_sequences": len(train), "held_out_sequences": len(held), "dropped_too_long": dropped + held_dropped,
            "train_tokens": sum(len(s.ids) for s in train), "micro_batches_per_epoch": batches.per_epoch}
    setup = Setup(model, tokenizer, dev, batches, _held_batches(held, args.batch, pad), plan, info, new_tokens,
                  fresh=fresh, ranks=ranks)
    if setup.held and fresh:
        setup.step0 = evaluate(model, setup.held, dev, ranks=ranks)
        if new_tokens is not None:
            new_tokens["after"] = setup.step0
    return setup


def _first_batch(setup: Setup) -> dict:
    from lowcost.cli._train import to_device
    batch = setup.batches.micro(0)
    return to_device(setup.ranks.split(batch) if setup.ranks is not None else batch, setup.device)


def patch(args, setup: Setup, lora, checkpoint) -> None:
    """LoRA (and, on resume, the checkpoint's adapter), the plain setup's saved bytes, then checkpointing."""
    from lowcost.api import apply, load_adapter
    model = setup.model
    try:
        setup.report = apply(model, lora=lora)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CLIError(f"--targets {args.targets!r}: {exc}" if "target" in str(exc) else f"LoRA: {exc}") from None
    setup.params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if not setup.fresh:
        from lowcost.cli._rundir import checkpoints
        load_adapter(model, checkpoints(Path(args.out))[-1][1] / "adapter")
    else:
        with torch.random.fork_rng(devices=[setup.device] if setup.device.type == "cuda" else []):
            with SavedBytes(model) as plain, setup.forward_context():
                loss = model(**_first_batch(setup)).loss
            del loss
        setup.measured["plain_saved_activation_bytes"] = plain.bytes
    if checkpoint is None:
        print(_describe(setup.report))
        return
    batch = _first_batch(setup)

    def profile_step():
        with setup.forward_context():      # the budget is planned on the activations the training saves
            return model(**batch).loss
    try:
        with torch.random.fork_rng(devices=[setup.device] if setup.device.type == "cuda" else []):
            setup.report.checkpoint = apply(model, checkpoint=checkpoint, profile_step=profile_step)
    except ValueError as exc:
        raise CLIError(f"--checkpoint/--budget: {exc}") from None
    print(_describe(setup.report))


def _describe(report) -> str:
    text = f"lowcost.apply: {len(report.adapted)} layers adapted {report.paths()}"
    ckpt = report.checkpoint
    if ckpt is None:
        return text + ", no activation checkpointing"
    return (text + f", checkpointing {ckpt.policy} ({', '.join(sorted(set(ckpt.modes())))} over {len(ckpt.blocks)} "
            "blocks)")


def _trainer_state(optimizer, scheduler, dev, rank_rngs: Optional[list] = None) -> dict:
    """Optimizer, scheduler, RNG; under torchrun also ``rank_rng`` (every rank's RNG states, rank order)."""
    from lowcost.cli._rundir import rng_state
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(dev)}
    if rank_rngs is not None:
        state["rank_rng"] = rank_rngs
    return state


def _save_adapter(model):
    from lowcost.api import save_adapter
    return lambda directory: save_adapter(model, directory)


def _restore(args, setup: Setup, optimizer, scheduler) -> tuple[int, History]:
    """(first step to run, history so far): from the newest checkpoint, or a fresh start."""
    from lowcost.cli._rundir import latest_checkpoint
    found = None if setup.fresh else latest_checkpoint(Path(args.out))
    ranks = setup.ranks
    if found is None:
        if ranks is not None and ranks.world > 1:
            from lowcost.distributed import seed_rank
            seed_rank(args.seed + 1)              # each rank its own dropout stream
        else:
            torch.manual_seed(args.seed + 1)      # the dropout stream starts from the seed, whatever ran before
        history = History()
        if setup.step0 is not None:
            history.evals.append({"step": 0, **setup.step0})
        return 0, history
    path, trainer_state, state = found
    _check_optimizer_fits(path, trainer_state, state, ranks)
    if "optimizer" in trainer_state:
        optimizer.load_state_dict(trainer_state["optimizer"])
    else:                                         # --distributed fsdp: sharded optimizer state, saved with DCP
        from lowcost.distributed import load_training_state
        load_training_state(path / "training_state", setup.model, optimizer)   # reshards to this world size
    scheduler.load_state_dict(trainer_state["scheduler"])
    step = int(state["step"])
    _resume_rng(args, trainer_state, state, ranks, step, setup.device)
    if int(state.get("world_size", 1)) == _world(ranks):   # saved bytes were measured on the saved run's rows
        setup.measured.update(state.get("measured", {}))
    if setup.new_tokens is not None:
        setup.new_tokens.update(state.get("new_tokens", {}))
    print(f"resuming from {path} (step {step} of {setup.plan.total_steps}){_world_note(args, state, ranks)}")
    return step, History.from_dict(state["history"])


def _world(ranks) -> int:
    return ranks.world if ranks is not None else 1


def _check_optimizer_fits(path: Path, trainer_state: dict, state: dict, ranks) -> None:
    """A whole optimizer state (one process, DDP) cannot be split into FSDP2's shards here; a sharded one
    (DCP) loads at any world size, sharded or not."""
    if "optimizer" in trainer_state and ranks is not None and ranks.sharded:
        saved = int(state.get("world_size", 1))
        how = f"--distributed {state.get('distributed') or 'ddp'}" if saved > 1 else "one process"
        raise CLIError(f"--resume: {path} was saved by {how} and holds the whole optimizer state, which "
                       f"--distributed fsdp cannot shard; resume it with --distributed ddp or in one process")


def _resume_rng(args, trainer_state: dict, state: dict, ranks, step: int, device: torch.device) -> None:
    """At the saved world size every rank gets its generator states back (dropout continues exactly).

    At another world size each rank holds other rows of every global batch than any saved rank did, so no
    saved stream can continue its masks: every rank starts a fresh dropout stream, ``seed_rank`` of a seed
    mixed from (--seed, step). Without dropout nothing draws from it and the curve continues; with dropout
    the masks differ from the uninterrupted run's (as they would for an uninterrupted run at this size)."""
    from lowcost.cli._rundir import set_rng_state
    from lowcost.distributed import seed_rank
    from lowcost.distributed.seeding import SEED_LIMIT
    saved, world = int(state.get("world_size", 1)), _world(ranks)
    if saved == world:
        set_rng_state(trainer_state["rank_rng"][ranks.rank] if world > 1 else trainer_state["rng"], device)
        return
    seed_rank((args.seed + 1 + 1_000_003 * step) % SEED_LIMIT)


def _world_note(args, state: dict, ranks) -> str:
    saved, world = int(state.get("world_size", 1)), _world(ranks)
    if saved == world:
        return ""
    note = (f"; saved by {saved} process(es), continuing with {world}: the same global batches, adapters and "
            "optimizer state (resharded)")
    if args.dropout > 0:
        note += ("; the dropout masks cannot continue (they depend on how each batch is split across the "
                 "processes), so the curve will differ from an uninterrupted run's")
    return note


def train(args, setup: Setup, out: Path) -> dict:
    from lowcost.cli._rundir import save_checkpoint
    model, dev, plan = setup.model, setup.device, setup.plan
    optimizer, scheduler = make_optimizer(setup.params, plan)
    start, history = _restore(args, setup, optimizer, scheduler)

    def first_forward(forward):
        with SavedBytes(model) as saved:
            loss = forward()
        setup.measured["saved_activation_bytes"] = saved.bytes
        return loss

    ranks = setup.ranks
    world = ranks.world if ranks is not None else 1
    sharded = ranks is not None and ranks.sharded

    def save(step: int) -> None:
        rank_rngs = ranks.rng_states(dev) if world > 1 else None   # collective: before the rank-0 test
        state = {"step": step, "micro_batches": step * plan.grad_accum, "history": history.as_dict(),
                 "measured": setup.measured, "new_tokens": _json_safe(setup.new_tokens), "world_size": world,
                 "distributed": ranks.mode if world > 1 else None}
        trainer_state = _trainer_state(optimizer, scheduler, dev, rank_rngs)
        if sharded:                               # every rank writes its optimizer shards
            from lowcost.cli._distributed_run import save_sharded_checkpoint
            del trainer_state["optimizer"]
            save_sharded_checkpoint(out, step, model, optimizer, trainer_state, state, ranks)
        elif ranks is None or ranks.main:
            save_checkpoint(out, step, _save_adapter(model), trainer_state, state)

    def held(step: int) -> dict:                   # in bf16 too under --mixed-precision (FSDP2's policy or autocast)
        with setup.forward_context():
            return evaluate(model, setup.held, dev, ranks=ranks)
    with PeakMemory(dev) as peak:
        run_steps(setup.trained or model, setup.params, setup.batches, plan, optimizer, scheduler, dev, history,
                  start, held if setup.held else None, save, first_forward if start == 0 and not sharded else None,
                  label="finetune", ranks=ranks)
    setup.measured["peak_memory_bytes_this_session"] = peak.bytes
    setup.measured["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
    return {"history": history.as_dict()}


def _json_safe(value):
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def publish_adapter(setup: Setup, out: Path) -> None:
    """out/adapter, atomically. Every rank calls it (FSDP2 gathers the shards); rank 0 writes."""
    from lowcost.cli._rundir import publish_dir
    model, ranks = setup.model, setup.ranks

    def save(tmp: Path) -> None:
        _save_adapter(model)(tmp / "files")

    def move_up(tmp: Path) -> None:
        for item in (tmp / "files").iterdir():
            os.rename(item, tmp / item.name)
        (tmp / "files").rmdir()
    if ranks is not None and ranks.sharded:
        from lowcost.cli._distributed_run import publish_together
        publish_together(out / "adapter", ranks, save, move_up)
    elif ranks is None or ranks.main:
        publish_dir(out / "adapter", lambda tmp: (save(tmp), move_up(tmp)))


def finish(args, setup: Setup, out: Path, metrics: dict) -> None:
    """Tokenizer (with new tokens), metrics.json and loss.png (``publish_adapter`` wrote the adapter)."""
    from lowcost.cli._plots import loss_curve
    from lowcost.cli._rundir import publish_dir, write_file
    if setup.new_tokens is not None:
        publish_dir(out / "tokenizer", lambda tmp: setup.tokenizer.save_pretrained(tmp))
    n_train, n_all = setup.counts or trainable(setup.model)
    element = setup.params[0].element_size() if setup.params else 4
    metrics.update(model=args.model, data=args.data, options={k: v for k, v in vars(args).items() if k != "run"},
                   trainable_params=n_train, total_params=n_all, trainable_fraction=n_train / max(n_all, 1),
                   data_stats=setup.data, new_tokens=_json_safe(setup.new_tokens), steps=setup.plan.total_steps,
                   memory={**setup.measured, "gradient_bytes": n_train * element,
                           "full_finetune_gradient_and_optimizer_bytes": 3 * n_all * element})
    evals = metrics["history"]["evals"]
    metrics["held_out"] = {"start": evals[0] if evals and evals[0]["step"] == 0 else None,
                           "end": evals[-1] if evals else None}
    write_file(out / "metrics.json", json.dumps(_json_safe(metrics), indent=1) + "\n")
    history = metrics["history"]
    loss_curve(out / "loss.png", {"LoRA": (history["step"], history["loss"])},
               {"LoRA": ([e["step"] for e in evals], [e["loss"] for e in evals])},
               f"lowcost finetune: {Path(args.model).name} on {Path(args.data).name}")


def _bytes_part(memory: dict) -> str:
    ours, plain = memory.get("saved_activation_bytes"), memory.get("plain_saved_activation_bytes")
    parts = []
    if ours is not None and plain is not None:
        parts.append(f"saved activations {mib(ours)} per step vs {mib(plain)} without checkpointing "
                     f"({mib(plain - ours)} less)")
    lora = memory["gradient_bytes"] + memory.get("optimizer_state_bytes", 0)
    full = memory["full_finetune_gradient_and_optimizer_bytes"]
    parts.append(f"gradients + optimizer state {mib(lora)} vs {mib(full)} for full fine-tuning "
                 f"({mib(full - lora)} less)")
    return "; ".join(parts)


def _loss_part(metrics: dict) -> str:
    start, end = metrics["held_out"]["start"], metrics["held_out"]["end"]
    if end is None:
        return "no held-out data"
    if start is None or start is end:
        return f"held-out loss {end['loss']:.4f} (perplexity {end['perplexity']:.2f})"
    return (f"held-out loss {start['loss']:.4f} → {end['loss']:.4f} "
            f"(perplexity {start['perplexity']:.2f} → {end['perplexity']:.2f})")


def _tokens_part(new_tokens: Optional[dict]) -> str:
    if new_tokens is None:
        return ""
    text = f"; {new_tokens.get('added')} new tokens"
    before, after = new_tokens.get("before"), new_tokens.get("after")
    if before and after:
        text += (f" (step-0 held-out {before['nats_per_char']:.4f} → {after['nats_per_char']:.4f} nats/char "
                 f"before → after adding them)")
    return text


def summary(setup: Setup, metrics: dict, out: Path) -> str:
    share = 100 * metrics["trainable_fraction"]
    return (f"lowcost finetune: trained {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters "
            f"({share:.3f}%); {_bytes_part(metrics['memory'])}; {_loss_part(metrics)}"
            f"{_tokens_part(metrics['new_tokens'])}; outputs in {out}/ (adapter/, metrics.json, loss.png)")

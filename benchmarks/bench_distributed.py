"""lowcost under torch.distributed on the CPU: step time, per-rank saved and parameter bytes, all-gathers.

Model: HF Llama from a config (hidden 256, 4 layers, seq 128, vocab 2048), LoRA r=16 on every linear of
the blocks (``lowcost.apply``), global batch 8 sequences: 8 on one process, 4 per rank on two. For
wrapper ∈ {DDP, FSDP2 (``lowcost.distributed.shard_model``)} and checkpoint policy ∈ {none, full,
selective, every_k, sqrt, offload, budget (0.5 of the no-checkpoint saved bytes, planned from one profiled
step)} (``--policies`` picks some), at world size 1 and 2 (gloo, one thread per process as torchrun sets it):

- step time: zero_grad + forward + backward + SGD step, median and 20th/80th percentiles, providers
  timed round-robin (``harness.time_interleaved``); rank 0's clock (collectives keep the ranks in step);
- saved bytes per rank: the distinct storages autograd saves during one forward, parameters excluded
  (FSDP2's gathered full parameters are parameters too), plus what lowcost's frames keep elsewhere
  (``lowcost.checkpoint.track``: inputs, the selective cache);
- parameter bytes per rank: the storage this rank holds for every parameter (a DTensor's local shard),
  frozen and trainable, outside forward/backward;
- all-gathers per step, forward and backward (``lowcost.distributed.AllGatherCounter``).

    .venv/bin/python benchmarks/bench_distributed.py [--repeats 10] [--policies none full ...]
    # launches torchrun for 1 and 2 ranks

Rows are appended to benchmarks/results/distributed.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

SHAPE = dict(hidden=256, layers=4, seq=128, global_batch=8, vocab=2048, intermediate=688, heads=4, r=16)
POLICIES = ("none", "full", "selective", "every_k", "sqrt", "offload", "budget")
WRAPPERS = ("ddp", "fsdp2")


def checkpoint_config(policy: str):
    import lowcost
    if policy == "none":
        return None
    if policy == "budget":
        return lowcost.CheckpointConfig(budget=0.5)
    return lowcost.CheckpointConfig(policy=policy)


def build(policy: str, batch: dict):
    import lowcost
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                      num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["heads"], vocab_size=SHAPE["vocab"], use_cache=False,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).train()
    profile = (lambda: model(**batch).loss) if policy == "budget" else None
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=SHAPE["r"], alpha=32, dropout=0.05),
                  checkpoint=checkpoint_config(policy), profile_step=profile)
    return model


def wrap(model, wrapper: str):
    from lowcost.distributed import shard_model
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    return shard_model(model)


def local_batch(step: int) -> dict:
    from lowcost.distributed import shard_batch
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["global_batch"], SHAPE["seq"]), generator=gen)
    return shard_batch({"input_ids": ids, "labels": ids})


def parameter_bytes(model) -> dict:
    """Bytes this rank stores per parameter kind (a DTensor counts its local shard)."""
    from lowcost.patch.ranks import is_dtensor
    out = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        local = p.to_local() if is_dtensor(p) else p
        out["trainable" if p.requires_grad else "frozen"] += local.numel() * local.element_size()
    return out


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def saved_bytes(model, batch) -> int:
    """Storages autograd saves in one forward, parameters excluded, plus lowcost frames' kept tensors.

    A parameter is recognised by its type (or its view's base), not by its address: FSDP2 frees a block's
    gathered parameters after its forward and a later activation may reuse that address."""
    from lowcost.checkpoint import track
    storages = {}

    def pack(t):
        if not _is_parameter(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with track() as kept, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    for ptr, (nbytes, _, _, _) in kept.storages.items():
        storages.setdefault(ptr, nbytes)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def gathers_per_step(model, batch) -> dict:
    from lowcost.distributed import AllGatherCounter
    with AllGatherCounter() as gathers:
        gathers.phase("forward")
        loss = model(**batch).loss
        gathers.phase("backward")
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": gathers.counts["forward"], "backward": gathers.counts["backward"]}


def worker(out: Path, repeats: int, policies: list[str]) -> None:
    import torch.distributed as dist
    from lowcost.distributed import exit_skipping_finalisation, seed_rank
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = local_batch(0)
    providers, rows = {}, []
    for wrapper in WRAPPERS:
        for policy in policies:
            model = wrap(build(policy, batch), wrapper)
            seed_rank(1234)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            row = {"world_size": world, "wrapper": wrapper, "policy": policy,
                   "local_batch": batch["input_ids"].shape[0], "saved_bytes_per_rank": saved_bytes(model, batch), **gathers_per_step(model, batch)}
            row.update({f"{k}_param_bytes_per_rank": v for k, v in parameter_bytes(model).items()})
            rows.append(row)
            providers[(wrapper, policy)] = _step(model, optimizer, batch)
    times = harness.time_interleaved({f"{w}/{p}": s for (w, p), s in providers.items()}, torch.device("cpu"),
                                     warmup=2, repeats=repeats)
    for row in rows:
        timing = times[f"{row['wrapper']}/{row['policy']}"]
        row.update({k: round(v, 2) if isinstance(v, float) else v for k, v in timing.items()})
        row["tokens_per_s"] = round(SHAPE["global_batch"] * SHAPE["seq"] / (timing["median_ms"] / 1e3), 1)
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.destroy_process_group()
    exit_skipping_finalisation(0)  # a gloo thread could abort interpreter finalisation (see that function)


def _step(model, optimizer, batch):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    return step


def launch(world: int, repeats: int, policies: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                        __file__, "--worker", str(out), "--repeats", str(repeats), "--policies", *policies],
                       check=True, env=env)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.repeats, args.policies)
    shape = " ".join(f"{k}{v}" for k, v in SHAPE.items())
    rows = [{**row, "shape": shape, "threads_per_rank": 1} for world in (1, 2)
            for row in launch(world, args.repeats, args.policies)]
    path = harness.append_rows("distributed.csv", rows)
    for row in rows:
        print(f"world {row['world_size']} {row['wrapper']:<5} {row['policy']:<9} {row['median_ms']:8.1f} ms "
              f"saved {row['saved_bytes_per_rank'] / 2**20:7.2f} MiB  frozen params "
              f"{row['frozen_param_bytes_per_rank'] / 2**20:6.2f} MiB  gathers {row['forward']}/{row['backward']}")
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()

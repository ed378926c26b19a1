"""What the distributed workers and the single-process references share: the model, the data, the training
loop, and the reference that reproduces a W-rank run in one process.

Model: a 4-block Llama (hidden 32) so that ``sqrt`` makes two 2-block segments, each spanning two FSDP units.
Data: a fresh global batch of ``GLOBAL_BATCH`` sequences per step; rank r trains on rows [r·b, (r+1)·b).
Optimizer: plain SGD, so an update is linear in the gradient and fp32 rounding differences (reduction
order across ranks) stay at fp32 size instead of being amplified the way Adam's normalisation can.
"""
from __future__ import annotations

import torch

import lowcost
from lowcost.distributed import rank_seed, shard_batch

VOCAB, SEQ, GLOBAL_BATCH, LAYERS = 64, 8, 4, 4
INIT_SEED, DROPOUT_SEED, LR, STEPS = 0, 1234, 0.5, 3
POLICIES = ("none", "full", "every_k", "sqrt", "selective", "offload", "budget")


def build_llama(layers: int = LAYERS):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(INIT_SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def lora_config(dropout: float = 0.1, r: int = 4) -> lowcost.LoRAConfig:
    return lowcost.LoRAConfig(r=r, alpha=8, dropout=dropout, targets="all-linear")


def checkpoint_config(policy: str):
    if policy == "budget":
        return lowcost.CheckpointConfig(budget=0.5)
    return lowcost.CheckpointConfig(policy=policy)


def global_batch(step: int) -> dict:
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))
    return {"input_ids": ids, "labels": ids}


def patched(policy: str = "none", dropout: float = 0.1, rank_batch=None, quantize=None):
    """The model every run starts from: same init, (``quantize``: its linear layers quantized with that
    scheme, deterministically, before LoRA), LoRA applied, the checkpoint policy installed."""
    model = build_llama()
    if quantize is not None:
        model.requires_grad_(False)  # quantized weights are frozen; apply freezes the rest anyway
        lowcost.quantize(model, scheme=quantize)
    checkpoint = None if policy in (None, "none") else checkpoint_config(policy)
    profile = (lambda: model(**rank_batch).loss) if policy == "budget" else None
    lowcost.apply(model, lora=lora_config(dropout), checkpoint=checkpoint, profile_step=profile)
    return model


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sgd(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(adapter_params(model).values()), lr=LR)


def reference_run(world_size: int, dropout: float = 0.1, steps: int = STEPS, same_masks: bool = False,
                  param_dtype: torch.dtype = torch.float32, quantize=None, model_fn=None):
    """One process reproducing a ``world_size``-rank data-parallel run exactly.

    Rank r's rows run with rank r's generator stream (``rank_seed(DROPOUT_SEED, r)``, or rank 0's for every
    r with ``same_masks``); each contributes loss_r / W, so the summed gradient is the ranks' average.
    ``param_dtype=torch.bfloat16`` reproduces FSDP2's MixedPrecisionPolicy(bf16 params, fp32 reduce): the
    parameters (not the buffers) compute in bf16, each rank's gradient is cast to fp32 before the sum and
    the fp32 master adapters take the SGD step. ``quantize`` quantizes the base as ``patched`` does;
    ``model_fn()`` builds another starting model instead (the ranks' own, without checkpointing).
    Returns (final adapters, the global mean loss of each step)."""
    model = model_fn() if model_fn is not None else patched("none", dropout, quantize=quantize)
    master = {n: p.detach().clone().requires_grad_(True) for n, p in adapter_params(model).items()}
    optimizer = torch.optim.SGD(list(master.values()), lr=LR)
    for p in model.parameters():
        p.data = p.data.to(param_dtype)
    streams = [torch.Generator().manual_seed(rank_seed(DROPOUT_SEED, 0 if same_masks else r)).get_state()
               for r in range(world_size)]
    losses = []
    for step in range(steps):
        _copy_master(model, master)
        total = 0.0
        for r in range(world_size):
            torch.set_rng_state(streams[r])
            loss = model(**shard_batch(global_batch(step), r, world_size)).loss / world_size
            loss.backward()
            streams[r] = torch.get_rng_state()
            total += loss.item()
            _accumulate_grads(model, master)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return {n: p.detach().clone() for n, p in master.items()}, losses


@torch.no_grad()
def _copy_master(model, master: dict) -> None:
    for name, p in adapter_params(model).items():
        p.copy_(master[name])


def _accumulate_grads(model, master: dict) -> None:
    for name, p in adapter_params(model).items():
        grad = p.grad.float()
        master[name].grad = grad if master[name].grad is None else master[name].grad + grad
        p.grad = None


def initial_adapters(quantize=None) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter_params(patched("none", quantize=quantize)).items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(expected.double().abs().max().item(), 1e-30)
    return (actual.double() - expected.double()).abs().max().item() / scale


def peft_key(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A`` → PEFT's file key."""
    return f"base_model.model.{name}.weight"


def adamw(model) -> torch.optim.Optimizer:
    """For the training-state tests, where the optimizer's own state must survive a resume."""
    return torch.optim.AdamW(list(adapter_params(model).values()), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.01)


def train_steps(model, optimizer, steps, world_size: int = 1, rank: int = 0) -> list[float]:
    """Runs ``steps`` (an iterable of step numbers) on this rank's rows; returns each step's global loss."""
    import torch.distributed as dist
    losses = []
    for step in steps:
        loss = model(**shard_batch(global_batch(step), rank, world_size)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(value)
            value /= world_size
        losses.append(value.item())
    return losses


def local_steps(trained, optimizer, steps: int = STEPS) -> list[float]:
    """``steps`` steps of ``trained`` (the wrapped model) on this rank's rows; returns this rank's losses."""
    losses = []
    for step in range(steps):
        loss = trained(**shard_batch(global_batch(step))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def counted_steps(trained, optimizer, steps: int = STEPS) -> tuple[list[float], list[dict]]:
    """``local_steps``, also counting each step's all-gathers (``{"forward": n, "backward": m}`` per step)."""
    from lowcost.distributed import AllGatherCounter
    losses, gathers_per_step = [], []
    with AllGatherCounter() as gathers:
        for step in range(steps):
            gathers.reset()
            gathers.phase("forward")
            loss = trained(**shard_batch(global_batch(step))).loss
            gathers.phase("backward")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            gathers_per_step.append(dict(gathers.counts))
            losses.append(loss.item())
    return losses, gathers_per_step


def save_counting_writes(model, directory) -> int:
    """lowcost.save_adapter, returning how many times this rank wrote the files (rank 0 alone must)."""
    from lowcost.patch import adapter_io
    original, calls = adapter_io.write_adapter, []
    adapter_io.write_adapter = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        lowcost.save_adapter(model, directory)
    finally:
        adapter_io.write_adapter = original
    return len(calls)


def error_message(fn) -> str:
    """'ExceptionType: message' of what ``fn()`` raised, '' when it raised nothing (the test checks it)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  the scenario records what a refusal says
        return f"{type(exc).__name__}: {exc}"
    return ""

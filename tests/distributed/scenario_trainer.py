"""HF Trainer scenario: a lowcost-patched model (LoRA + ``full`` checkpointing) trained by ``Trainer``.

``run(out_dir, mode)``: mode "ddp" under torchrun (2 processes, accelerate's DDP with ``ddp_backend="gloo"``,
per-device batch 2) or "single" (the test's own process, no process group, per-device batch 4). The global
batches are identical (sequential sampler; accelerate hands batch i to rank i mod 2), so the logged losses
and the saved adapters must be the same.

accelerate's FSDP2 configuration is not exercised: accelerate 1.15 turns a ``fsdp_plugin`` into FSDP only
for GPU-like distributed types; on the CPU (``MULTI_CPU``) it ignores the plugin and wraps the model in DDP.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, SequentialSampler

import lowcost
from dist_cases import GLOBAL_BATCH, global_batch, patched
from lowcost.patch.ranks import world

STEPS = 3


class GlobalBatches(Dataset):
    """The rows of ``global_batch(0..STEPS-1)`` in order."""

    def __init__(self):
        self.ids = torch.cat([global_batch(step)["input_ids"] for step in range(STEPS)])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_class():
    from transformers import Trainer

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return InOrderTrainer


def _arguments(out_dir, mode: str, world_size: int):
    from transformers import TrainingArguments
    extra = {"ddp_backend": "gloo"} if mode == "ddp" else {}
    return TrainingArguments(output_dir=str(out_dir / f"trainer-{mode}"),
                             per_device_train_batch_size=GLOBAL_BATCH // world_size, max_steps=STEPS,
                             learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                             disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, **extra)


def run(out_dir, mode: str) -> dict:
    world_size = world()[1]
    model = patched("full", dropout=0.0)
    trainer = _trainer_class()(model=model, args=_arguments(out_dir, mode, world_size), train_dataset=GlobalBatches())
    trainer.train()
    lowcost.save_adapter(trainer.model, out_dir / f"trainer-{mode}-adapter")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    wrapped = type(trainer.model_wrapped).__name__
    return {"losses": losses, "wrapped": wrapped, "model_class": type(trainer.model).__name__}

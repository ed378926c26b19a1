"""Depth extension: two shallow traces extended to the full depth give the figures a full-depth trace gives,
for uniform policies (full, selective), a periodic one (every_k, period 2, odd depth), LoRA without
checkpointing and full fine-tuning; sqrt (segments depend on the depth) is always traced in full."""
import pytest
import torch

import lowcost
from lowcost.checkpoint import CheckpointConfig
from lowcost.plan.estimate import _COUNTS, Setup, estimate
from plan_shapes import config_of

CONFIG = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=64)
LORA = lowcost.LoRAConfig(r=4, alpha=8, dropout=0.05)


@pytest.mark.parametrize("setup", [Setup("LoRA", LORA), Setup("LoRA + every_k", LORA, CheckpointConfig("every_k", k=2)),
                                   Setup("LoRA + selective", LORA, CheckpointConfig("selective")),
                                   Setup("LoRA + full", LORA, CheckpointConfig("full")),
                                   Setup("full fine-tuning")], ids=lambda s: s.name)
def test_extended_equals_full_trace(setup):
    config = config_of(CONFIG)
    extended = estimate(config, setup, 2, 8, torch.float32)
    full = estimate(config, setup, 2, 8, torch.float32, exact=True)
    assert extended.depths[-1] == 7 and len(extended.depths) == 3 and full.depths == (7,)
    assert {n: getattr(extended, n) for n in _COUNTS} == {n: getattr(full, n) for n in _COUNTS}


def test_sqrt_is_traced_in_full():
    e = estimate(config_of(CONFIG), Setup("LoRA + sqrt", LORA, CheckpointConfig("sqrt")), 2, 8, torch.float32)
    assert e.depths == (7,)

"""The traced step's figures do not depend on how they are traced: with or without the FLOP counter (whose
module tracker hooks make reference cycles through the graphs), with the cycle collector off or running after
every allocation. A checkpoint frame or a recomputed graph kept alive by a cycle holds its tensors until the
collector runs, which made the peak depend on the collector's timing and the FLOP counter (and the depth
extension's shallow traces disagree with a full-depth one)."""
import gc

import pytest
import torch

import lowcost
from lowcost.checkpoint import CheckpointConfig
from lowcost.plan.build import meta_model, patch, to_fake
from lowcost.plan.fake import fake_world
from lowcost.plan.trace import trace_step
from plan_shapes import config_of

CONFIG = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=64)
LORA = lowcost.LoRAConfig(r=4, alpha=8, dropout=0.05)
FIGURES = ("saved_blocks", "saved_outside", "grads", "peak", "peak_saved", "peak_grads", "peak_transient")


def _figures(policy: str, count_flops: bool, collector: str) -> dict:
    model = patch(meta_model(config_of(CONFIG), torch.float32), LORA, CheckpointConfig(policy, k=2))
    threshold = gc.get_threshold()
    gc.collect()
    if collector == "off":
        gc.disable()
    else:
        gc.set_threshold(1)
    try:
        with fake_world():
            to_fake(model)
            trace = trace_step(model, torch.zeros(2, 8, dtype=torch.long), count_flops=count_flops)
    finally:
        gc.enable()
        gc.set_threshold(*threshold)
    return {name: getattr(trace, name) for name in FIGURES}


@pytest.mark.parametrize("policy", ["full", "every_k", "selective"])
def test_figures_do_not_depend_on_flop_counting_or_the_cycle_collector(policy):
    plain = _figures(policy, count_flops=False, collector="off")
    assert _figures(policy, count_flops=True, collector="off") == plain
    assert _figures(policy, count_flops=True, collector="eager") == plain

"""The planner's fake trace against a real CPU step of the same model: saved-activation bytes (target ±10%;
measured: equal to the byte), gradients, FLOPs, and the live-bytes peak, for every checkpoint policy,
LoRA and full fine-tuning, on three shapes (tiny Llama, a Llama-shaped model with GQA, a tied Qwen2 with
q/k/v biases)."""
import pytest
import torch

import lowcost
from lowcost.checkpoint import CheckpointConfig
from lowcost.plan.build import patch
from lowcost.plan.estimate import Setup, trace_setup
from lowcost.plan.trace import trace_step
from plan_shapes import SHAPES, config_of, real_model

LORA = lowcost.LoRAConfig(r=8, alpha=16, dropout=0.05)
SETUPS = [Setup("LoRA", LORA)] + [Setup(f"LoRA + {p}", LORA, CheckpointConfig(policy=p))
                                  for p in ("full", "every_k", "sqrt", "selective", "offload")] + \
         [Setup("full fine-tuning"), Setup("full fine-tuning + full", None, CheckpointConfig(policy="full"))]


def _real(shape, setup):
    gc_was = __import__("gc").isenabled()
    __import__("gc").disable()   # the planner counts no collection of reference cycles during the step
    try:
        config, batch, seq = SHAPES[shape]
        model = patch(real_model(config_of(config)), setup.lora, setup.checkpoint)
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
        return trace_step(model, ids, count_flops=True)
    finally:
        if gc_was:
            __import__("gc").enable()


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fake_trace_matches_a_real_cpu_step(shape, setup):
    config, batch, seq = SHAPES[shape]
    cfg = config_of(config)
    fake = trace_setup(cfg, setup, batch, seq, torch.float32, cfg.num_hidden_layers)
    real = _real(shape, setup)
    assert real.saved > 0
    for name, want, got in (("saved", real.saved, fake.saved), ("saved in blocks", real.saved_blocks,
                                                                 fake.saved_blocks)):
        assert abs(got - want) <= 0.10 * max(want, 1), f"{name}: predicted {got} B, counted {want} B"
    assert fake.saved == real.saved and fake.saved_blocks == real.saved_blocks   # measured: exact
    assert fake.grads == real.grads and fake.host_offload == real.host_offload
    assert fake.flops == real.flops > 0
    assert fake.step_peak == pytest.approx(real.peak, rel=0.02)


def test_recompute_shows_in_flops():
    config, batch, seq = SHAPES["tiny-llama"]
    cfg = config_of(config)
    none = trace_setup(cfg, SETUPS[0], batch, seq, torch.float32, 2)
    full = trace_setup(cfg, SETUPS[1], batch, seq, torch.float32, 2)
    selective = trace_setup(cfg, SETUPS[4], batch, seq, torch.float32, 2)
    assert full.flops > none.flops == selective.flops          # selective recomputes no matmul
    assert full.saved < selective.saved < none.saved

"""The fused ops (issue #12's gated MLP and linear cross-entropy) are opaque to torch's FlopCounterMode: the
plan adds their formulas (lowcost/plan/flops.py). They do the same matmuls as the unfused model, so a step
traced with the default fusions must count the FLOPs of the same step traced with ``fused=None``."""
import functools

import torch

import lowcost
import lowcost.plan.build as build
from lowcost.checkpoint import CheckpointConfig
from lowcost.plan.estimate import Setup, trace_setup
from plan_shapes import config_of

CONFIG = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=96)
LORA = lowcost.LoRAConfig(r=4, alpha=8, dropout=0.05)


def _flops(monkeypatch, fused, checkpoint=None) -> int:
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(build, "apply", functools.partial(lowcost.apply, fused=None))
        setup = Setup("LoRA", LORA, checkpoint)
        return trace_setup(config_of(CONFIG), setup, 2, 8, torch.float32, CONFIG["num_hidden_layers"]).flops


def test_fused_step_counts_the_flops_of_the_unfused_step(monkeypatch):
    assert _flops(monkeypatch, fused=True) == _flops(monkeypatch, fused=False) > 0


def test_fused_step_counts_the_recompute_too(monkeypatch):
    full = CheckpointConfig("full")
    assert _flops(monkeypatch, True, full) == _flops(monkeypatch, False, full) > _flops(monkeypatch, True)


def _quantized_flops(monkeypatch, fused, scheme) -> int:
    with monkeypatch.context() as patch:
        patch.setattr(build, "apply", functools.partial(lowcost.apply, fused=fused))
        setup = Setup(f"{scheme} LoRA", LORA, None, scheme)
        return trace_setup(config_of(CONFIG), setup, 2, 8, torch.float32, CONFIG["num_hidden_layers"]).flops


def test_fused_ops_on_a_quantized_base_count_the_flops_of_the_unfused_step(monkeypatch):
    """The fused MLP and the grouped q/k/v on quantized weights (``qlora_gated_mlp``, ``qlora_grouped_linear``) do
    the unfused quantized layers' GEMMs and decodes: each fusion alone and both count the same FLOPs."""
    for scheme in ("nf4", "int8"):
        unfused = _quantized_flops(monkeypatch, None, scheme)
        assert unfused > 0
        for fused in (("qkv",), ("mlp",), ("mlp", "norm", "qkv")):
            assert _quantized_flops(monkeypatch, fused, scheme) == unfused, (scheme, fused)

"""The "qkv" fusion on backend="cuda" (issue #12), on CPU tensors through the C++ CPU twins of the CUDA ops:
taken by ``lowcost.apply`` when every member asks for cuda, and then equal to the unfused cuda model (same ops,
same Philox masks: loss and every adapter gradient); refused with the reason where the CUDA kernels cannot run
(CPU tensors without the fixture) and for float64 weights.

The ``cuda_on_cpu`` fixture makes the cuda backend usable on CPU tensors for every op (the unfused layers' and
the grouped op's); tests/gpu/test_lora_grouped_linear_gpu.py runs the fused model on a GPU."""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost import api as lowcost_api
from lowcost._extension import has_kernel
from lowcost.ops import backend as backend_module
from lowcost.patch import lora_layers
from lowcost.patch.fuse import STATE_ATTR
from lowcost.patch.fuse_qkv import plan_grouped_fusions
from tiny_models import llama, lora_llama_step

pytestmark = pytest.mark.skipif(not has_kernel("lora_dx_da", "CPU"),
                                reason="lowcost._C is not built (pip install --no-build-isolation -e .)")
BLOCKS = {f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn", "mlp")}


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """backend='cuda' resolves on CPU tensors (the C++ CPU kernels stand in for the CUDA ones), and ``apply``'s
    check that this machine has a GPU for it is lifted."""
    monkeypatch.setattr(backend_module, "cuda_kernels_usable", lambda device: True)
    monkeypatch.setattr(lowcost_api, "_check_backend_here", lambda config: None)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_cuda_layers_group_and_match_the_unfused_cuda_model(cuda_on_cpu, dropout):
    """Loss within 1e-5 relative and every adapter gradient within 1e-5 of its largest element (fp32: the same
    ops per projection; only dx sums the projections' terms in another order)."""
    report, model, loss, grads = lora_llama_step("cuda", ("qkv",), dropout)
    assert {f.module for f in report.fusion.taken if f.kind == "qkv"} == BLOCKS, str(report.fusion)
    groups = model.__dict__[STATE_ATTR].groups
    assert groups and all(g.stats["grouped"] >= 1 and g.stats["fallback"] == 0 for g in groups)
    _, _, loss_ref, grads_ref = lora_llama_step("cuda", None, dropout)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert set(grads) == set(grads_ref)
    for name, ref in grads_ref.items():
        err = float((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err <= 1e-5, (name, err)


def _cuda_model(dtype=torch.float32):
    model = llama().to(dtype)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8), fused=())
    for layer in lora_layers(model).values():
        layer.backend = "cuda"
    return model


def test_cuda_where_the_kernels_cannot_run_is_refused_with_the_reason():
    _, refused = plan_grouped_fusions(_cuda_model())
    assert {path for path, _ in refused} == BLOCKS, refused
    assert all("backend='cuda' cannot run here: the CUDA kernels need CUDA tensors" in why for _, why in refused)


def test_cuda_with_float64_weights_is_refused(cuda_on_cpu):
    _, refused = plan_grouped_fusions(_cuda_model(torch.float64))
    assert refused and all("backend='cuda' cannot run here: float64 weights" in why for _, why in refused), refused


def test_meta_device_model_takes_cuda_unchecked():
    """``lowcost plan`` patches a meta-device model that runs later on a device it cannot see: cuda is not
    checked against the meta device (as the "mlp" fusion does), float64 still is."""
    taken, refused = plan_grouped_fusions(_cuda_model().to("meta"))
    assert set(taken) == BLOCKS and not refused, refused
    _, refused = plan_grouped_fusions(_cuda_model(torch.float64).to("meta"))
    assert refused and all("float64 weights" in why for _, why in refused), refused

"""The fused gated MLP on backend="triton" (under the interpreter here): taken by ``lowcost.apply`` when every
projection asks for Triton, and then equal to the unfused Triton model (same kernels, same Philox masks);
refused with the reason when the projections ask for different backends or Triton cannot run."""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops.backend import triton_usable
from lowcost.patch.fuse_mlp import build_mlp_fusion
from tiny_models import llama, lora_llama_step

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cpu")), reason="triton not installed")
ROLES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_triton_layers_fuse_and_match_the_unfused_triton_model(dropout):
    report, _, loss, grads = lora_llama_step("triton", ("mlp",), dropout)
    assert {(f.kind, f.module) for f in report.fusion.taken} == {("mlp", "model.layers.0.mlp"),
                                                                  ("mlp", "model.layers.1.mlp")}
    _, _, loss_ref, grads_ref = lora_llama_step("triton", None, dropout)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for name, ref in grads_ref.items():
        err = float((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err <= 1e-5, (name, err)


def _mlp_with_backends(backends):
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets="all-linear"), fused=())
    mlp = model.model.layers[0].mlp
    for attr, backend in zip(ROLES.values(), backends):
        getattr(mlp, attr).backend = backend
    return model


@pytest.mark.parametrize("backends,reason", [
    (("triton", "triton", None), "the projections ask for different backends"),
    (("torch", "triton", "torch"), "the projections ask for different backends"),
    (("cuda", "cuda", "cuda"), "backend='cuda' cannot run here: the CUDA kernels need CUDA tensors"),
])
def test_mixed_or_cuda_backends_are_refused_with_the_reason(backends, reason):
    fused, detail = build_mlp_fusion(_mlp_with_backends(backends), "model.layers.0.mlp", ROLES)
    assert fused is None and reason in detail


def test_triton_that_cannot_run_here_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")    # CPU tensors without the interpreter: Triton cannot run them
    fused, detail = build_mlp_fusion(_mlp_with_backends(("triton",) * 3), "model.layers.0.mlp", ROLES)
    assert fused is None and "backend='triton' cannot run here" in detail and "TRITON_INTERPRET" in detail


def test_triton_rank_over_the_kernels_limit_is_refused():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=130, alpha=8, targets=["gate_proj", "up_proj", "down_proj"]),
                  fused=())
    for attr in ROLES.values():
        getattr(model.model.layers[0].mlp, attr).backend = "triton"
    fused, detail = build_mlp_fusion(model, "model.layers.0.mlp", ROLES)
    assert fused is None and "r <= 128" in detail

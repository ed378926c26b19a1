"""The fused linear cross-entropy on a QUANTIZED head (``lowcost.ops.linear_cross_entropy`` with a
``QuantizedWeight``: ``lowcost::qlinear_cross_entropy``) on CUDA tensors, every backend that runs there and every
format it takes (``QUANT_SUPPORT``), against float64 on the dense dequantized weight: the loss and every gradient
(dh, dbias, and dA, dB of a LoRA head with dropout), on odd shapes (M = 0 and 1, V odd, a chunk that does not
divide M) and at a real vocabulary (V = 49,152, SmolLM2's).

The CPU suite (tests/quant/test_qlinear_cross_entropy.py) covers the torch backend, Triton under the interpreter and
the cuda composition with a float64 stand-in for the CUDA-only dequantizing GEMMs; only here do the CUDA dequantizing
GEMMs and the Triton kernels run compiled under the loss.

Marked ``gpu``: skipped with a reason on machines without CUDA (conftest). Run by benchmarks/device/run.sh.
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops._quant_backends import QUANT_SUPPORT
from helpers import assert_loss_and_grads_close, cross_entropy_grad, cross_entropy_truth64, gpu_backends
from test_qlora_linear_gpu import _gguf_k, _weight

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
SCHEMES = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
CASES = [(backend, scheme) for backend in gpu_backends() for scheme in SCHEMES if scheme in QUANT_SUPPORT[backend]]


def _inputs(M, K, V, dtype, r=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    labels = torch.randint(0, V, (M,), generator=gen)
    labels[3:4] = -100          # an ignored row (when there is a fourth)
    t = {"hidden": rand(M, K, std=3.0), "labels": labels, "bias": rand(V, std=0.5)}
    if r:
        t["lora_a"], t["lora_b"] = rand(r, K, std=K ** -0.5), rand(V, r, std=r ** -0.5)
    return t


def _run_on_gpu(t, weight, grad, reduction, backend, lora, **kwargs):
    """Loss and gradients computed on CUDA tensors, returned on the CPU."""
    leaves = {k: v.to(CUDA).requires_grad_() for k, v in t.items() if k != "labels"}
    loss = lowcost.ops.linear_cross_entropy(leaves["hidden"], weight.to(CUDA), t["labels"].to(CUDA), leaves["bias"],
                                            reduction=reduction, lora_a=leaves.get("lora_a"),
                                            lora_b=leaves.get("lora_b"), backend=backend, **lora, **kwargs)
    loss.backward(grad.to(CUDA))
    return loss.detach().cpu(), {k: v.grad.cpu() for k, v in leaves.items()}


def _check(M, K, V, scheme, backend, dtype, reduction, r=0, chunk=None, softcap=None, smoothing=0.0, seed=0):
    K = _gguf_k(scheme, K)
    t = _inputs(M, K, V, dtype, r, seed)
    weight = _weight(scheme, V, K, seed=seed + 1).to(torch.device("cpu"))
    lora = {"lora_scale": 0.75, "lora_dropout": 0.1, "seed": 9} if r else {}
    grad = cross_entropy_grad(reduction, t["labels"], dtype)
    loss, grads = _run_on_gpu(t, weight, grad, reduction, backend, lora, chunk=chunk, softcap=softcap,
                              label_smoothing=smoothing)
    # every backend multiplies by W decoded in the hidden's dtype: the truth takes that same W in float64
    w64 = weight.dequantize(dtype).double()
    loss64, grads64 = cross_entropy_truth64(t, grad, reduction, weight64=w64, smoothing=smoothing, softcap=softcap,
                                            scale=lora.get("lora_scale", 1.0), dropout=lora.get("lora_dropout", 0.0),
                                            seed=lora.get("seed", 0))
    assert_loss_and_grads_close(f"{backend} {scheme}", loss, grads, loss64, grads64, t, dtype)


@pytest.mark.parametrize("backend,scheme", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("M,K,V,chunk", [(0, 64, 19, None), (1, 96, 37, None), (29, 260, 1001, 8)])
def test_quantized_head_on_gpu_matches_float64(backend, scheme, reduction, M, K, V, chunk):
    """bf16 hidden (the GPU's training dtype): V odd, M = 0 and 1, a chunk that does not divide M."""
    _check(M, K, V, scheme, backend, torch.bfloat16, reduction, chunk=chunk, seed=M)


@pytest.mark.parametrize("backend,scheme", CASES)
def test_fp32_hidden_on_gpu(backend, scheme):
    _check(29, 260, 1001, scheme, backend, torch.float32, "mean", chunk=8, seed=2)


@pytest.mark.parametrize("backend,scheme", [c for c in CASES if c[1] in ("nf4", "q6_k")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_head_over_a_quantized_base_on_gpu(backend, scheme, dtype):
    """dA, dB with the spec's Philox mask (p = 0.1), soft-cap and label smoothing, a chunk smaller than M."""
    _check(37, 256, 211, scheme, backend, dtype, "mean", r=5, chunk=16, softcap=4.0, smoothing=0.1, seed=4)


@pytest.mark.parametrize("backend,scheme", [c for c in CASES if c[1] in ("q8_0", "nf4")])
def test_real_vocabulary(backend, scheme):
    """SmolLM2's head (V = 49,152, K = 576) at 300 tokens in bf16, with the default chunk."""
    _check(300, 576, 49152, scheme, backend, torch.bfloat16, "mean", seed=5)

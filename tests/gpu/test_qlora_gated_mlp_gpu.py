"""GPU checks of the fused gated MLP on quantized weights (``lowcost.ops.qlora_gated_mlp``) on CUDA tensors, every
backend, and of its ``cuda`` backend (issues #12 + #13: the dense cuda composition of ``_cuda_gated_mlp`` with
the dequantizing GEMMs ``dequant_gemm`` / ``dequant_gemm_dgrad`` per projection), against float64 autograd of the
unfused MLP on the weights dequantized to x's dtype (what every backend multiplies by), output and every gradient.
GGUF sizes are whole blocks (multiples of 256 cover the k-quants).

Marked ``gpu``: skipped with a reason on machines without CUDA (conftest); the cuda-only tests skip when lowcost._C
was built without its CUDA kernels. Run by benchmarks/device/run.sh.
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops.backend import cuda_kernels_usable
from helpers import assert_close_to_reference, gpu_backends
from test_qlora_linear_gpu import _weight

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ADAPTERS = ("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")
ROLES = ("gate", "up", "down")
SCHEMES = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")


def _cuda_backend_or_skip():
    if not torch.cuda.is_available() or not cuda_kernels_usable(CUDA):
        pytest.skip("the cuda backend's kernels are not built or no GPU")


def make(scheme, M, H, inter, ranks, dtype, seed=0):
    """Inputs on the GPU and three quantized weights: gate/up (inter, H), down (H, inter)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(CUDA)

    d = {"x": rand(M, H), "grad_y": rand(M, H)}
    weights = {}
    for i, (role, (n_in, n_out), r) in enumerate(zip(ROLES, ((H, inter), (H, inter), (inter, H)), ranks)):
        weights[role] = _weight(scheme, n_out, n_in, seed=seed + i)
        d[f"a_{role}"] = rand(r, n_in, std=n_in ** -0.5)
        d[f"b_{role}"] = rand(n_out, r, std=r ** -0.5)
    return d, weights


def run(d, weights, backend, act="silu", dropouts=(0.1, 0.05, 0.2), seeds=(11, 22, 33), scales=(1.5, 0.5, 2.0)):
    t = {k: v.detach().clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in d.items()}
    y = lowcost.ops.lora_gated_mlp(t["x"], *[(weights[r], t[f"a_{r}"], t[f"b_{r}"]) for r in ROLES], scales=scales,
                                   activation=act, dropouts=dropouts, seeds=seeds, backend=backend)
    y.backward(t["grad_y"])
    return y.detach(), {k: t[k].grad for k in ("x",) + ADAPTERS}


def truth(d, weights, dtype, **kwargs):
    """Float64 on the CPU, the dense torch path on each W dequantized to x's dtype."""
    cpu64 = {k: v.detach().cpu().double() for k, v in d.items()}
    dense = {r: w.dequantize(dtype).double().cpu() for r, w in weights.items()}
    return run(cpu64, dense, "torch", **kwargs)


def check(d, weights, backend, dtype, **kwargs):
    y, grads = run(d, weights, backend, **kwargs)
    y64, grads64 = truth(d, weights, dtype, **kwargs)
    assert y.dtype == dtype
    assert_close_to_reference(f"{backend} y", y.cpu(), y64, dtype)
    for name, g64 in grads64.items():
        assert grads[name].dtype == d[name].dtype, name
        assert_close_to_reference(f"{backend} d{name}", grads[name].cpu(), g64, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("scheme", ["nf4", "q8_0", "q4_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,H,inter,ranks", [(0, 256, 512, (4, 4, 4)), (1, 256, 512, (16, 5, 17)),
                                             (129, 512, 768, (7, 16, 70))])
def test_backend_matches_float64(backend, scheme, dtype, M, H, inter, ranks):
    d, weights = make(scheme, M, H, inter, ranks, dtype, seed=M)
    check(d, weights, backend, dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_cuda_backend_every_format(scheme, act):
    _cuda_backend_or_skip()
    d, weights = make(scheme, 300, 256, 768, (16, 8, 20), torch.bfloat16, seed=7)
    check(d, weights, "cuda", torch.bfloat16, act=act, seeds=(1, 2, 2**40 + 3))


def test_cuda_backend_drops_the_unfused_elements():
    """fp32: the cuda backend against the torch backend on the GPU with the same seeds, within fp32 rounding
    (a mask that differs in one element is O(1) off)."""
    _cuda_backend_or_skip()
    torch.backends.cuda.matmul.allow_tf32 = False
    d, weights = make("nf4", 257, 256, 512, (8, 8, 8), torch.float32, seed=9)
    kwargs = dict(act="gelu", dropouts=(0.3, 0.2, 0.25), seeds=(2**33 + 1, 5, 77))
    y, grads = run(d, weights, "cuda", **kwargs)
    y_ref, grads_ref = run(d, weights, "torch", **kwargs)
    assert_close_to_reference("y", y, y_ref.double(), torch.float32)
    for name, g in grads_ref.items():
        assert_close_to_reference(f"d{name}", grads[name], g.double(), torch.float32)


def test_cuda_backend_bitwise_reproducible():
    """Two identical fwd+bwd runs: bitwise equal (no split reduction in the dequantizing GEMMs, fixed-order sums
    in the skinny LoRA kernels)."""
    _cuda_backend_or_skip()
    d, weights = make("q4_k", 2048, 1024, 2816, (16, 16, 16), torch.bfloat16, seed=3)
    first, second = run(d, weights, "cuda"), run(d, weights, "cuda")
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d{name} differs between two identical runs"

"""GPU checks of every backend on CUDA tensors (real bf16, real Triton, the CUDA C++ kernels).

Marked ``gpu``: skipped with a reason on machines without CUDA (conftest). Run by benchmarks/device/run.sh.
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.reference import dropout_keep_mask
from helpers import assert_close_to_reference, gpu_backends, make_lora_inputs

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def run(inputs, backend, scale, dropout, seed):
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in ("x", "lora_a", "lora_b", "bias")}
    y = lowcost.lora_linear(leaves["x"], inputs["weight"], leaves["lora_a"], leaves["lora_b"], scale,
                            bias=leaves["bias"], dropout=dropout, seed=seed, backend=backend)
    y.backward(inputs["grad_y"])
    return y, {k: v.grad for k, v in leaves.items()}


def truth(inputs, scale, dropout, seed):
    cpu64 = {k: v.detach().cpu().double() for k, v in inputs.items()}
    return run(cpu64, "torch", scale, dropout, seed)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32), (torch.float16, None)])
@pytest.mark.parametrize("M,K,N,r", [(0, 64, 48, 4), (1, 4096, 4096, 16), (129, 200, 72, 7), (1000, 1000, 3000, 64)])
def test_backend_matches_float64(backend, dtype, adapter_dtype, M, K, N, r):
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make_lora_inputs(M, K, N, r, dtype, adapter_dtype=adapter_dtype, seed=M, device="cuda")
    y, grads = run(inputs, backend, 2.0, 0.1, 1234)
    y64, grads64 = truth(inputs, 2.0, 0.1, 1234)
    assert_close_to_reference(f"{backend} y", y.cpu(), y64, dtype)
    for name, g in grads64.items():
        assert_close_to_reference(f"{backend} d{name}", grads[name].cpu(), g, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
def test_noncontiguous_on_gpu(backend):
    inputs = make_lora_inputs(300, 96, 80, 16, torch.bfloat16, noncontiguous=True, seed=2, device="cuda")
    y, grads = run(inputs, backend, 1.0, 0.25, 2**33 + 1)
    y64, grads64 = truth(inputs, 1.0, 0.25, 2**33 + 1)
    assert_close_to_reference("y", y.cpu(), y64, torch.bfloat16)
    for name, g in grads64.items():
        assert_close_to_reference(f"d{name}", grads[name].cpu(), g, torch.bfloat16)


def test_identical_dropped_elements_across_backends():
    """x = 1, A = e_k rows: u reveals x̃ itself, so the kept pattern of each backend can be read off."""
    M, K = 257, 64
    x = torch.ones(M, K, device="cuda")
    weight = torch.zeros(8, K, device="cuda")
    lora_a = torch.eye(K, device="cuda")          # r = K: u = x̃
    lora_b = torch.zeros(8, K, device="cuda")
    expected = dropout_keep_mask(M, K, seed=99, p=0.3)
    from lowcost.ops.lora_linear import _lora_linear_op
    for backend in gpu_backends():
        _, u = _lora_linear_op(x, weight, lora_a, lora_b, None, 1.0, 0.3, torch.tensor(99), backend)
        assert torch.equal((u != 0).cpu(), expected), backend


def test_offsets_past_2_31_elements():
    """x with 2**31 + 2**20 elements (bf16, 4 GiB): the mask on the last rows matches the reference."""
    K = 4096
    M = (2**31 + 2**20) // K
    x = torch.ones(M, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.zeros(8, K, device="cuda", dtype=torch.bfloat16)
    lora_a = torch.zeros(16, K, device="cuda", dtype=torch.bfloat16)
    lora_a[0, -1] = 1.0                                   # u[:, 0] = x̃[:, K-1]
    lora_b = torch.zeros(8, 16, device="cuda", dtype=torch.bfloat16)
    expected = dropout_keep_mask(64, K, seed=5, p=0.5, row_offset=M - 64)[:, -1]
    from lowcost.ops.lora_linear import _lora_linear_op
    for backend in [b for b in gpu_backends() if b != "torch"]:
        _, u = _lora_linear_op(x, weight, lora_a, lora_b, None, 1.0, 0.5, torch.tensor(5), backend)
        assert torch.equal((u[-64:, 0] != 0).cpu(), expected), backend


def _cuda_backend_or_skip():
    if not torch.cuda.is_available() or not cuda_kernels_usable(CUDA):
        pytest.skip("the cuda backend's kernels are not built or no GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backward_bitwise_reproducible(dtype):
    """Two identical fwd+bwd runs on the cuda backend give bitwise equal outputs and gradients: the kernels
    sum split reductions (dA, dB, dbias, du, u) in a fixed order through fp32 partials, never with atomics."""
    _cuda_backend_or_skip()
    inputs = make_lora_inputs(4096, 1024, 3072, 16, dtype, seed=3, device="cuda")
    y1, grads1 = run(inputs, "cuda", 2.0, 0.1, 77)
    y2, grads2 = run(inputs, "cuda", 2.0, 0.1, 77)
    assert torch.equal(y1, y2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), f"d{name} differs between two identical runs"


@pytest.mark.parametrize("M,K,N,r", [(1, 4097, 520, 70), (333, 136, 200, 1), (8192, 256, 264, 16)])
def test_cuda_odd_shapes_and_rank_chunks(M, K, N, r):
    """Odd K (the unaligned staging path), ranks above 64 (chunks), r = 1, and M = 8192 (K splits, row and
    column segments with partial sums) against the float64 reference."""
    _cuda_backend_or_skip()
    inputs = make_lora_inputs(M, K, N, r, torch.bfloat16, adapter_dtype=torch.float32, seed=M, device="cuda")
    y, grads = run(inputs, "cuda", 0.5, 0.2, 2**40 + 3)
    y64, grads64 = truth(inputs, 0.5, 0.2, 2**40 + 3)
    assert_close_to_reference("cuda y", y.cpu(), y64, torch.bfloat16)
    for name, g in grads64.items():
        assert_close_to_reference(f"cuda d{name}", grads[name].cpu(), g, torch.bfloat16)

"""Every backend drops the identical elements, and the C++ composition behind the ``cuda`` backend
(the same ops have C++ CPU kernels) matches the float64 reference on CPU tensors."""
from __future__ import annotations

import pytest
import torch

from lowcost._extension import has_kernel
from lowcost.ops import _cuda_backend, _torch_backend
from lowcost.ops.backend import triton_usable
from lowcost.reference import dropout_keep_mask
from lowcost.reference import lora_linear as reference
from lowcost.reference.philox import apply_dropout
from helpers import assert_close_to_reference, make_lora_inputs, to_float64

HAS_CPP = has_kernel("lora_down", "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="lowcost._C not built (pip install --no-build-isolation -e .)")


def kept_pattern_of(forward, M, K, seed, p):
    """x = 1 and A = I (r = K) make u = x̃, so the kept pattern is u != 0."""
    x = torch.ones(M, K)
    _, u = forward(x, torch.zeros(3, K), torch.eye(K), torch.zeros(3, K), None, 1.0, p, seed)
    return u != 0


def forwards():
    cases = [("reference", lambda *a: reference.lora_linear_forward(*a, dropout_fn=apply_dropout))]
    cases.append(("torch backend", _torch_backend.forward))
    if HAS_CPP:
        cases.append(("C++ (cuda-backend composition)", _cuda_backend.forward))
    if triton_usable(torch.device("cpu")):
        from lowcost.ops import _triton_backend
        cases.append(("triton", _triton_backend.forward))
    return cases


@pytest.mark.parametrize("seed,p", [(0, 0.1), (12345, 0.5), (2**40 + 7, 0.3), (2**63 - 1, 0.05)])
def test_identical_dropped_elements_across_backends(seed, p):
    M, K = 37, 64
    expected = dropout_keep_mask(M, K, seed, p)
    for name, forward in forwards():
        assert torch.equal(kept_pattern_of(forward, M, K, seed, p), expected), name


@needs_cpp
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                                 (torch.float16, None)])
@pytest.mark.parametrize("M,r", [(0, 4), (1, 1), (7, 7), (129, 16), (33, 64)])
def test_cpp_composition_matches_reference(dtype, adapter_dtype, M, r):
    inputs = make_lora_inputs(M, 72, 40, r, dtype, adapter_dtype=adapter_dtype, seed=M, noncontiguous=M == 7)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], inputs["bias"], 1.5, 0.1, 77)
    f64 = to_float64(inputs)
    args64 = (f64["x"], f64["weight"], f64["lora_a"], f64["lora_b"], f64["bias"], 1.5, 0.1, 77)
    y, u = _cuda_backend.forward(*args)
    y64, u64 = reference.lora_linear_forward(*args64)
    assert_close_to_reference("y", y, y64, dtype)
    assert_close_to_reference("u", u, u64, dtype)
    grads = _cuda_backend.backward(inputs["grad_y"], *args[:4], u, 1.5, 0.1, 77, (True, True, True, True))
    grads64 = reference.lora_linear_backward(f64["grad_y"], *args64[:4], u64, 1.5, 0.1, 77)
    for name, g, g64 in zip(("dx", "dA", "dB", "dbias"), grads, grads64):
        assert_close_to_reference(name, g, g64, dtype)


@pytest.mark.skipif(not triton_usable(torch.device("cpu")), reason="triton not installed")
def test_backend_choice_knows_the_triton_rank_limit():
    from lowcost.kernels.lora_linear import MAX_RANK
    from lowcost.ops.backend import TRITON_MAX_RANK
    assert TRITON_MAX_RANK == MAX_RANK

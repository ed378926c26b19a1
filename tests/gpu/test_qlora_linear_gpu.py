"""GPU checks of the ``cuda`` backend on a quantized weight: the dequantizing GEMMs of lowcost._C
(``dequant_gemm`` / ``dequant_gemm_dgrad``, csrc/cuda/dequant_gemm_kernels.cuh) composed with the skinny LoRA
kernels, against float64 LoRA on the dense dequantized weight, output and every gradient, for every format
the CUDA tile decodes (nf4, nf4-dq, int8, q8_0, q4_0, q4_1, q4_k, q6_k; GGUF rows are whole blocks, so K is
rounded to the block: 32, or 256 for the k-quants).

Marked ``gpu``: skipped with a reason on machines without CUDA (conftest), and each test skips when lowcost._C
was built without its CUDA kernels. Run by benchmarks/device/run.sh.
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops import _quant_backends as qb
from lowcost.ops.backend import cuda_kernels_usable
from lowcost.reference import lora_linear_backward, lora_linear_forward
from lowcost.reference.quant import BLOCK_TYPES, QuantizedWeight, quantize_int8, quantize_nf4
from helpers import assert_close_to_reference

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
GRADS = ("x", "lora_a", "lora_b", "bias")


def _cuda_or_skip():
    if not torch.cuda.is_available() or not cuda_kernels_usable(CUDA):
        pytest.skip("the cuda backend's kernels are not built or no GPU")


GGUF_F16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2), "q6_k": (208,)}  # byte offsets


def _gguf_k(scheme: str, K: int) -> int:
    """K rounded to a whole number of the format's blocks (at least one)."""
    block = BLOCK_TYPES[scheme].block if scheme in BLOCK_TYPES else 1
    return max(block, K // block * block)


def _gguf_blocks(scheme: str, N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """(N, K / block · type_size) uint8: random GGUF blocks (every code, k-quant scale and min occurs) with small
    finite float16 d (and m / dmin)."""
    kind = BLOCK_TYPES[scheme]
    raw = torch.randint(0, 256, (N * K // kind.block, kind.type_size), generator=gen, dtype=torch.uint8)
    for offset in GGUF_F16_FIELDS[scheme]:
        halves = ((torch.rand(raw.shape[0], generator=gen) - 0.3) * 0.02 * K ** -0.5).half()
        raw[:, offset:offset + 2] = halves.view(torch.uint8).reshape(raw.shape[0], 2)
    return raw.reshape(N, -1)


def _weight(scheme: str, N: int, K: int, block_size: int = 64, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    if scheme in BLOCK_TYPES:
        block = BLOCK_TYPES[scheme].block
        return QuantizedWeight(scheme, (N, K), {"data": _gguf_blocks(scheme, N, K, gen)}, block).to(CUDA)
    dense = torch.randn(N, K, generator=gen, dtype=torch.float64) * K ** -0.5
    if scheme == "int8":
        return QuantizedWeight("int8", (N, K), quantize_int8(dense), 0).to(CUDA)
    return QuantizedWeight(scheme, (N, K), quantize_nf4(dense, block_size, scheme == "nf4-dq"), block_size).to(CUDA)


def _inputs(M, K, N, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, std=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    t = {"x": rand(M, K), "lora_a": rand(r, K, std=K ** -0.5), "lora_b": rand(N, r, std=r ** -0.5),
         "bias": rand(N), "grad_y": rand(M, N)}
    return {k: v.to(CUDA) for k, v in t.items()}


def _run(t, weight, backend, scale=1.5, dropout=0.1, seed=77):
    leaves = {k: t[k].clone().requires_grad_() for k in GRADS}
    y = lowcost.ops.lora_linear(leaves["x"], weight, leaves["lora_a"], leaves["lora_b"], scale, bias=leaves["bias"],
                                dropout=dropout, seed=seed, backend=backend)
    y.backward(t["grad_y"])
    return {"y": y.detach(), **{k: leaves[k].grad for k in GRADS}}


def _truth(t, weight, dtype, scale=1.5, dropout=0.1, seed=77):
    """Float64 LoRA on the dense weight dequantized to x's dtype (what every backend multiplies by)."""
    w64 = weight.dequantize(dtype).double().cpu()
    t64 = {k: v.double().cpu() for k, v in t.items()}
    y, u = lora_linear_forward(t64["x"], w64, t64["lora_a"], t64["lora_b"], t64["bias"], scale, dropout, seed)
    dx, da, db, dbias = lora_linear_backward(t64["grad_y"], t64["x"], w64, t64["lora_a"], t64["lora_b"], u, scale,
                                             dropout, seed)
    return {"y": y, "x": dx, "lora_a": da, "lora_b": db, "bias": dbias}


@pytest.mark.parametrize("scheme", qb.CUDA_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, K, N, r", [(0, 64, 48, 4), (1, 4096, 4096, 16), (129, 224, 72, 7), (1000, 1024, 3000, 64)])
def test_cuda_quantized_matches_float64(scheme, dtype, M, K, N, r):
    _cuda_or_skip()
    K = _gguf_k(scheme, K)
    weight, t = _weight(scheme, N, K, seed=M), _inputs(M, K, N, r, dtype, seed=M)
    got, want = _run(t, weight, "cuda"), _truth(t, weight, dtype)
    for name, expected in want.items():
        assert_close_to_reference(f"cuda {scheme} {name}", got[name].cpu(), expected, dtype)


@pytest.mark.parametrize("scheme", qb.CUDA_FORMATS)
def test_cuda_frozen_quantized_linear(scheme):
    """The frozen layer without adapter: y = x deq(W)ᵀ + bias (bias as the GEMM's c), dx = g deq(W)."""
    _cuda_or_skip()
    K = _gguf_k(scheme, 352)
    weight, t = _weight(scheme, 264, K, block_size=32), _inputs(333, K, 264, 1, torch.bfloat16)
    x = t["x"].clone().requires_grad_()
    y = lowcost.ops.quantized_linear(x, weight, t["bias"], backend="cuda")
    y.backward(t["grad_y"])
    w64 = weight.dequantize(torch.bfloat16).double().cpu()
    assert_close_to_reference("y", y.detach().cpu(), x.detach().double().cpu() @ w64.T + t["bias"].double().cpu(),
                              torch.bfloat16)
    assert_close_to_reference("dx", x.grad.cpu(), t["grad_y"].double().cpu() @ w64, torch.bfloat16)


def test_cuda_quantized_bitwise_reproducible():
    """Two identical fwd+bwd runs are bitwise equal: the dequantizing GEMMs never split their reduction."""
    _cuda_or_skip()
    weight, t = _weight("nf4-dq", 3072, 1024), _inputs(4096, 1024, 3072, 16, torch.bfloat16, seed=3)
    first, second = _run(t, weight, "cuda"), _run(t, weight, "cuda")
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


def test_cuda_op_refuses_a_format_without_a_tile():
    """The C++ op itself names the formats it decodes (the Python layer refuses earlier, by QUANT_SUPPORT):
    a Q5_K weight (no CUDA tile, nor a lowcost format) is refused."""
    _cuda_or_skip()
    x = torch.randn(4, 256, device=CUDA, dtype=torch.bfloat16)
    packed = [torch.zeros(8, 176, dtype=torch.uint8, device=CUDA)]
    with pytest.raises(RuntimeError, match="scheme must be 'nf4', 'nf4-dq', 'int8', 'q8_0', 'q4_0', 'q4_1', 'q4_k' "
                       "or 'q6_k'"):
        torch.ops.lowcost.dequant_gemm(x, packed, "q5_k", 8, 256, None)


@pytest.mark.parametrize("scheme", ["q4_k", "q6_k"])
def test_cuda_op_refuses_a_k_quant_k_off_the_super_block(scheme):
    """GGUF stores the k-quants in whole 256-element super-blocks: the op refuses K = 288 by name."""
    _cuda_or_skip()
    x = torch.randn(4, 288, device=CUDA, dtype=torch.bfloat16)
    packed = [torch.zeros(8, BLOCK_TYPES[scheme].type_size, dtype=torch.uint8, device=CUDA)]
    with pytest.raises(RuntimeError, match=f"a {scheme} weight holds whole 256-element blocks: K must be a multiple "
                       "of 256, got 288"):
        torch.ops.lowcost.dequant_gemm(x, packed, scheme, 8, 256, None)

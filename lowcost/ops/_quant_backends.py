"""Which backend runs a LoRA linear on a quantized weight, and the backends' entry points for it.

Formats each backend takes (``QUANT_SUPPORT``): ``torch`` every format (``lowcost.reference.qlora_linear``,
dequantizing one block of rows at a time); ``triton`` the formats its dequantizing GEMMs decode inside the
tile loop (``lowcost.kernels.qlora_linear``); ``cuda`` the formats its dequantizing GEMMs decode into shared
memory before the MMA (``CUDA_FORMATS``: the ``dequant_gemm`` ops of ``lowcost._C``, composed with the
skinny LoRA kernels in ``_cuda_backend``). Today all three take every format; a format a backend lacks would
be refused with an error naming the format, the formats the backend takes and the module. Choice: explicit argument > ``LOWCOST_BACKEND`` > the first of (triton, cuda, torch)
that can run here and takes the format.
"""
from __future__ import annotations

import torch

from lowcost.ops._torch_backend import _dropout
from lowcost.ops.backend import requested_backend, unavailable_reason
from lowcost.reference import qlora_linear as reference
from lowcost.reference.quant import FORMATS, dequantize_packed, dynamic_map, nf4_code, workspace_elements

TRITON_FORMATS = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
CUDA_FORMATS = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
QUANT_SUPPORT = {"torch": tuple(FORMATS), "triton": TRITON_FORMATS, "cuda": CUDA_FORMATS}


def resolve_quant_backend(requested, device: torch.device, rank: int, scheme: str, where: str = "") -> str:
    """Backend name for a quantized weight of format ``scheme``; a ValueError names the choice, the format and
    ``where`` (e.g. the module) when the requested backend cannot run it."""
    source, name = requested_backend(requested)
    if name is None:
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
        return next(c for c in order if scheme in QUANT_SUPPORT[c] and unavailable_reason(c, device, rank) is None)
    check_quant_backend(source, name, device, rank, scheme, where)
    return name


def check_quant_backend(source: str, name: str, device: torch.device, rank: int, scheme: str, where: str = "") -> None:
    """Raises a ValueError naming ``source`` (the argument or LOWCOST_BACKEND), the format and ``where`` when
    backend ``name`` has no kernel for a ``scheme`` weight or cannot run on ``device`` at rank ``rank``."""
    at = f" ({where})" if where else ""
    if scheme not in QUANT_SUPPORT[name]:
        takes = ", ".join(QUANT_SUPPORT[name]) or "no quantized format yet"
        raise ValueError(f"{source}={name!r} has no kernel for a {scheme!r} weight{at} (it takes: {takes}); "
                         "use backend='torch' (every format) or None")
    reason = unavailable_reason(name, device, rank)
    if reason is not None:
        raise ValueError(f"{source}={name!r} is not available{at}: {reason}")


def _rows(scheme, packed, K, block_size, dtype):
    """rows (a slice) -> those rows of W, dequantized to ``dtype``. Every call decodes into one float32
    workspace, allocated at the first (largest) block of rows and reused for the rest of this op call, so the
    transient memory is one block of rows and the row loop allocates no new weight-sized buffer per block."""
    workspace = []

    def dequant(rows: slice):
        if not workspace:
            size = workspace_elements(scheme, rows.stop - rows.start, K, block_size)
            workspace.append(torch.empty(size, dtype=torch.float32, device=packed[0].device))
        return dequantize_packed(scheme, packed, K, block_size, rows, dtype, workspace=workspace[0])
    return dequant


def _triton():
    from lowcost.kernels import qlora_linear  # imported on first use: triton is heavy to import
    return qlora_linear


def _with_code_books(packed, scheme):
    """The stored tensors plus the code books the Triton decoder reads (NF4 table; dynamic code for nf4-dq)."""
    if not scheme.startswith("nf4"):
        return list(packed)
    device = packed[0].device
    books = [nf4_code(device)] + ([dynamic_map().to(device)] if scheme == "nf4-dq" else [])
    return list(packed) + books


def _cuda():
    from lowcost.ops import _cuda_backend  # imported on first use, like the Triton kernels
    return _cuda_backend


def forward(backend, x, packed, scheme, N, block_size, lora_a, lora_b, bias, scale, dropout, seed):
    """(y (M, N), u (M, r)) for 2-D x."""
    if backend == "cuda":
        return _cuda().quant_forward(x, _with_code_books(packed, scheme), scheme, N, block_size, lora_a, lora_b,
                                     bias, scale, dropout, seed)
    if backend == "triton":
        books = _with_code_books(packed, scheme)
        return _triton().qlora_linear_fwd(x, books, scheme, N, block_size, lora_a, lora_b, bias, scale, dropout, seed)
    dequant = _rows(scheme, packed, x.shape[1], block_size, x.dtype)
    return reference.qlora_linear_forward(x, dequant, N, lora_a, lora_b, bias, scale, dropout, seed, _dropout)


def backward(backend, grad_y, x, packed, scheme, block_size, lora_a, lora_b, u, scale, dropout, seed, needs,
             norm=None):
    """(dx, dA, dB, dbias), None where not needed. ``norm`` (triton only) = (rstd (M,), w (K,), form): x is an
    RMSNorm's input, the op's input rebuilt in the x-pass's loads (``kernels.qlora_linear.qlora_linear_bwd``)."""
    assert norm is None or backend == "triton", f"the {backend} backend takes the op's input itself"
    if backend == "cuda":
        return _cuda().quant_backward(grad_y, x, _with_code_books(packed, scheme), scheme, block_size, lora_a,
                                      lora_b, u, scale, dropout, seed, needs)
    if backend == "triton":
        books = _with_code_books(packed, scheme)
        return _triton().qlora_linear_bwd(grad_y, x, books, scheme, block_size, lora_a, lora_b, u, scale, dropout,
                                          seed, needs, norm)
    dequant = _rows(scheme, packed, x.shape[1], block_size, x.dtype)
    return reference.qlora_linear_backward(grad_y, x, dequant, lora_a, lora_b, u, scale, dropout, seed, needs,
                                           _dropout)


def base_forward(backend, x, packed, scheme, N, block_size, bias):
    """x Wᵀ + bias (M, N) in x's dtype (a frozen quantized layer without adapter)."""
    if backend == "cuda":
        return _cuda().quant_base_forward(x, _with_code_books(packed, scheme), scheme, N, block_size, bias)
    if backend == "triton":
        return _triton().quantized_linear_fwd(x, _with_code_books(packed, scheme), scheme, N, block_size, bias)
    dequant = _rows(scheme, packed, x.shape[1], block_size, x.dtype)
    return reference.quantized_linear_forward(x, dequant, N, bias)


def base_dgrad(backend, grad_y, packed, scheme, K, block_size):
    """g W (M, K) in g's dtype."""
    if backend == "cuda":
        return _cuda().quant_base_dgrad(grad_y, _with_code_books(packed, scheme), scheme, K, block_size)
    if backend == "triton":
        return _triton().quantized_linear_dgrad(grad_y, _with_code_books(packed, scheme), scheme, K, block_size)
    dequant = _rows(scheme, packed, K, block_size, grad_y.dtype)
    return reference.quantized_base_dgrad(grad_y, dequant, K).to(grad_y.dtype)

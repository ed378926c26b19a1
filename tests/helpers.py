"""Shared test utilities: LoRA inputs and the per-dtype tolerance table.

Tolerance rule. The float64 ground truth is computed from the *same* (already rounded) inputs, so a
kernel's error comes only from (a) float32 accumulation, ~K·2⁻²⁴ relative in the worst case and far less
in practice, and (b) the roundings the contract allows: the output rounded once to its dtype, and tiles
(x̃, the low-rank product) cast to the input dtype before a tensor-core dot. Each rounding costs at most
one unit roundoff u (fp16 2⁻¹¹ ≈ 4.9e-4, bf16 2⁻⁸ ≈ 3.9e-3 for round-to-nearest of the 8-bit
mantissa's half-ulp 2⁻⁹ doubled for the worst element). Allowing four roundings relative to the largest
magnitude of the result gives fp16 2e-3 and bf16 1e-2 (≈ 4·2⁻⁹·1.3); fp32 gets 2e-5, which covers
K ≤ a few thousand of fp32 accumulation with margin while still failing on any indexing or mask error
(those produce O(1) relative errors).
"""
from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def make_lora_inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, noncontiguous=False,
                     seed=0, device="cpu"):
    """Random LoRA operands of realistic scale; B is non-zero so that every gradient path is exercised.

    With ``noncontiguous`` x is a transposed view and grad_y a strided slice (stride tests).
    """
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt).to(device)

    if noncontiguous:
        x = rand(K, M).t()
        grad_y = rand(M, 2 * N)[:, ::2]
    else:
        x = rand(M, K)
        grad_y = rand(M, N)
    return {
        "x": x,
        "weight": rand(N, K, std=K ** -0.5),
        "lora_a": rand(r, K, std=K ** -0.5, dt=adapter_dtype),
        "lora_b": rand(N, r, std=r ** -0.5, dt=adapter_dtype),
        "bias": rand(N) if bias else None,
        "grad_y": grad_y,
    }


def to_float64(inputs: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def max_normalized_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, tuple]:
    """(max |a - e| / max |e|, index of the worst element)."""
    diff = (actual.double() - expected.double()).abs()
    denom = max(expected.double().abs().max().item(), 1e-30)
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return diff.max().item() / denom, index


def assert_close_to_reference(name: str, actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype):
    """Fails with where and how much when ``actual`` is farther from the float64 truth than ``dtype`` allows."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if actual.numel() == 0:
        return
    err, index = max_normalized_error(actual, expected64)
    tol = TOLERANCE[dtype]
    assert err <= tol, (f"{name} ({dtype}): max normalised error {err:.3e} > {tol:.1e} at {index}: "
                        f"got {actual[index].item():.6g}, expected {expected64[index].item():.6g}")


def gpu_backends() -> list[str]:
    """The backends to run on CUDA tensors: torch always, Triton and the CUDA C++ kernels where they can run.
    Without CUDA all three are listed, so the tests are collected (then skipped by the ``gpu`` marker)."""
    from lowcost.ops.backend import cuda_kernels_usable, triton_usable
    if not torch.cuda.is_available():
        return ["torch", "triton", "cuda"]
    cuda = torch.device("cuda")
    return (["torch"] + (["triton"] if triton_usable(cuda) else [])
            + (["cuda"] if cuda_kernels_usable(cuda) else []))


def assert_loss_and_grads_close(label: str, loss, grads: dict, loss64, grads64: dict, inputs: dict,
                                dtype: torch.dtype) -> None:
    """A loss and its gradients against their float64 truth: the same shape and dtype, NaN where the truth is
    NaN ("mean" over no row), each within ``dtype``'s tolerance; each gradient in its input's dtype."""
    assert loss.dtype == dtype and loss.shape == loss64.shape
    if torch.isnan(loss64).all():
        assert torch.isnan(loss).all()
    else:
        assert_close_to_reference(f"{label} loss", loss, loss64, dtype)
    assert grads.keys() == grads64.keys()
    for name, g64 in grads64.items():
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_reference(f"{label} d{name}", grads[name], g64, dtype)


def cross_entropy_grad(reduction: str, labels: torch.Tensor, dtype: torch.dtype = torch.float32, seed: int = 7):
    """The incoming gradient of a cross-entropy loss: one per label for ``reduction="none"``, else a scalar
    that is not 1 (so a missing factor shows)."""
    if reduction == "none":
        return torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return torch.tensor(1.7, dtype=dtype)


def cross_entropy_truth64(inputs: dict, grad, reduction: str, *, weight64=None, train_w: bool = False,
                          smoothing: float = 0.0, softcap=None, scale: float = 1.0, dropout: float = 0.0,
                          seed: int = 0):
    """Loss and gradients of the unfused float64 head + cross-entropy: z = h Wᵀ + bias + s·(D⊙h) Aᵀ Bᵀ
    (D: the spec's Philox mask), soft-capped, then ``F.cross_entropy``.

    ``inputs``: "hidden" (..., K), "labels" (...), "bias", "lora_a", "lora_b" (None or absent when not used) and
    "weight" (V, K) unless ``weight64`` gives W (e.g. a quantized weight's dequantized values; a constant).
    Returns (loss, {name: gradient}) for every float input that takes one ("weight" only with ``train_w``)."""
    from lowcost.reference import dropout_keep_mask, keep_scale
    leaves = {k: v.double().requires_grad_(k != "weight" or train_w) for k, v in inputs.items()
              if k != "labels" and v is not None}
    h = leaves["hidden"].reshape(-1, leaves["hidden"].shape[-1])
    z = h @ (leaves["weight"] if weight64 is None else weight64).t()
    if "bias" in leaves:
        z = z + leaves["bias"]
    if "lora_a" in leaves:
        mask = dropout_keep_mask(*h.shape, seed, dropout).double() * (keep_scale(dropout) if dropout else 1.0)
        z = z + scale * ((h * mask) @ leaves["lora_a"].t()) @ leaves["lora_b"].t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    loss = torch.nn.functional.cross_entropy(z, inputs["labels"].reshape(-1), reduction=reduction,
                                             label_smoothing=smoothing)
    loss = loss.reshape(inputs["labels"].shape) if reduction == "none" else loss
    loss.backward(grad.double())
    return loss.detach(), {k: v.grad for k, v in leaves.items() if v.requires_grad}

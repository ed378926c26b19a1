"""Pure-torch Philox4x32-10 and the dropout mask every backend must reproduce.

The mask is a pure function of ``(seed, element index)`` (docs/lora_linear_spec.md):

    i        = m * K + k                      (logical row-major index of x viewed as (M, K), int64)
    counter  = (lo32(i >> 2), hi32(i >> 2), 0, 0)
    key      = (lo32(seed), hi32(seed))
    word     = philox4x32_10(counter, key)[i & 3]
    keep     = word >= floor(p * 2**32)

uint32 arithmetic is emulated on int64 tensors. ``mulhilo32`` splits the constant into 16-bit halves so
that no product exceeds 2**49, which keeps every intermediate exact in int64.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo32(constant: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``constant * value`` for uint32 values held in int64."""
    c_lo, c_hi = constant & 0xFFFF, constant >> 16
    p_lo = value * c_lo                      # < 2**48
    p_hi = value * c_hi                      # < 2**48
    t = p_hi + (p_lo >> 16)                  # product = t * 2**16 + (p_lo & 0xFFFF)
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32 with 10 rounds (Random123). Counters: int64 tensors of uint32 values; key: two ints."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The integer drop threshold: an element is dropped iff its Philox word is below it."""
    return int(p * 4294967296.0)


def keep_scale(p: float) -> float:
    """1 / (1 - p) rounded to float32, the factor applied to kept elements in every backend."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def philox_words(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """The uint32 (held in int64) Philox word of each int64 element index for ``seed``."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    counter = indices >> 2
    words = philox4x32_10(counter & MASK32, counter >> 32, 0, 0, seed & MASK32, (seed >> 32) & MASK32)
    lane = indices & 3
    out = torch.where(lane == 0, words[0], words[1])
    out = torch.where(lane == 2, words[2], out)
    return torch.where(lane == 3, words[3], out)


def dropout_keep_mask(M: int, K: int, seed: int, p: float, device=None, row_offset: int = 0) -> torch.Tensor:
    """Bool (M, K): True where the element of x (viewed as (M, K)) is kept.

    The indices of a row-major block are contiguous, so each Philox call serves four consecutive
    elements. ``row_offset`` starts the rows there (to check indices past 2**31 without allocating them).
    """
    if p == 0.0:
        return torch.ones(M, K, dtype=torch.bool, device=device)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    start, count = row_offset * K, M * K
    counter = torch.arange(start >> 2, ((start + count + 3) >> 2), dtype=torch.int64, device=device)
    words = philox4x32_10(counter & MASK32, counter >> 32, 0, 0, seed & MASK32, (seed >> 32) & MASK32)
    flat = torch.stack(words, dim=1).flatten()[start & 3: (start & 3) + count]
    return (flat >= dropout_threshold(p)).reshape(M, K)


def apply_dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x̃ = D ⊙ x for x: (M, K): kept elements times keep_scale(p) (in fp32, or fp64 for fp64 x), rest 0."""
    if p == 0.0:
        return x
    keep = dropout_keep_mask(x.shape[0], x.shape[1], seed, p, x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scaled = x.to(compute) * keep_scale(p)
    return torch.where(keep, scaled, torch.zeros((), dtype=compute, device=x.device)).to(x.dtype)


DropoutFn = Callable[[torch.Tensor, int, float], torch.Tensor]
"""A backend's dropout: ``dropout_fn(x, seed, p)`` → D ⊙ x (the spec's mask, scaled by 1/(1-p))."""


@runtime_checkable
class PairedDropout(Protocol):
    """A ``DropoutFn`` that can also mask two tensors of one (M, K) shape under one generation of the mask.

    ``pair(x, z, seed, p)`` → (D ⊙ x, D ⊙ z); it may mask ``z`` in place (z is always the caller's temporary).
    The torch backend's dropout is one (``philox_dropout_pair_``, CPU); ``dropout_pair`` uses it where a backward
    wants x̃ for dA and the low-rank term of dx together."""

    def __call__(self, x: torch.Tensor, seed: int, p: float) -> torch.Tensor: ...

    def pair(self, x: torch.Tensor, z: torch.Tensor, seed: int, p: float) -> tuple[torch.Tensor, torch.Tensor]: ...


def dropout_pair(dropout_fn: DropoutFn, x: Optional[torch.Tensor], z: Optional[torch.Tensor], seed: int,
                 p: float) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(D ⊙ x, D ⊙ z) for two tensors of one (M, K) shape under one mask (either may be None: skipped).

    A ``PairedDropout`` generates the mask once for both; any other ``DropoutFn`` is called twice, which gives the
    same mask, as the mask is a function of (seed, index). z must be a temporary of the caller's: ``pair`` may
    mask it in place."""
    if p == 0.0:
        return x, z
    if x is not None and z is not None and isinstance(dropout_fn, PairedDropout):
        return dropout_fn.pair(x, z, seed, p)
    return (dropout_fn(x, seed, p) if x is not None else None, dropout_fn(z, seed, p) if z is not None else None)

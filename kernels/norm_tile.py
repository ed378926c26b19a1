"""The RMSNorm output rebuilt inside a tile load: the "norm" fusion's backward on the Triton backend.

A LoRA op whose input y is a lowcost RMSNorm's output keeps (x, rstd, w) instead of y
(``lowcost.ops.normed_input``). A kernel that reads y tile by tile can rebuild each tile from the x tile,
rstd[rows] and w[cols], so no (M, K) y exists. ``normed_tile`` computes exactly what
``lowcost.reference.rms_norm.normed`` computes, in the same order and with the same roundings:

    x̂ = fp32(x) · rstd                                    (fp32 product, as torch's)
    NORM == 1 ("llama"):  y = cast(fp32(w) · fp32(cast(x̂)))   the product of two values of x's dtype is exact
                                                          in fp32 for fp16/bf16, so one rounding, as torch's
                                                          16-bit multiply; an identity cast for fp32 x
    NORM == 2 ("gemma"):  y = cast(x̂ · (1 + fp32(w)))
    then (autocast's copy) y rounded to OUT_DTYPE          (round to nearest even, as ``Tensor.to``)

``cast`` is to x's dtype, round to nearest even. The launchers send only w in x's dtype (so y's dtype is x's),
with OUT_DTYPE x's dtype or, for an fp32 x, autocast's fp16/bf16 copy.
"""
import triton
import triton.language as tl

from .tiles import round_to

NORM_MODES = {"": 0, "llama": 1, "gemma": 2}


@triton.jit
def normed_tile(xt, rstd_ptr, w_ptr, offs_m, offs_k, M, K, stride_rstd, stride_w, NORM: tl.constexpr,
                OUT_DTYPE: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """y[rows, cols] (BLOCK_M, BLOCK_K) in OUT_DTYPE from the norm input tile ``xt`` (x's dtype, zeros outside
    the tensor), rstd (M,) fp32 and w (K,). Rows and columns outside (M, K) give zeros."""
    rstd = tl.load(rstd_ptr + offs_m.to(tl.int64) * stride_rstd, mask=offs_m < M, other=0.0)
    w = tl.load(w_ptr + offs_k.to(tl.int64) * stride_w, mask=offs_k < K, other=0.0).to(tl.float32)
    xhat = xt.to(tl.float32) * rstd[:, None]
    if NORM == 1:
        y = round_to(w[None, :] * round_to(xhat, xt.dtype, EMULATE_RNE).to(tl.float32), xt.dtype, EMULATE_RNE)
    else:
        y = round_to(xhat * (1.0 + w[None, :]), xt.dtype, EMULATE_RNE)
    return round_to(y.to(tl.float32), OUT_DTYPE, EMULATE_RNE)

"""Launch planning for the fused LoRA linear Triton kernels: block configurations, grids, TMA eligibility and
one ``Launch`` per kernel launch (kernel, grid, runtime args, constexprs, options).

Planning never touches tensor data, so the same functions serve the launchers (lora_linear.py), the
kernel report and the compile-everything check (tools/kernel_report.py), which compile exactly the launches
planned here.

Grid rules (``num_sms``: the GPU's SM count; a small fixed count under the interpreter):
- GEMMs are persistent: min(num_sms, tiles) programs. The "wide" tile (128x256 in fp16/bf16) is used when
  the output has at least num_sms such tiles, else the "narrow" one, so small problems still fill the GPU.
- Memory-bound passes own one column block each and split the rows into chunks (the u-pass splits K
  instead) so that the grid has about 2 * num_sms programs; each chunk writes fp32 partials that
  reduce.py sums in a fixed order (no atomics).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl

from .lora_linear_bwd import _lora_bwd_dx_kernel, _lora_bwd_g_kernel, _lora_bwd_x_kernel
from .lora_linear_fwd import _lora_fwd_u_kernel, _lora_fwd_y_kernel
from .norm_tile import NORM_MODES
from .philox import _dropout_mask_kernel, dropout_threshold, keep_scale, seed_words, uint32_as_int32
from .reduce import _reduce_partials_kernel

Tensor = torch.Tensor
RANK_STEP = 16  # ranks per low-rank K-step of the GEMMs (their code is then independent of r)
PROGRAMS_PER_SM = 2  # memory-bound passes: target grid = PROGRAMS_PER_SM * num_sms
INTERPRETER_SMS = 3  # the SM count assumed under the interpreter: tiny test shapes reach every code path
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel launch (every tl.dot dimension is >= 16).

    GEMMs: block_m x block_n output tiles, reduction step block_k. Passes: block_m rows per step and
    block_n columns per program (block_k for the u-pass: its K step). 0 marks an unused size.
    """
    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def block_configs(kind: str, dtype: torch.dtype) -> tuple[BlockConfig, ...]:
    """Block configs of one kernel kind for x's dtype (GEMMs: (wide, narrow)). fp32 halves the widths
    (shared memory per stage). Untuned: chosen without a GPU to measure on."""
    f32 = dtype == torch.float32
    table = {
        "gemm": ((BlockConfig("wide", 128, 128, 32, 8, 3), BlockConfig("narrow", 64, 64, 32, 4, 3)) if f32 else
                 (BlockConfig("wide", 128, 256, 64, 8, 3), BlockConfig("narrow", 64, 128, 64, 4, 3))),
        "fwd_u": (BlockConfig("pass", 64, 0, 64 if f32 else 128, 4, 3),),
        "bwd_g": (BlockConfig("pass", 64, 128 if f32 else 256, 0, 8, 3),),
        "bwd_x": (BlockConfig("pass", 64, 64 if f32 else 128, 0, 8, 3),),
    }
    return table[kind]


def bwd_g_config(dtype: torch.dtype, r: int) -> BlockConfig:
    """The g-pass config: half as many columns per program at R_PAD = 128 (B's tile and the dB accumulator
    grow with R_PAD; 256 columns would need more shared memory than an sm_90 block has)."""
    cfg = block_configs("bwd_g", dtype)[0]
    return cfg if rank_pad(r) <= 64 else BlockConfig(cfg.name, cfg.block_m, cfg.block_n // 2, 0, cfg.num_warps,
                                                      cfg.num_stages)


MASK_CONFIG = BlockConfig("mask", 32, 0, 64, 4, 1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; INTERPRETER_SMS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def pick_gemm_config(rows: int, cols: int, dtype: torch.dtype, num_sms: int) -> BlockConfig:
    """The wide tile when the (rows, cols) output has at least one such tile per SM, else the narrow one."""
    wide, narrow = block_configs("gemm", dtype)
    tiles = triton.cdiv(rows, wide.block_m) * triton.cdiv(cols, wide.block_n)
    return wide if tiles >= num_sms else narrow


def split_count(blocks: int, other_programs: int, num_sms: int) -> int:
    """How many pieces to split ``blocks`` steps into so that pieces x other_programs reaches the target grid."""
    return max(1, min(blocks, triton.cdiv(PROGRAMS_PER_SM * num_sms, max(1, other_programs))))


def chunk_length(length: int, step: int, pieces: int) -> int:
    """Length of each of ``pieces`` chunks of ``length``, a multiple of ``step`` (no chunk is empty)."""
    return max(1, triton.cdiv(triton.cdiv(length, pieces), step)) * step


def rank_pad(r: int) -> int:
    """R_PAD: the rank padded to a power of two >= 16 (the smallest tl.dot dimension)."""
    return max(16, triton.next_power_of_2(r))


def dot_meta(dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> dict:
    """DOT_DTYPE (x's dtype), DOT_PRECISION (fp32 inputs: "tf32" only if torch allows TF32 matmuls) and
    UPCAST (bf16 under the interpreter, where bf16 arithmetic is broken: tiles go to fp32 before dots)."""
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"
    return {"DOT_DTYPE": TL_DTYPES[dtype], "DOT_PRECISION": precision,
            "UPCAST": interpreting() and dtype == torch.bfloat16}


def dropout_args(dropout: float, seed: int) -> dict:
    seed_lo, seed_hi = seed_words(seed)
    return {"seed_lo": seed_lo, "seed_hi": seed_hi,
            "threshold": uint32_as_int32(dropout_threshold(dropout)), "keep_scale": keep_scale(dropout)}


def tma_ok(*tensors: Tensor) -> bool:
    """True when every tensor can be read through a TMA descriptor: 2-D, non-empty, last stride 1,
    16-byte aligned base and row stride."""
    def ok(t: Tensor) -> bool:
        size = t.element_size()
        return (t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
                and (t.stride(0) * size) % 16 == 0)
    return all(ok(t) for t in tensors)


def tma_source(t: Tensor, block: list[int], use_tma: bool):
    """What a kernel's ``*_src`` argument gets: a host-side tensor descriptor of ``block`` tiles, or t."""
    if not use_tma:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t, block)


# ------------------------------------------------------------------------------------------------ launch
@dataclass
class Launch:
    """One kernel launch: runtime args by name, constexprs, grid and options, plus what the kernel report
    shows about it (role, persistence, the tile of its reference GEMM)."""
    kernel: triton.JITFunction
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    label: str = ""
    role: str = "pass"              # "gemm": the forward / dgrad GEMMs; "pass": everything else
    persistent: bool = False
    reference: Optional[dict] = field(default=None)

    def run(self) -> None:
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages)

    def config_text(self) -> str:
        blocks = "x".join(str(v) for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{blocks} w{self.num_warps} s{self.num_stages}" + (" tma" if self.constexprs.get("TMA") else "")


def _reference(M: int, N: int, K: int, cfg: BlockConfig, b_kmajor: bool, programs: int, use_tma: bool) -> dict:
    return {"M": M, "N": N, "K": K, "block_m": cfg.block_m, "block_n": cfg.block_n, "block_k": cfg.block_k,
            "group_m": cfg.group_m, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "b_kmajor": b_kmajor,
            "tma": use_tma, "persistent": use_tma, "num_programs": programs}


def _persistent_grid(rows: int, cols: int, cfg: BlockConfig, num_sms: int) -> int:
    return max(1, min(num_sms, triton.cdiv(rows, cfg.block_m) * triton.cdiv(cols, cfg.block_n)))


def plan_fwd_u(x, lora_a, u_part, dropout, seed, num_sms) -> Launch:
    """u_part (splits, M, r) fp32 = x̃ Aᵀ over each slice of K; u_part.shape[0] slices (see fwd_u_splits)."""
    (M, K), r = x.shape, lora_a.shape[0]
    cfg = block_configs("fwd_u", x.dtype)[0]
    splits = u_part.shape[0]
    use_tma = tma_ok(x)
    args = {"x_src": tma_source(x, [cfg.block_m, cfg.block_k], use_tma), "a_ptr": lora_a, "u_part_ptr": u_part,
            "M": M, "K": K, "R": r, "k_split": chunk_length(K, cfg.block_k, splits),
            "stride_xm": x.stride(0), "stride_xk": x.stride(1), "stride_ar": lora_a.stride(0),
            "stride_ak": lora_a.stride(1), "stride_us": u_part.stride(0), "stride_um": u_part.stride(1),
            "stride_ur": u_part.stride(2), **dropout_args(dropout, seed)}
    meta = {"HAS_DROPOUT": dropout > 0, "MASK_VEC4": dropout > 0 and K % 4 == 0, "TMA": use_tma, "R_PAD": rank_pad(r),
            "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, **dot_meta(x.dtype)}
    return Launch(_lora_fwd_u_kernel, (triton.cdiv(M, cfg.block_m), splits), args, meta, cfg.num_warps,
                  cfg.num_stages, "fwd_u")


def fwd_u_splits(M: int, K: int, dtype: torch.dtype, num_sms: int) -> int:
    """Number of K slices of the u-pass (1 when the row blocks alone reach the target grid)."""
    cfg = block_configs("fwd_u", dtype)[0]
    pieces = split_count(triton.cdiv(K, cfg.block_k), triton.cdiv(M, cfg.block_m), num_sms)
    return max(1, triton.cdiv(K, chunk_length(K, cfg.block_k, pieces)))


def plan_fwd_y(x, weight, su, lora_b, bias, y, num_sms) -> Launch:
    """y (M, N) = x Wᵀ + su Bᵀ + bias, persistent; su = s·u and B in x's dtype (lowrank_operand)."""
    (M, K), (N, r) = x.shape, lora_b.shape
    cfg = pick_gemm_config(M, N, x.dtype, num_sms)
    use_tma = tma_ok(x, weight, y, su, lora_b)
    programs = _persistent_grid(M, N, cfg, num_sms)
    args = {"x_src": tma_source(x, [cfg.block_m, cfg.block_k], use_tma),
            "w_src": tma_source(weight, [cfg.block_n, cfg.block_k], use_tma),
            "su_src": tma_source(su, [cfg.block_m, RANK_STEP], use_tma),
            "b_src": tma_source(lora_b, [cfg.block_n, RANK_STEP], use_tma),
            "bias_ptr": y if bias is None else bias, "y_src": tma_source(y, [cfg.block_m, cfg.block_n], use_tma),
            "M": M, "N": N, "K": K, "R": r, "num_programs": programs,
            "stride_xm": x.stride(0), "stride_xk": x.stride(1), "stride_wn": weight.stride(0),
            "stride_wk": weight.stride(1), "stride_sum": su.stride(0), "stride_sur": su.stride(1),
            "stride_bn": lora_b.stride(0), "stride_br": lora_b.stride(1), "stride_ym": y.stride(0),
            "stride_yn": y.stride(1)}
    meta = {"HAS_BIAS": bias is not None, "TMA": use_tma, "RANK_STEP": RANK_STEP, "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, **dot_meta(x.dtype)}
    return Launch(_lora_fwd_y_kernel, (programs,), args, meta, cfg.num_warps, cfg.num_stages, "fwd_y",
                  role="gemm", persistent=True, reference=_reference(M, N, K, cfg, True, programs, use_tma))


def bwd_g_chunks(M: int, N: int, r: int, dtype: torch.dtype, num_sms: int) -> tuple[int, int, int]:
    """(column blocks, row chunks, rows per chunk) of the g-pass."""
    cfg = bwd_g_config(dtype, r)
    cols = triton.cdiv(N, cfg.block_n)
    rows = chunk_length(M, cfg.block_m, split_count(triton.cdiv(M, cfg.block_m), cols, num_sms))
    return cols, triton.cdiv(M, rows), rows


def plan_bwd_g(grad_y, lora_b, u, du_part, db_part, dbias_part, scale, rows_per_chunk) -> Launch:
    """du_part[c] = s·g[:, block c] B[block c] and db_part[j] = s·g[chunk j]ᵀ u[chunk j] (both or neither),
    dbias_part[j] = Σ g[chunk j] (if dbias_part is not None)."""
    (M, N), r = grad_y.shape, lora_b.shape[1]
    lowrank = du_part is not None
    cfg = bwd_g_config(grad_y.dtype, r if lowrank else 1)
    assert lowrank == (db_part is not None), "du and dB partials come together"
    use_tma = tma_ok(grad_y)
    absent = u.new_empty((1, 1, 1))  # stands in for an output that is not computed (never written)
    du_p, db_p = (du_part, db_part) if lowrank else (absent, absent)
    dbias_p = absent[0] if dbias_part is None else dbias_part
    args = {"g_src": tma_source(grad_y, [cfg.block_m, cfg.block_n], use_tma), "b_ptr": lora_b, "u_ptr": u,
            "du_part_ptr": du_p, "db_part_ptr": db_p, "dbias_part_ptr": dbias_p, "M": M, "N": N, "R": r,
            "rows_per_chunk": rows_per_chunk, "stride_gm": grad_y.stride(0), "stride_gn": grad_y.stride(1),
            "stride_bn": lora_b.stride(0), "stride_br": lora_b.stride(1), "stride_um": u.stride(0),
            "stride_ur": u.stride(1), "stride_dus": du_p.stride(0), "stride_dum": du_p.stride(1),
            "stride_dbs": db_p.stride(0), "stride_dbn": db_p.stride(1), "stride_dbias_s": dbias_p.stride(0),
            "scale": float(scale)}
    meta = {"LOWRANK": lowrank, "NEED_DBIAS": dbias_part is not None, "TMA": use_tma,
            "R_PAD": rank_pad(r) if lowrank else 16, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
            **dot_meta(grad_y.dtype)}
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, rows_per_chunk))
    return Launch(_lora_bwd_g_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "bwd_g")


def plan_bwd_dx(grad_y, weight, du, lora_a, dx, lowrank: bool, num_sms: int) -> Launch:
    """dx (M, K) = g W (+ du A when ``lowrank``), persistent; du and A in x's dtype (lowrank_operand)."""
    (M, N), K, r = grad_y.shape, weight.shape[1], lora_a.shape[0]
    cfg = pick_gemm_config(M, K, grad_y.dtype, num_sms)
    use_tma = tma_ok(grad_y, weight, dx, *((du, lora_a) if lowrank else ()))
    programs = _persistent_grid(M, K, cfg, num_sms)
    args = {"g_src": tma_source(grad_y, [cfg.block_m, cfg.block_k], use_tma),
            "w_src": tma_source(weight, [cfg.block_k, cfg.block_n], use_tma),
            "du_src": tma_source(du, [cfg.block_m, RANK_STEP], use_tma and lowrank),
            "a_src": tma_source(lora_a, [RANK_STEP, cfg.block_n], use_tma and lowrank),
            "dx_src": tma_source(dx, [cfg.block_m, cfg.block_n], use_tma), "M": M, "N": N, "K": K, "R": r,
            "num_programs": programs, "stride_gm": grad_y.stride(0), "stride_gn": grad_y.stride(1),
            "stride_wn": weight.stride(0), "stride_wk": weight.stride(1), "stride_dum": du.stride(0),
            "stride_dur": du.stride(1), "stride_ar": lora_a.stride(0), "stride_ak": lora_a.stride(1),
            "stride_dxm": dx.stride(0), "stride_dxk": dx.stride(1)}
    meta = {"LOWRANK": lowrank, "TMA": use_tma, "RANK_STEP": RANK_STEP, "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, **dot_meta(grad_y.dtype)}
    return Launch(_lora_bwd_dx_kernel, (programs,), args, meta, cfg.num_warps, cfg.num_stages, "bwd_dx",
                  role="gemm", persistent=True, reference=_reference(M, K, N, cfg, False, programs, use_tma))


def bwd_x_chunks(M: int, K: int, dtype: torch.dtype, num_sms: int) -> tuple[int, int, int]:
    """(column blocks, row chunks, rows per chunk) of the x-pass."""
    cfg = block_configs("bwd_x", dtype)[0]
    cols = triton.cdiv(K, cfg.block_n)
    rows = chunk_length(M, cfg.block_m, split_count(triton.cdiv(M, cfg.block_m), cols, num_sms))
    return cols, triton.cdiv(M, rows), rows


def plan_bwd_x(x, du, lora_a, dx, da_part, dropout, seed, rows_per_chunk, norm=None) -> Launch:
    """da_part[j] = du[chunk j]ᵀ x̃[chunk j], and dx += D ⊙ (du A) when dx is not None. The tiles and dots are
    in du's dtype (the op's input dtype). ``norm`` = (rstd (M,) fp32, norm weight (K,), "llama" | "gemma"):
    x is then the RMSNorm's input, and the op's input is rebuilt from it in the kernel's loads."""
    (M, K), r = x.shape, lora_a.shape[0]
    # An fp32 norm input under autocast (16-bit du) loads fp32 tiles: the fp32 column block (64), as the fp32 op
    # does. With 128 columns Triton 3.9.0 spilled 12 bytes at p = 0 (3.6.0 did not). The column block changes no
    # result: rows_per_chunk (bwd_x_chunks, from du's dtype) fixes dA's summation order.
    cfg = block_configs("bwd_x", torch.float32 if norm is not None and x.dtype == torch.float32 else du.dtype)[0]
    dx_lowrank = dx is not None
    dx_t = x if dx is None else dx
    rstd, norm_w, form = norm if norm is not None else (x, x, "")
    use_tma = tma_ok(x, dx_t)
    block = [cfg.block_m, cfg.block_n]
    args = {"x_src": tma_source(x, block, use_tma), "du_ptr": du, "a_ptr": lora_a,
            "dx_src": tma_source(dx_t, block, use_tma), "da_part_ptr": da_part, "rstd_ptr": rstd,
            "norm_w_ptr": norm_w, "M": M, "K": K, "R": r,
            "rows_per_chunk": rows_per_chunk, "stride_xm": x.stride(0), "stride_xk": x.stride(1),
            "stride_dum": du.stride(0), "stride_dur": du.stride(1), "stride_ar": lora_a.stride(0),
            "stride_ak": lora_a.stride(1), "stride_dxm": dx_t.stride(0), "stride_dxk": dx_t.stride(1),
            "stride_das": da_part.stride(0), "stride_dar": da_part.stride(1),
            "stride_rstd": rstd.stride(0) if norm is not None else 0,
            "stride_norm_w": norm_w.stride(0) if norm is not None else 0, **dropout_args(dropout, seed)}
    meta = {"DX_LOWRANK": dx_lowrank, "HAS_DROPOUT": dropout > 0, "MASK_VEC4": dropout > 0 and K % 4 == 0,
            "NORM": NORM_MODES[form], "TMA": use_tma, "R_PAD": rank_pad(r), "BLOCK_M": cfg.block_m,
            "BLOCK_K": cfg.block_n, **dot_meta(du.dtype)}
    grid = (triton.cdiv(K, cfg.block_n), triton.cdiv(M, rows_per_chunk))
    return Launch(_lora_bwd_x_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "bwd_x")


def plan_reduce(part: Tensor, out: Tensor, num_sms: int, label: str, out2: Optional[Tensor] = None,
                scale2: float = 1.0) -> Launch:
    """out (rows, cols) = Σ_p part[p] in index order, and out2 = scale2 · that sum if out2 is given.
    part is (parts, rows, cols) fp32 (a 2-D part is one row); out and out2 have unit column stride."""
    part3 = part if part.dim() == 3 else part.unsqueeze(1)
    out2d, out2_2d = (t if t is None or t.dim() == 2 else t.unsqueeze(0) for t in (out, out2))
    rows, cols = out2d.shape
    block = max(16, min(1024, triton.next_power_of_2(max(1, rows * cols // (PROGRAMS_PER_SM * num_sms))) // 2))
    other = out2d if out2_2d is None else out2_2d
    args = {"part_ptr": part3, "out_ptr": out2d, "out2_ptr": other, "n_parts": part3.shape[0], "rows": rows,
            "cols": cols, "stride_part": part3.stride(0), "stride_prow": part3.stride(1),
            "stride_orow": out2d.stride(0), "stride_o2row": other.stride(0), "scale2": float(scale2)}
    meta = {"HAS_OUT2": out2 is not None, "EMULATE_RNE": interpreting(), "BLOCK": block}
    return Launch(_reduce_partials_kernel, (triton.cdiv(rows * cols, block),), args, meta, 4, 1, f"reduce_{label}")


def lowrank_buffer(rows: int, r: int, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised (rows, r) view whose rows are padded to a multiple of 16 bytes, so a TMA descriptor
    can read it whatever r is (columns past r are outside the view: TMA fills them with zeros)."""
    per_16_bytes = 16 // torch.empty((), dtype=dtype).element_size()
    return torch.empty((rows, triton.cdiv(max(r, 1), per_16_bytes) * per_16_bytes), dtype=dtype, device=device)[:, :r]


def lowrank_operand(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype`` with TMA-readable rows: t itself when it already is, else a padded copy. (Adapters are
    r x K and N x r: the copy is small. fp32 adapters with fp16/bf16 x are rounded here, as the kernels
    would round each tile before its dot: same round-to-nearest-even, same result.)"""
    if t.dtype == dtype and (t.numel() == 0 or tma_ok(t)):
        return t
    out = lowrank_buffer(*t.shape, dtype, t.device)
    out.copy_(t)
    return out


def plan_mask(out, row_offset, seed, dropout) -> Launch:
    M, K = out.shape
    cfg = MASK_CONFIG
    args = {"out_ptr": out, "M": M, "K": K, "row_offset": row_offset, "stride_om": out.stride(0),
            **{k: v for k, v in dropout_args(dropout, seed).items() if k != "keep_scale"}}
    meta = {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "VEC4": K % 4 == 0}
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(K, cfg.block_k))
    return Launch(_dropout_mask_kernel, grid, args, meta, cfg.num_warps, cfg.num_stages, "dropout_mask")

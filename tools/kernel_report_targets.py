"""The targets of issue #9, asserted on kernel report rows (``tools/kernel_report.py --check``).

For every (shape, dropout) group of rows:
- every kernel compiled, and has 0 spills;
- no kernel has a global atomic or reduction instruction (RED/ATOM): the backward's dA, dB and dbias come
  from per-block partials and a fixed-order reduction, so backward is bitwise reproducible (the forward
  has none either);
- the forward and dgrad GEMMs (role "gemm", not references) use wgmma and TMA, are persistent, and use
  at most 1.1x the registers of the reference GEMM of the same tile;
- every non-persistent kernel launches at least one program per SM when M >= 8192;
- the CUDA kernels use tensor cores (HMMA or HGMMA in the SASS).

The fused gated MLP's and fused loss's kernels (issue #12; rows with ``op`` "lora_gated_mlp" or
"linear_cross_entropy") are held to every target above except the LoRA-linear GEMM design of #9: their
big GEMMs (role "gemm": the down projection's y = h W_dᵀ and dh = g W_d) must use wgmma, but they are
pointer-loaded, non-persistent tile GEMMs (the h tile is rebuilt from gate and up in the A-operand loads),
so TMA, persistence and the register ratio to a reference GEMM are not asserted for them.
"""
from __future__ import annotations

REGISTER_RATIO = 1.1


def _where(row: dict) -> str:
    M, K, N, r = row["shape"].split(",")
    where = f"{row.get('backend', 'triton')}, {row.get('op', 'lora_linear')}"
    return f"{row['kernel']} [{where}] at M={M} K={K} N={N} r={r} {row['dtype']} p={row['dropout']}"


def _gemm_violations(row: dict, reference: dict | None) -> list[str]:
    out = []
    if row.get("mma") != "wgmma":
        out.append(f"MMA is {row.get('mma')}, target wgmma")
    if not row.get("tma"):
        out.append("loads do not use TMA, target TMA")
    if not row.get("persistent"):
        out.append("not persistent, target persistent")
    if reference is None or not reference.get("ok", False):
        out.append("no compiled reference GEMM of the same tile to compare registers with")
    elif row["regs"] > REGISTER_RATIO * reference["regs"]:
        out.append(f"registers {row['regs']} > {REGISTER_RATIO} x {reference['regs']} of the reference GEMM "
                   f"of the same tile")
    return out


def _row_violations(row: dict, rows_by_kernel: dict, num_sms: int) -> list[str]:
    if not row.get("ok", True):
        return [f"does not compile: {row.get('error', '?')}"]
    out = []
    if row.get("spills", 0) != 0:
        out.append(f"{row['spills']} bytes of spills, target 0")
    if row.get("atomics", 0) != 0:
        out.append(f"{row['atomics']} atomic/reduction instructions, target 0 (deterministic reductions)")
    M = int(row["shape"].split(",")[0])
    if not row.get("persistent") and M >= 8192 and row["grid"] < num_sms:
        out.append(f"launches {row['grid']} programs, target >= {num_sms} (one per SM) at M={M}")
    if row.get("backend") == "cuda" and row.get("mma") == "none":
        out.append("no HMMA/HGMMA in the SASS, target tensor cores")
    if row.get("backend", "triton") == "triton" and row.get("role") == "gemm" and not row.get("reference"):
        if row.get("op", "lora_linear") == "lora_linear":
            out += _gemm_violations(row, rows_by_kernel.get(f"reference GEMM ({row['kernel']})"))
        elif row.get("mma") != "wgmma":
            out.append(f"MMA is {row.get('mma')}, target wgmma")
    return out


def violations(rows: list[dict], num_sms: int) -> list[str]:
    """One line per (kernel, violated target); empty when every target holds."""
    groups: dict = {}
    for row in rows:
        key = (row.get("op", "lora_linear"), row["shape"], row["dropout"], row["dtype"])
        groups.setdefault(key, {})[row["kernel"]] = row
    out = []
    for by_kernel in groups.values():
        for row in by_kernel.values():
            out += [f"{_where(row)}: {v}" for v in _row_violations(row, by_kernel, num_sms)]
    return out

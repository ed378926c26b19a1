"""The launches of the fused gated MLP, grouped projections and fused linear cross-entropy Triton kernels, for the
kernel report.

    report_launches(op, M, K, N, r, dtype, p, num_sms) -> the launches of one step of ``op`` at a shape
    aot_launches()                                      -> every configuration their launchers can launch

Both are planned by the launchers' own ``plan_*`` functions on placeholder tensors (torch.empty never
touches memory; nothing runs), so tools/kernel_report.py compiles exactly what a JIT launch compiles.

Shapes: "lora_gated_mlp" reads (M, K, N, r) as tokens M, hidden H = K, intermediate I = N, rank r of each
projection; its gate and up projections are LoRA-linear launches at (M, H, I, r) (reported as
"lora_linear"), so only the down projection's kernels are listed. "linear_cross_entropy" reads them as
tokens M, hidden K, vocabulary N (r unused: the head's GEMMs are torch's); it lists the row kernel of one
chunk, forward (loss) and backward (loss and dz), at the chunk the op uses on a GPU with ``num_sms`` SMs.
"lora_grouped_linear" reads them as tokens M, hidden K, the q projection's outputs N and rank r of q/k/v, with
k and v at N/4 outputs (grouped-query attention, 4 query heads per key head as Llama-3-8B); its y GEMMs and
g-passes are LoRA-linear launches (reported as "lora_linear"), so only the grouped kernels are listed: the
u-pass (every u_i from one pass over x), the dx kernel (every g_i W_i and D_i ⊙ (du_i A_i) in one tile), the
dA pass (every dA_i from one pass over x) and its reductions.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from .linear_cross_entropy import plan_xent_rows
from .lora_gated_mlp import ACT_CODES, plan_down_backward, plan_down_forward
from .lora_grouped_linear import plan_backward as plan_grouped_backward, plan_forward as plan_grouped_forward
from .lora_linear import norm_sources
from .lora_linear_plan import PROGRAMS_PER_SM, Launch, dot_meta

Tensor = torch.Tensor
OPS = ("lora_gated_mlp", "lora_grouped_linear", "linear_cross_entropy")
_CHUNK_ELEMENTS = 2**23  # lowcost.ops.linear_cross_entropy.CHUNK_ELEMENTS (ops sit above kernels)
_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _report_precision(launches: list, dtype: torch.dtype, tf32: bool = False) -> list:
    """DOT_PRECISION as a GPU launch sets it (fp32: TF32 only when torch allows it), not the interpreter's."""
    for launch in launches:
        if "DOT_PRECISION" in launch.constexprs:
            launch.constexprs["DOT_PRECISION"] = dot_meta(dtype, allow_tf32=tf32)["DOT_PRECISION"]
            launch.constexprs["UPCAST"] = False
    return launches


def gated_mlp_launches(M: int, H: int, inter: int, r: int, dtype: torch.dtype, p: float, num_sms: int,
                       act: str = "silu", tf32: bool = False) -> list[Launch]:
    """The down projection's launches of one fused MLP forward + backward (dA_d needed)."""
    gate, up = torch.empty((M, inter), dtype=dtype), torch.empty((M, inter), dtype=dtype)
    w, a = torch.empty((H, inter), dtype=dtype), torch.empty((r, inter), dtype=dtype)
    b = torch.empty((H, r), dtype=dtype)
    fwd, _, u = plan_down_forward(gate, up, w, a, b, 2.0, p, 1, act)
    bwd, _ = plan_down_backward(torch.empty((M, H), dtype=dtype), gate, up, w, a, torch.empty_like(u), p, 1, act,
                                True, num_sms)
    return _report_precision(fwd + bwd, dtype, tf32)


class _Projection:
    """A placeholder projection for planning (the fields ``plan_forward`` / ``plan_backward`` read)."""
    def __init__(self, weight, lora_a, lora_b, scale, dropout, seed):
        self.weight, self.lora_a, self.lora_b, self.bias = weight, lora_a, lora_b, None
        self.scale, self.dropout, self.seed = scale, dropout, seed


def grouped_launches(M: int, K: int, outs, r: int, dtype: torch.dtype, p: float, num_sms: int,
                     tf32: bool = False, norms: bool = False) -> list[Launch]:
    """The grouped kernels' launches of one forward + backward (dx and every dA needed) of len(outs)
    projections with N_i = outs[i] outputs, rank r each, dropout p each. ``norms``: also the dA pass with the
    input an RMSNorm's output rebuilt in its loads, per (norm input dtype, form) (lora_linear.norm_sources)."""
    x = torch.empty((M, K), dtype=dtype)
    projections = [_Projection(torch.empty((n, K), dtype=dtype), torch.empty((r, K), dtype=dtype),
                               torch.empty((n, r), dtype=dtype), 2.0, p, 1 + i) for i, n in enumerate(outs)]
    fwd, ys, us = plan_grouped_forward(x, projections, num_sms)
    grads = [torch.empty_like(y) for y in ys]
    bwd, _ = plan_grouped_backward(grads, x, projections, us, (True, True, True, False), num_sms)
    grouped = [launch for launch in fwd + bwd if launch.label.startswith(("grouped", "reduce_grouped"))]
    for source, form in norm_sources(dtype) if norms else ():
        norm = (torch.empty(M), torch.empty(K, dtype=source), form)
        bwd, _ = plan_grouped_backward(grads, torch.empty((M, K), dtype=source), projections, us,
                                       (True, True, True, False), num_sms, norm)
        for launch in bwd:
            if launch.label == "grouped_da":
                launch.label = f"grouped_da (rms {form}, {_NAMES[source]} norm input)"
                grouped.append(launch)
    return _report_precision(grouped, dtype, tf32)


def gpu_chunk(M: int, vocab: int, num_sms: int) -> int:
    """The op's default chunk on the Triton backend with ``num_sms`` SMs (lowcost.ops.linear_cross_entropy)."""
    return max(1, min(M, max(PROGRAMS_PER_SM * num_sms, _CHUNK_ELEMENTS // max(vocab, 1))))


def xent_launches(C: int, vocab: int, dtype: torch.dtype, softcap: float = 0.0) -> list[Launch]:
    """The row kernel on a (C, vocab) chunk of logits: forward (loss only), then backward (loss and dz)."""
    z, labels = torch.empty((C, vocab), dtype=dtype), torch.empty(C, dtype=torch.int64)
    loss = torch.empty(C, dtype=torch.float32)
    return [plan_xent_rows(z, labels, None, loss, -100, 0.0, softcap),
            plan_xent_rows(z, labels, torch.empty(C, dtype=torch.float32), loss, -100, 0.0, softcap)]


def report_launches(op: str, M: int, K: int, N: int, r: int, dtype: torch.dtype, p: float, num_sms: int) -> list:
    """The launches of ``op`` at the shape (see the module doc for how each op reads M, K, N, r)."""
    if op == "lora_gated_mlp":
        return gated_mlp_launches(M, K, N, r, dtype, p, num_sms)
    if op == "lora_grouped_linear":
        return grouped_launches(M, K, (N, max(1, N // 4), max(1, N // 4)), r, dtype, p, num_sms, norms=True)
    if op == "linear_cross_entropy":
        return xent_launches(gpu_chunk(M, N, num_sms), N, dtype)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


# ----------------------------------------------------------------------------------------- AOT coverage
MLP_RANKS = (16, 32, 64, 128)  # one per R_PAD of the u- and dA-passes (the GEMMs step r by 16)
BENCH_MLP = (8192, 4096, 14336, 16)
BENCH_LOSS = (8192, 4096, 128256)
BENCH_GROUPED = (8192, 4096, 4096, 16)   # Llama-3-8B's q/k/v: q 4096 outputs, k and v 1024


def _label(launch: Launch, dtype: torch.dtype, extra: str) -> Launch:
    meta = " ".join(f"{k}={v}" for k, v in launch.constexprs.items() if not k.startswith("BLOCK"))
    launch.label = f"{launch.label} x={_NAMES[dtype]} {launch.config_text()} {meta} {extra}".rstrip()
    return launch


def _mlp_coverage() -> Iterator[Launch]:
    """Per dtype (fp32 with and without TF32): SiLU at every R_PAD, dropout on/off; bf16 with every
    activation at r=16; bf16 at an odd intermediate size (unaligned rows, the mask's one-word path)."""
    for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)):
        for r, p in itertools.product(MLP_RANKS, (0.0, 0.1)):
            for launch in gated_mlp_launches(40, 48, 128, r, dtype, p, 132, "silu", tf32):
                if r == MLP_RANKS[0] or "R_PAD" in launch.constexprs:  # the GEMMs do not depend on R_PAD
                    yield _label(launch, dtype, "")
    for act, p in itertools.product([a for a in ACT_CODES if a != "silu"], (0.0, 0.1)):
        yield from (_label(launch, torch.bfloat16, "") for launch in
                    gated_mlp_launches(40, 48, 128, 16, torch.bfloat16, p, 132, act))
    yield from (_label(launch, torch.bfloat16, "(I=63 r=5)") for launch in
                gated_mlp_launches(40, 48, 63, 5, torch.bfloat16, 0.1, 132))
    yield from (_label(launch, torch.bfloat16, "(M=1 r=1)") for launch in    # constants for the JIT
                gated_mlp_launches(1, 48, 128, 1, torch.bfloat16, 0.1, 132))


def _grouped_coverage() -> Iterator[Launch]:
    """Per dtype (fp32 with and without TF32): three projections at every R_PAD, dropout on/off; bf16 with one
    and two projections (the constexpr P); bf16 at an odd K (unaligned rows, the mask's one-word path) and at
    M = 1, r = 1 (constants for the JIT). Each also with the dA pass's in-kernel RMSNorm rebuilds (NORM)."""
    for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)):
        for r, p in itertools.product(MLP_RANKS, (0.0, 0.1)):
            for launch in grouped_launches(40, 48, (64, 16, 16), r, dtype, p, 132, tf32, norms=True):
                if r == MLP_RANKS[0] or "R_PAD" in launch.constexprs:  # dx and the reductions do not read R_PAD
                    yield _label(launch, dtype, "")
    for count, p in itertools.product((1, 2), (0.0, 0.1)):
        yield from (_label(launch, torch.bfloat16, "") for launch in
                    grouped_launches(40, 48, (64, 64)[:count], 16, torch.bfloat16, p, 132, norms=True))
    yield from (_label(launch, torch.bfloat16, "(K=63 r=5)") for launch in
                grouped_launches(40, 63, (64, 16, 16), 5, torch.bfloat16, 0.1, 132, norms=True))
    yield from (_label(launch, torch.bfloat16, "(M=1 r=1)") for launch in
                grouped_launches(1, 48, (64, 16, 16), 1, torch.bfloat16, 0.1, 132, norms=True))


def _xent_coverage() -> Iterator[Launch]:
    for dtype, softcap in itertools.product((torch.float32, torch.float16, torch.bfloat16), (0.0, 30.0)):
        yield from (_label(launch, dtype, "") for launch in xent_launches(8, 64, dtype, softcap))


def aot_launches(num_sms: int = 132) -> Iterator[Launch]:
    """Every configuration the two ops' launchers can launch, plus their launches at the benchmark shapes
    (bf16: Llama-3-8B's MLP at 8192 tokens, p = 0 and 0.05; the loss at hidden 4096, vocab 128256). A
    launch whose label (kernel, dtype, tile, constexprs) repeats an earlier one is compiled once."""
    seen = set()
    for launch in itertools.chain(_mlp_coverage(), _grouped_coverage(), _xent_coverage(), _bench_launches(num_sms)):
        if launch.label not in seen:
            seen.add(launch.label)
            yield launch


def _bench_launches(num_sms: int) -> Iterator[Launch]:
    for p in (0.0, 0.05):
        yield from (_label(launch, torch.bfloat16, f"bench M,H,I,r={BENCH_MLP}") for launch in
                    gated_mlp_launches(*BENCH_MLP, torch.bfloat16, p, num_sms))
    for p in (0.0, 0.05):
        yield from (_label(launch, torch.bfloat16, f"bench M,K,N,r={BENCH_GROUPED}") for launch in
                    report_launches("lora_grouped_linear", *BENCH_GROUPED, torch.bfloat16, p, num_sms))
    M, K, V = BENCH_LOSS
    yield from (_label(launch, torch.bfloat16, f"bench vocab={V} chunk={gpu_chunk(M, V, num_sms)}") for launch in
                xent_launches(gpu_chunk(M, V, num_sms), V, torch.bfloat16))

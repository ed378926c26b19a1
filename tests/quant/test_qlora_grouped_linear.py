"""Grouped LoRA projections on quantized frozen weights (``lowcost.ops.qlora_grouped_linear``, issue #13), CPU.

Against float64 autograd of P ``lora_linear`` calls on the DEQUANTIZED weights (same seeds, so the same masks):
output and every gradient (dx, dA_i, dB_i, db_i), formats nf4 (K = 100, not a multiple of the 64-block), int8,
q8_0, q4_k, M = 0 and 1, r = 5, GQA-like N_k = N_v < N_q, on the torch backend, on the cuda composition (the
dequantizing GEMMs stood in for on CPU: ``cuda_here`` of test_qlora_gated_mlp_cuda) and on Triton (under the
interpreter; fp32 and fp16, plus dropout on some projections only; bf16 arithmetic is broken under the
interpreter); the masks equal P separate ``qlora_linear`` calls (torch and triton); the saved set; opcheck; bad
input; the "qkv" fusion of a tiny Llama quantized with ``lowcost.quantize`` equals the unfused model, loss and
every adapter gradient, on the default backend and on Triton.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lowcost
from lowcost._extension import has_kernel
from lowcost.ops.backend import triton_usable
from lowcost.ops.qlora_grouped_linear import _qgrouped_backward_op, _qgrouped_op
from lowcost.quant import quantize
from lowcost.reference.quant import dequantize_packed
from helpers import assert_close_to_reference
from quant_cases import k_for, make_quantized
from test_qlora_gated_mlp_cuda import cuda_here  # noqa: F401  (fixture)
from tiny_models import llama, randomize_adapters

SCALES, SEEDS = (1.5, 0.5, 2.0), (11, 22, 33)
needs_triton = pytest.mark.skipif(not triton_usable(torch.device("cpu")),
                                  reason="triton not installed (the kernels run under TRITON_INTERPRET=1 here)")
# scheme, M, K wanted, N per projection (q, k, v: GQA-like k/v narrower), ranks (r = 5, not a multiple of 16)
CASES = [("nf4", 7, 100, (12, 6, 6), (5, 3, 4), 0.1),
         ("nf4", 1, 100, (12, 6, 6), (5, 5, 5), 0.0),
         ("int8", 0, 40, (10, 4, 4), (5, 3, 4), 0.1),
         ("q8_0", 6, 64, (12, 6, 6), (5, 3, 4), 0.0),
         ("q4_k", 3, 256, (9, 5, 5), (5, 2, 3), 0.1)]
IDS = [f"{c[0]}-M{c[1]}-p{c[5]}" for c in CASES]
# dropout on q and v only: their masked terms go through the x-pass, k's low-rank term is inlined in the dgrad
MIXED = ("nf4", 5, 100, (12, 6, 6), (5, 3, 4), (0.2, 0.0, 0.1))


def _dropouts(dropout, P):
    return list(dropout) if isinstance(dropout, (list, tuple)) else [dropout] * P


def make(scheme, M, K, ns, ranks, dtype=torch.float32):
    K = k_for(scheme, K)
    gen = torch.Generator().manual_seed(0)
    weights = [make_quantized(scheme, n, K, seed=i, dtype=dtype) for i, n in enumerate(ns)]
    x = torch.randn(M, K, generator=gen).to(dtype)
    lora_as = [(torch.randn(r, K, generator=gen) * 0.3).to(dtype) for r in ranks]
    lora_bs = [(torch.randn(n, r, generator=gen) * 0.3).to(dtype) for n, r in zip(ns, ranks)]
    biases = [torch.randn(ns[0], generator=gen).to(dtype), None, torch.randn(ns[2], generator=gen).to(dtype)]
    grads = [torch.randn(M, n, generator=gen).to(dtype) for n in ns]
    return x, weights, lora_as, lora_bs, biases, grads


def run(x, weights, lora_as, lora_bs, biases, grads, dropout, backend):
    leaves = [t.clone().requires_grad_() for t in [x, *lora_as, *lora_bs, *[b for b in biases if b is not None]]]
    P = len(weights)
    it = iter(leaves[1 + 2 * P:])
    bs = [next(it) if b is not None else None for b in biases]
    ys = lowcost.ops.lora_grouped_linear(leaves[0], weights, leaves[1:1 + P], leaves[1 + P:1 + 2 * P], SCALES[:P],
                                         biases=bs, dropouts=_dropouts(dropout, P), seeds=SEEDS[:P], backend=backend)
    sum((y * g).sum() for y, g in zip(ys, grads)).backward()
    return ys, [t.grad for t in leaves]


def truth64(x, weights, lora_as, lora_bs, biases, grads, dropout):
    """P separate float64 ``lora_linear`` calls on W decoded to x's dtype, then widened (what every backend
    multiplies), with the same seeds."""
    leaves = [t.double().requires_grad_() for t in [x, *lora_as, *lora_bs, *[b for b in biases if b is not None]]]
    P = len(weights)
    it = iter(leaves[1 + 2 * P:])
    bs = [next(it) if b is not None else None for b in biases]
    dense = [dequantize_packed(w.scheme, w.packed, w.shape[1], w.block_size, dtype=x.dtype).double()
             for w in weights]
    ys = [lowcost.ops.lora_linear(leaves[0], w, a, b, s, bias=bias, dropout=p, seed=seed, backend="torch")
          for w, a, b, s, bias, p, seed in zip(dense, leaves[1:1 + P], leaves[1 + P:1 + 2 * P], SCALES, bs,
                                               _dropouts(dropout, P), SEEDS)]
    sum((y * g.double()).sum() for y, g in zip(ys, grads)).backward()
    return ys, [t.grad for t in leaves]


def check(case, backend, dtype=torch.float32):
    scheme, M, K, ns, ranks, dropout = case
    data = make(scheme, M, K, ns, ranks, dtype)
    ys, grads = run(*data, dropout, backend)
    ys64, grads64 = truth64(*data, dropout)
    for i, (y, y64) in enumerate(zip(ys, ys64)):
        assert y.dtype == dtype and y.shape == (M, ns[i])
        assert_close_to_reference(f"{scheme} y_{i}", y, y64, dtype)
    names = ["dx"] + [f"dA_{i}" for i in range(3)] + [f"dB_{i}" for i in range(3)] + ["db_0", "db_2"]
    for name, g, g64 in zip(names, grads, grads64):
        assert g is not None, name
        assert_close_to_reference(f"{scheme} {name}", g, g64, dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_backend_matches_float64(case):
    check(case, "torch")


@pytest.mark.skipif(not has_kernel("lora_down", "CPU"), reason="lowcost._C is not built (pip install -e .)")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_composition_matches_float64(cuda_here, case):  # noqa: F811
    """Every projection's base GEMM went through the dequantizing GEMMs: P forward, P dgrad (M > 0)."""
    check(case, "cuda")
    scheme, M = case[0], case[1]
    assert cuda_here.calls == [("dequant_gemm", scheme)] * 3 + [("dequant_gemm_dgrad", scheme)] * 3


def test_low_precision_torch():
    check(("nf4", 9, 100, (12, 6, 6), (5, 3, 4), 0.1), "torch", torch.bfloat16)


def _launch_labels(monkeypatch) -> list[str]:
    """The labels of the Triton launches that run from now on (records, then runs each)."""
    from lowcost.kernels.lora_linear_plan import Launch
    labels, run_launch = [], Launch.run
    monkeypatch.setattr(Launch, "run", lambda self: labels.append(self.label) or run_launch(self))
    return labels


@needs_triton
@pytest.mark.parametrize("case", CASES + [MIXED], ids=IDS + ["nf4-M5-mixed"])
def test_triton_matches_float64(case, monkeypatch):
    """Output and every gradient; with M > 0 the launches are the grouped u pass, one dequantizing y GEMM and
    one dequantizing dgrad per projection (the first stores dx, the others accumulate), an x-pass per projection
    with dropout and the grouped dA pass for the others; M = 0 launches nothing (the torch path)."""
    labels = _launch_labels(monkeypatch)
    check(case, "triton")
    M, dropouts = case[1], _dropouts(case[5], 3)
    if M == 0:
        assert labels == []
        return
    assert labels.count("grouped_u") == 1 and labels.count("qfwd_y") == 3 and labels.count("qbwd_dx") == 3
    assert labels.count("bwd_x") == sum(p > 0 for p in dropouts)
    assert labels.count("grouped_da") == (1 if min(dropouts) == 0 else 0)
    assert "grouped_dx" not in labels and "fwd_y" not in labels        # no dense W anywhere


@needs_triton
def test_triton_fp16():
    check(("nf4", 9, 100, (12, 6, 6), (5, 3, 4), (0.1, 0.0, 0.2)), "triton", torch.float16)
    check(("q4_k", 2, 256, (9, 5, 5), (5, 2, 3), 0.0), "triton", torch.float16)


@needs_triton
def test_triton_masks_and_gradients_equal_separate_qlora_linear_calls():
    """Same seeds, same masks: the grouped Triton op against P ``qlora_linear(backend='triton')`` calls, output
    and gradients (summed dx); a differing mask would move them by O(1), far outside the tolerance, which only
    covers the different order of the fp32 sums."""
    data = make("nf4", 9, 100, (12, 6, 6), (5, 3, 4))
    x, weights, lora_as, lora_bs, biases, grads = data
    ys, grads_g = run(*data, 0.3, "triton")
    leaves = [t.clone().requires_grad_() for t in [x, *lora_as]]
    for i in range(3):
        y = lowcost.ops.qlora_linear(leaves[0], weights[i], leaves[1 + i], lora_bs[i], SCALES[i], bias=biases[i],
                                     dropout=0.3, seed=SEEDS[i], backend="triton")
        torch.testing.assert_close(ys[i], y, rtol=1e-5, atol=1e-5)
        (y * grads[i]).sum().backward()
    for name, g, g_sep in zip(["dx", "dA_0", "dA_1", "dA_2"], grads_g, [t.grad for t in leaves]):
        torch.testing.assert_close(g, g_sep, rtol=1e-5, atol=1e-5, msg=name)


def test_masks_equal_separate_qlora_linear_calls():
    x, weights, lora_as, lora_bs, biases, grads = make("nf4", 9, 100, (12, 6, 6), (5, 3, 4))
    ys = lowcost.ops.lora_grouped_linear(x, weights, lora_as, lora_bs, SCALES, biases=biases, dropouts=[0.3] * 3,
                                         seeds=SEEDS, backend="torch")
    for i in range(3):
        y = lowcost.ops.qlora_linear(x, weights[i], lora_as[i], lora_bs[i], SCALES[i], bias=biases[i], dropout=0.3,
                                     seed=SEEDS[i], backend="torch")
        torch.testing.assert_close(ys[i], y, rtol=1e-5, atol=1e-6)


def test_saves_x_once_the_u_the_seeds_and_the_stored_tensors_only():
    x, weights, lora_as, lora_bs, biases, grads = make("nf4", 16, 64, (12, 6, 6), (5, 3, 4))
    x = x.requires_grad_()
    lora_as = [a.requires_grad_() for a in lora_as]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = lowcost.ops.lora_grouped_linear(x, weights, lora_as, lora_bs, SCALES, dropouts=[0.1] * 3, seeds=SEEDS,
                                             backend="torch")
    known = {p.data_ptr() for w in weights for p in w.packed} | {t.data_ptr() for t in lora_as + lora_bs}
    activations = [s for s in saved if s.data_ptr() not in known]
    assert sum(s.data_ptr() == x.data_ptr() for s in activations) == 1                     # x once
    assert sorted(tuple(s.shape) for s in activations if s.data_ptr() != x.data_ptr()) == \
        sorted([(16, 5), (16, 3), (16, 4), (3,)])                                         # the u_i, the seeds
    assert not any(s.shape[-1] == 64 and s.dim() == 2 and s.shape[0] in (12, 6) and s.is_floating_point()
                   for s in saved)                                                        # no dequantized W
    sum(y.sum() for y in ys).backward()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_opcheck(backend):
    x, weights, lora_as, lora_bs, biases, grads = make("q8_0", 5, 64, (8, 4, 4), (5, 3, 4))
    packed = [t for w in weights for t in w.packed]
    args = (x.requires_grad_(), packed, [len(w.packed) for w in weights], ",".join(w.scheme for w in weights),
            [w.block_size for w in weights], [a.requires_grad_() for a in lora_as],
            [b.requires_grad_() for b in lora_bs], [biases[0], biases[2]], [True, False, True], list(SCALES),
            [0.2] * 3, torch.tensor(SEEDS), backend)
    result = torch.library.opcheck(_qgrouped_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    _, us = _qgrouped_op(*args)
    bargs = (grads, x.detach(), packed, args[2], args[3], args[4], [a.detach() for a in lora_as],
             [b.detach() for b in lora_bs], us, [True, False, True], list(SCALES), [0.2] * 3, torch.tensor(SEEDS),
             [True] * 4, backend)
    result = torch.library.opcheck(_qgrouped_backward_op, bargs, test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_bad_input():
    x, weights, lora_as, lora_bs, biases, _ = make("nf4", 3, 64, (8, 4, 4), (5, 3, 4))
    mixed = [weights[0], weights[1].dequantize(), weights[2]]
    with pytest.raises(TypeError, match="projection 1: weight must be a QuantizedWeight"):
        lowcost.ops.lora_grouped_linear(x, mixed, lora_as, lora_bs, SCALES)
    with pytest.raises(ValueError, match="backend='triton' groups at most 3 projections, got 4"):
        lowcost.ops.lora_grouped_linear(x, weights + weights[:1], lora_as + lora_as[:1], lora_bs + lora_bs[:1],
                                        SCALES + SCALES[:1], backend="triton")
    with pytest.raises(ValueError, match="projection 2: lora_b must have shape"):
        lowcost.ops.lora_grouped_linear(x, weights, lora_as, lora_bs[:2] + [lora_bs[1]], SCALES)
    with pytest.raises(ValueError, match="projection 0: x must have last dimension K=64"):
        lowcost.ops.lora_grouped_linear(x[:, :32], weights, lora_as, lora_bs, SCALES)
    with pytest.raises(ValueError, match="scales must hold 3 entries"):
        lowcost.ops.lora_grouped_linear(x, weights, lora_as, lora_bs, SCALES[:2])


# ----------------------------------------------------------------------------------------------- model level
def _step(model, ids, seed=5):
    torch.manual_seed(seed)   # the LoRA dropout seeds: drawn per projection in q, k, v order on both paths
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scheme, backend", [("nf4", None), ("int8", None),
                                             pytest.param("nf4", "triton", marks=needs_triton)])
def test_tiny_llama_quantized_takes_the_qkv_fusion(scheme, backend):
    base = llama()
    base.requires_grad_(False)
    quantize(base, scheme, targets=r".*proj")
    models, reports = [], []
    for fused in (("qkv",), ()):
        model = copy.deepcopy(base).train()
        reports.append(lowcost.apply(model, lora=lowcost.LoRAConfig(r=5, alpha=10, dropout=0.1, backend=backend,
                                                                    targets=["q_proj", "k_proj", "v_proj"]),
                                     fused=fused))
        randomize_adapters({n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}, seed=1)
        models.append(model)
    assert reports[0].fusion.taken and not [f for f in reports[0].fusion.refused if f.module.endswith("self_attn")]
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    (loss_f, grads_f), (loss_u, grads_u) = _step(models[0], ids), _step(models[1], ids)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_u.keys() and len(grads_f) > 0
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gguf_model_with_mixed_q_k_v_blocks_takes_the_qkv_fusion(tmp_path):
    """A GGUF loaded with quantize="gguf" keeps the file's blocks: q in Q4_0, k in Q4_1 and v in Q8_0 (tests/quant/
    gguf_files.ROLES), one grouped op over three formats. Loss and every adapter gradient equal the unfused
    model's, with dropout 0.1 (the same masks: seeds drawn in q, k, v order on both paths)."""
    pytest.importorskip("gguf", reason="the tiny GGUF file is written with the gguf package")
    from gguf_files import ROLES, write_tiny_llama
    assert (ROLES["attn_q"], ROLES["attn_k"], ROLES["attn_v"]) == ("q4_0", "q4_1", "q8_0")
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    base = lowcost.load_pretrained(path, quantize="gguf", cache_dir=tmp_path / "cache", verbose=False)
    attn = base.model.layers[0].self_attn
    assert [attn.q_proj.weight.scheme, attn.k_proj.weight.scheme, attn.v_proj.weight.scheme] == \
        ["q4_0", "q4_1", "q8_0"]
    models, reports = [], []
    for fused in (("qkv",), ()):
        model = copy.deepcopy(base).train()
        reports.append(lowcost.apply(model, lora=lowcost.LoRAConfig(r=5, alpha=10, dropout=0.1,
                                                                    targets=["q_proj", "k_proj", "v_proj"]),
                                     fused=fused))
        randomize_adapters({n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}, seed=1)
        models.append(model)
    taken = [f.module for f in reports[0].fusion.taken]
    assert any(m.endswith("layers.0.self_attn") for m in taken), reports[0].fusion
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    (loss_f, grads_f), (loss_u, grads_u) = _step(models[0], ids), _step(models[1], ids)
    from lowcost.patch.fuse import STATE_ATTR
    groups = models[0].__dict__[STATE_ATTR].groups
    assert groups and all(g.stats["handed"] == 2 and g.stats["fallback"] == 0 for g in groups), \
        [g.stats for g in groups]
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_u.keys() and len(grads_f) > 0
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)


def test_default_backend_on_a_cuda_device_takes_the_quantized_qkv_fusion(monkeypatch):
    """On CUDA with backend=None the grouped op runs Triton's dequantizing GEMMs, as the unfused layers do, so the
    fusion is taken (it was refused while the grouped op had no Triton path). No GPU here: the weights report a
    CUDA device and every backend reports that it can run."""
    import lowcost.patch.fuse_qkv as fuse_qkv
    from lowcost.reference.quant import QuantizedWeight
    model = llama()
    model.requires_grad_(False)
    quantize(model, "nf4", targets=r".*proj")
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4, targets=["q_proj", "k_proj", "v_proj"]), fused=None)
    monkeypatch.setattr(QuantizedWeight, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(fuse_qkv, "unavailable_reason", lambda backend, device, rank: None)
    monkeypatch.delenv("LOWCOST_BACKEND", raising=False)
    taken, refused = fuse_qkv.plan_grouped_fusions(model)
    assert "model.layers.0.self_attn" in taken, refused


def test_row_shardable_weights_hand_the_grouped_outputs_back():
    """Under FSDP2 the quantized weights are row-shardable: ``packed`` returns fresh bit-cast views at every call.
    The group's state must key on the stored tensors themselves, or every member misses its pending output and runs
    its own op, drawing its dropout seed a second time (masks and the RNG stream then differ from one process's)."""
    from lowcost.patch.fuse import STATE_ATTR
    model = llama()
    model.requires_grad_(False)
    quantize(model, "nf4", targets=r".*proj")
    for module in model.modules():
        if hasattr(module, "make_row_shardable"):
            module.make_row_shardable()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, alpha=4, dropout=0.1, targets=["q_proj", "k_proj", "v_proj"]),
                  fused=("qkv",))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()
    groups = model.__dict__[STATE_ATTR].groups
    assert groups and all(g.stats["handed"] == 2 and g.stats["fallback"] == 0 for g in groups), \
        [g.stats for g in groups]

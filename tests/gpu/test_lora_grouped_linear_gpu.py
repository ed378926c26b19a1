"""GPU checks of the grouped LoRA projections on CUDA tensors, every backend, and of the ``cuda`` backend in
particular (issue #12: the LoRA-linear CUDA ops per projection into one dx accumulator), and of the "qkv"
fusion on that backend.

Marked ``gpu``: skipped with a reason on machines without CUDA (conftest). Run by benchmarks/device/run.sh.
"""
from __future__ import annotations

import pytest
import torch

import lowcost
from lowcost.ops.backend import cuda_kernels_usable
from helpers import assert_close_to_reference, gpu_backends

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _cuda_backend_or_skip():
    if not torch.cuda.is_available() or not cuda_kernels_usable(CUDA):
        pytest.skip("the cuda backend's kernels are not built or no GPU")


def make_inputs(M, K, outs, ranks, dtype, adapter_dtype=None, biases=(True, False, True), seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt).to(CUDA)

    d = {"x": rand(M, K), "w": [], "a": [], "b": [], "bias": [], "g": []}
    for n, r, has_bias in zip(outs, ranks, biases):
        d["w"].append(rand(n, K, std=K ** -0.5))
        d["a"].append(rand(r, K, std=K ** -0.5, dt=adapter_dtype or dtype))
        d["b"].append(rand(n, r, std=r ** -0.5, dt=adapter_dtype or dtype))
        d["bias"].append(rand(n) if has_bias else None)
        d["g"].append(rand(M, n))
    return d


def run(d, backend, dropouts, seeds, scales=(1.5, 0.5, 2.0, 1.0)):
    """(ys, {gradient name: tensor}) of one forward and backward; ``d`` may be on any device and dtype."""
    x = d["x"].detach().clone().requires_grad_()
    leaves = {key: [t.detach().clone().requires_grad_() if t is not None else None for t in d[key]]
              for key in ("a", "b", "bias")}
    ys = lowcost.ops.lora_grouped_linear(x, d["w"], leaves["a"], leaves["b"], scales[:len(d["w"])], leaves["bias"],
                                         dropouts, seeds, backend=backend)
    torch.autograd.backward(ys, [g.to(y.dtype) for y, g in zip(ys, d["g"])])
    grads = {"x": x.grad}
    for key, ts in leaves.items():
        grads.update({f"{key}{i}": t.grad for i, t in enumerate(ts) if t is not None})
    return [y.detach() for y in ys], grads


def truth(d, dropouts, seeds):
    cpu64 = {k: ([t.cpu().double() if t is not None else None for t in v] if isinstance(v, list) else
                 v.cpu().double()) for k, v in d.items()}
    return run(cpu64, "torch", dropouts, seeds)


def check(d, backend, dropouts, seeds, dtype):
    ys, grads = run(d, backend, dropouts, seeds)
    ys64, grads64 = truth(d, dropouts, seeds)
    for i, (y, y64) in enumerate(zip(ys, ys64)):
        assert_close_to_reference(f"{backend} y{i}", y.cpu(), y64, dtype)
    for name, g in grads64.items():
        assert_close_to_reference(f"{backend} d{name}", grads[name].cpu(), g, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32), (torch.float16, None)])
@pytest.mark.parametrize("M,K,outs,ranks", [(0, 64, (64, 32, 32), (4, 4, 4)), (1, 256, (256, 64, 64), (16, 5, 17)),
                                            (129, 200, (200, 40, 40), (7, 16, 70)),
                                            (1000, 512, (512, 128, 128), (16, 16, 16))])
def test_backend_matches_float64(backend, dtype, adapter_dtype, M, K, outs, ranks):
    torch.backends.cuda.matmul.allow_tf32 = False
    d = make_inputs(M, K, outs, ranks, dtype, adapter_dtype, seed=M)
    check(d, backend, (0.1, 0.0, 0.2), (11, 22, 2**40 + 3), dtype)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_cuda_backend_other_group_sizes(count):
    """P = 1, 2 (gate/up) and 4 (beyond the Triton kernels' three slots) on the cuda backend."""
    _cuda_backend_or_skip()
    outs, ranks = (333, 77, 77, 129)[:count], (16, 5, 17, 8)[:count]
    d = make_inputs(257, 136, outs, ranks, torch.bfloat16, biases=(False, True, False, True)[:count], seed=count)
    ys, grads = run(d, "cuda", (0.1,) * count, tuple(range(1, count + 1)))
    ys64, grads64 = truth(d, (0.1,) * count, tuple(range(1, count + 1)))
    for y, y64 in zip(ys, ys64):
        assert_close_to_reference("y", y.cpu(), y64, torch.bfloat16)
    for name, g in grads64.items():
        assert_close_to_reference(f"d{name}", grads[name].cpu(), g, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,outs,ranks", [(1, 256, (256, 64, 64), (16, 5, 17)),
                                            (1000, 512, (512, 128, 128), (16, 16, 40))])
def test_cuda_backend_stacked_path_matches_float64(dtype, M, K, outs, ranks):
    """No dropout: one lora_down and one lora_dx_da over the stacked adapters (Σr = 38 / 72: one and two rank
    chunks)."""
    _cuda_backend_or_skip()
    torch.backends.cuda.matmul.allow_tf32 = False
    check(make_inputs(M, K, outs, ranks, dtype, seed=M + 1), "cuda", (0.0, 0.0, 0.0), (1, 2, 3), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backend_bitwise_reproducible(dtype):
    """Two identical fwd+bwd runs: bitwise equal outputs and gradients (the LoRA ops sum their split reductions
    in a fixed order; dx adds the projections' terms in a fixed order)."""
    _cuda_backend_or_skip()
    d = make_inputs(4096, 1024, (1024, 256, 256), (16, 16, 16), dtype, seed=3)
    first = run(d, "cuda", (0.1,) * 3, (5, 6, 7))
    second = run(d, "cuda", (0.1,) * 3, (5, 6, 7))
    for y0, y1 in zip(first[0], second[0]):
        assert torch.equal(y0, y1)
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d{name} differs between two identical runs"


def test_cuda_backend_drops_the_unfused_elements():
    """fp32: the grouped op on cuda against three lora_linear(backend='cuda') calls with the same seeds, within
    fp32 rounding (a mask that differs in one element is O(1) off)."""
    _cuda_backend_or_skip()
    torch.backends.cuda.matmul.allow_tf32 = False
    d = make_inputs(257, 96, (96, 32, 32), (8, 8, 8), torch.float32, seed=9)
    seeds, dropouts = (2**33 + 1, 5, 77), (0.3, 0.2, 0.25)
    ys, grads = run(d, "cuda", dropouts, seeds, scales=(2.0,) * 3)
    x = d["x"].detach().clone().requires_grad_()
    a = [t.detach().clone().requires_grad_() for t in d["a"]]
    ys_ref = [lowcost.lora_linear(x, w, ai, b, 2.0, bias, p, s, backend="cuda")
              for w, ai, b, bias, p, s in zip(d["w"], a, d["b"], d["bias"], dropouts, seeds)]
    torch.autograd.backward(ys_ref, d["g"])
    for y, y_ref in zip(ys, ys_ref):
        assert torch.equal(y, y_ref.detach())
    assert_close_to_reference("dx", grads["x"], x.grad.double(), torch.float32)
    for i, ai in enumerate(a):
        assert_close_to_reference(f"dA{i}", grads[f"a{i}"], ai.grad.double(), torch.float32)


def test_qkv_fusion_takes_cuda_and_matches_the_unfused_cuda_model():
    _cuda_backend_or_skip()
    from tiny_models import _ids, llama, randomize_adapters
    from lowcost.patch import lora_layers

    def step(fused):
        model = llama().to(CUDA)
        report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1, backend="cuda"),
                               fused=fused)
        randomize_adapters(lora_layers(model))
        torch.manual_seed(7)
        ids = _ids(batch=1).to(CUDA)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return report, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    torch.backends.cuda.matmul.allow_tf32 = False
    report, loss, grads = step(("qkv",))
    assert {f.kind for f in report.fusion.taken} == {"qkv"}, str(report.fusion)
    _, loss_ref, grads_ref = step(None)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for name, ref in grads_ref.items():
        err = float((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err <= 1e-5, (name, err)

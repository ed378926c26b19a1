"""GPU checks of the fused gated MLP on CUDA tensors, every backend, and of the CUDA kernels behind its ``cuda``
backend (issue #12: ``gated_act_mul`` / ``gated_act_mul_backward`` between the LoRA-linear CUDA ops).

Marked ``gpu``: skipped with a reason on machines without CUDA (conftest). Run by benchmarks/device/run.sh.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowcost
from lowcost.ops.backend import cuda_kernels_usable
from helpers import assert_close_to_reference, gpu_backends

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}
ADAPTERS = ("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")


def _cuda_backend_or_skip():
    if not torch.cuda.is_available() or not cuda_kernels_usable(CUDA):
        pytest.skip("the cuda backend's kernels are not built or no GPU")


def make_inputs(M, H, inter, ranks, dtype, adapter_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt).to(CUDA)

    out = {"x": rand(M, H), "grad_y": rand(M, H)}
    for role, (n_in, n_out), r in zip(("gate", "up", "down"), ((H, inter), (H, inter), (inter, H)), ranks):
        out[f"w_{role}"] = rand(n_out, n_in, std=n_in ** -0.5)
        out[f"a_{role}"] = rand(r, n_in, std=n_in ** -0.5, dt=adapter_dtype or dtype)
        out[f"b_{role}"] = rand(n_out, r, std=r ** -0.5, dt=adapter_dtype or dtype)
    return out


def run(inputs, backend, act, dropouts, seeds, scales=(1.5, 0.5, 2.0)):
    d = {k: v.detach().clone().requires_grad_(k == "x" or k in ADAPTERS) for k, v in inputs.items()}
    y = lowcost.ops.lora_gated_mlp(d["x"], *[(d[f"w_{r}"], d[f"a_{r}"], d[f"b_{r}"]) for r in ("gate", "up", "down")],
                                   scales=scales, activation=act, dropouts=dropouts, seeds=seeds, backend=backend)
    y.backward(d["grad_y"])
    return y.detach(), {k: d[k].grad for k in ("x",) + ADAPTERS}


def truth(inputs, act, dropouts, seeds):
    cpu64 = {k: v.detach().cpu().double() for k, v in inputs.items()}
    return run(cpu64, "torch", act, dropouts, seeds)


def check(inputs, backend, act, dropouts, seeds, dtype):
    y, grads = run(inputs, backend, act, dropouts, seeds)
    y64, grads64 = truth(inputs, act, dropouts, seeds)
    assert_close_to_reference(f"{backend} y", y.cpu(), y64, dtype)
    for name, g in grads64.items():
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close_to_reference(f"{backend} d{name}", grads[name].cpu(), g, dtype)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32), (torch.float16, None)])
@pytest.mark.parametrize("M,H,inter,ranks", [(0, 64, 96, (4, 4, 4)), (1, 256, 520, (16, 5, 17)),
                                             (129, 200, 333, (7, 16, 70)), (1000, 512, 1408, (16, 16, 16))])
def test_backend_matches_float64(backend, dtype, adapter_dtype, M, H, inter, ranks):
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make_inputs(M, H, inter, ranks, dtype, adapter_dtype, seed=M)
    check(inputs, backend, "silu", (0.1, 0.05, 0.2), (11, 22, 33), dtype)


@pytest.mark.parametrize("act", list(ACTS))
def test_cuda_backend_each_activation(act):
    _cuda_backend_or_skip()
    inputs = make_inputs(300, 136, 451, (16, 8, 20), torch.bfloat16, seed=7)
    check(inputs, "cuda", act, (0.1, 0.1, 0.1), (1, 2, 2**40 + 3), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backend_bitwise_reproducible(dtype):
    """Two identical fwd+bwd runs on the cuda backend: bitwise equal outputs and gradients (the LoRA ops sum
    their split reductions in a fixed order; the elementwise kernels have one writer per element)."""
    _cuda_backend_or_skip()
    inputs = make_inputs(4096, 1024, 2816, (16, 16, 16), dtype, seed=3)
    first = run(inputs, "cuda", "silu", (0.1,) * 3, (5, 6, 7))
    second = run(inputs, "cuda", "silu", (0.1,) * 3, (5, 6, 7))
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"d{name} differs between two identical runs"


def test_cuda_backend_drops_the_unfused_elements():
    """fp32: the cuda backend against the torch backend on the GPU with the same seeds, within fp32 rounding
    (a mask that differs in one element is O(1) off)."""
    _cuda_backend_or_skip()
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make_inputs(257, 96, 200, (8, 8, 8), torch.float32, seed=9)
    y, grads = run(inputs, "cuda", "gelu", (0.3, 0.2, 0.25), (2**33 + 1, 5, 77))
    y_ref, grads_ref = run(inputs, "torch", "gelu", (0.3, 0.2, 0.25), (2**33 + 1, 5, 77))
    assert_close_to_reference("y", y, y_ref.double(), torch.float32)
    for name, g in grads_ref.items():
        assert_close_to_reference(f"d{name}", grads[name], g.double(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,I,strided", [(1, 1, False), (7, 13, True), (4096, 14336, False), (333, 1001, True)])
def test_elementwise_kernels_match_the_cpu_kernels(dtype, M, I, strided):
    """The CUDA kernels of gated_act_mul / gated_act_mul_backward against their C++ CPU twins (the same math,
    csrc/gated_act.h): within an ulp of the device's expf/tanhf/erff, i.e. the dtype's tolerance of float64."""
    _cuda_backend_or_skip()
    gen = torch.Generator().manual_seed(M)

    def rand(scale):
        t = torch.randn(I, M, generator=gen).t() if strided else torch.randn(M, I, generator=gen)
        return (t * scale).to(dtype)

    gate, up, dh = rand(3.0), rand(1.0), rand(1.0)
    for act in ACTS:
        h = torch.ops.lowcost.gated_act_mul(gate.cuda(), up.cuda(), act).cpu()
        d_gate, d_up = (t.cpu() for t in torch.ops.lowcost.gated_act_mul_backward(dh.cuda(), gate.cuda(), up.cuda(),
                                                                                   act))
        h_c = torch.ops.lowcost.gated_act_mul(gate, up, act)
        dg_c, du_c = torch.ops.lowcost.gated_act_mul_backward(dh, gate, up, act)
        for name, got, want in (("h", h, h_c), ("d_gate", d_gate, dg_c), ("d_up", d_up, du_c)):
            assert_close_to_reference(f"{act} {name}", got, want.double(), dtype)

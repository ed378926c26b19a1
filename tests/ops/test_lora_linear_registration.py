"""Dispatcher registration: opcheck, torch.compile(fullgraph=True), what is saved, and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lowcost
from lowcost.ops.lora_linear import _lora_linear_op
from helpers import make_lora_inputs


@pytest.mark.parametrize("dropout,bias", [(0.0, True), (0.2, False)])
def test_opcheck(dropout, bias):
    inputs = make_lora_inputs(7, 20, 12, 3, bias=bias, seed=1)
    for k in ("x", "lora_a", "lora_b", "bias"):
        if inputs[k] is not None:
            inputs[k].requires_grad_()
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], inputs["bias"], 0.5, dropout,
            torch.tensor(3), "torch")
    result = torch.library.opcheck(_lora_linear_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


class TinyAdapted(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = lowcost.LoRALinear.from_linear(nn.Linear(16, 32), r=4, alpha=8, dropout=0.1)
        self.down = lowcost.LoRALinear.from_linear(nn.Linear(32, 16), r=4, alpha=8, dropout=0.1)
        for layer in (self.up, self.down):
            nn.init.normal_(layer.lora_B, std=0.1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_compile_fullgraph_no_graph_breaks():
    model = TinyAdapted()
    x = torch.randn(3, 5, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)                      # training mode: dropout on, seed drawn inside the graph
    y.sum().backward()
    assert model.up.lora_A.grad.abs().sum() > 0 and model.down.lora_B.grad.abs().sum() > 0
    model.eval()                         # no dropout: compiled and eager must agree
    torch.testing.assert_close(compiled(x), model(x))


def test_saved_tensors_are_x_u_seed_and_parameters_only():
    inputs = make_lora_inputs(64, 48, 40, 8, seed=2)
    x = inputs["x"].clone().requires_grad_()
    lora_a = inputs["lora_a"].clone().requires_grad_()
    lora_b = inputs["lora_b"].clone().requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lowcost.lora_linear(x, inputs["weight"], lora_a, lora_b, 2.0, bias=inputs["bias"], dropout=0.1,
                                seed=5, backend="torch")
    parameters = {t.data_ptr() for t in (inputs["weight"], lora_a, lora_b)}
    activations = [t for t in packed if t.data_ptr() not in parameters]
    assert len(packed) == 6 and len(activations) == 3
    saved_x, u, seed = activations
    assert saved_x.data_ptr() == x.data_ptr() and saved_x.shape == x.shape      # the caller's x, not a copy
    assert u.shape == (64, 8) and u.dtype == torch.float32                       # the rank-r activation
    assert seed.shape == () and seed.dtype == torch.int64 and int(seed) == 5     # the seed, no mask
    activation_bytes = sum(t.numel() * t.element_size() for t in (u, seed))
    assert activation_bytes == 64 * 8 * 4 + 8                                    # beyond x: u and 8 bytes
    y.sum().backward()


BAD_INPUTS = [
    ("x", lambda d: d.update(x=d["x"][:, :-1]), ValueError, "x must have last dimension K=20"),
    ("lora_a K", lambda d: d.update(lora_a=d["lora_a"][:, :-1]), ValueError, "lora_a must have shape (r, K=20)"),
    ("lora_b r", lambda d: d.update(lora_b=d["lora_b"][:, :-1]), ValueError, "lora_b must have shape (N=12, r=3)"),
    ("r = 0", lambda d: d.update(lora_a=d["lora_a"][:0], lora_b=d["lora_b"][:, :0]), ValueError, "r >= 1"),
    ("weight rank", lambda d: d.update(weight=d["weight"][0]), ValueError, "weight must be 2-D"),
    ("bias shape", lambda d: d.update(bias=d["bias"][:-1]), ValueError, "bias must have shape (N=12,)"),
    ("weight dtype", lambda d: d.update(weight=d["weight"].double()), TypeError, "weight must have x's dtype"),
    ("adapter dtype", lambda d: d.update(lora_a=d["lora_a"].half()), TypeError, "lora_a must be torch.float32"),
    ("adapter pair", lambda d: d.update(lora_b=d["lora_b"].double()), TypeError, "lora_b must have lora_a's dtype"),
    ("device", lambda d: d.update(lora_a=d["lora_a"].to("meta")), ValueError, "lora_a must be on x's device"),
    ("dropout 1", lambda d: d.update(dropout=1.0), ValueError, "dropout must be a probability in [0, 1)"),
    ("dropout < 0", lambda d: d.update(dropout=-0.1), ValueError, "dropout must be a probability in [0, 1)"),
    ("scale nan", lambda d: d.update(scale=float("nan")), ValueError, "scale must be a finite real number"),
    ("scale inf", lambda d: d.update(scale=float("inf")), ValueError, "scale must be a finite real number"),
    ("seed < 0", lambda d: d.update(seed=-1), ValueError, "seed must be an int in [0, 2**63)"),
    ("backend", lambda d: d.update(backend="tpu"), ValueError, "backend must be one of"),
    ("x type", lambda d: d.update(x=[1.0]), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("case,mutate,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case, mutate, error, message):
    inputs = make_lora_inputs(5, 20, 12, 3, seed=3)
    call = dict(x=inputs["x"], weight=inputs["weight"], lora_a=inputs["lora_a"], lora_b=inputs["lora_b"],
                scale=1.0, bias=inputs["bias"], dropout=0.1, seed=1, backend="torch")
    mutate(call)
    with pytest.raises(error, match=pytest.importorskip("re").escape(message)):
        lowcost.lora_linear(**call)


def test_env_var_backend_choice(monkeypatch):
    inputs = make_lora_inputs(3, 20, 12, 3, seed=4)
    args = (inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 1.0)
    monkeypatch.setenv("LOWCOST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LOWCOST_BACKEND must be one of"):
        lowcost.lora_linear(*args)
    monkeypatch.setenv("LOWCOST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LOWCOST_BACKEND='cuda' is not available"):
        lowcost.lora_linear(*args)
    lowcost.lora_linear(*args, backend="torch")  # the explicit argument wins over the variable


def test_triton_rank_limit_is_a_clear_error():
    inputs = make_lora_inputs(3, 20, 12, 129, seed=4)
    with pytest.raises(ValueError, match="backend='triton' is not available: the Triton kernels support r <= 128"):
        lowcost.lora_linear(inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 1.0,
                            backend="triton")

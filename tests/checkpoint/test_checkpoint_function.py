"""lowcost.checkpoint.checkpoint: every point of the issue's "The function", each compared bit-for-bit with
no checkpointing and with torch.utils.checkpoint(use_reentrant=False), fp32 on the CPU."""
import pytest
import torch
import torch.utils.checkpoint as tuc
from torch import nn

from lowcost import LoRALinear
from lowcost.checkpoint import CheckpointMismatchError, checkpoint, recomputing, track


def _none(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _torch(fn, *args, **kwargs):
    return tuc.checkpoint(fn, *args, use_reentrant=False, **kwargs)


WAYS = {"none": _none, "torch": _torch, "lowcost": checkpoint}


def _run_all(step):
    """step(ckpt) -> dict of tensors; runs it under the three ways with the same seed, returns results."""
    results = {}
    for name, way in WAYS.items():
        torch.manual_seed(123)
        results[name] = {k: v.detach().clone() for k, v in step(way).items()}
    return results


def _assert_all_equal(results):
    for name in ("torch", "lowcost"):
        for key, ref in results["none"].items():
            assert torch.equal(ref, results[name][key]), f"{name}: {key} differs from no checkpointing"


def _mlp(p_drop=0.3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(p_drop), nn.Linear(32, 16), nn.LayerNorm(16))


def _grads(module, *extra):
    return {**{n: p.grad for n, p in module.named_parameters()}, **{f"extra{i}": t for i, t in enumerate(extra)}}


def test_dropout_inside_fn_is_replayed():
    mlp, x0 = _mlp(), torch.randn(4, 16)

    def step(ckpt):
        mlp.zero_grad()
        x = x0.clone().requires_grad_()
        out = ckpt(mlp, x)
        out.square().sum().backward()
        return {**_grads(mlp, x.grad), "out": out}

    _assert_all_equal(_run_all(step))


def test_fused_lora_seeded_dropout_is_replayed():
    """LoRALinear draws its Philox seed from the CPU generator; the replayed RNG gives the same mask."""
    torch.manual_seed(0)
    lora = LoRALinear.from_linear(nn.Linear(16, 24), r=4, alpha=8, dropout=0.25).train()
    nn.init.normal_(lora.lora_B, std=0.2)
    x0 = torch.randn(3, 5, 16)

    def step(ckpt):
        lora.zero_grad()
        x = x0.clone().requires_grad_()
        out = ckpt(lambda t: torch.tanh(lora(t)), x)
        out.sum().backward()
        return {"A": lora.lora_A.grad, "B": lora.lora_B.grad, "x": x.grad, "out": out}

    _assert_all_equal(_run_all(step))


def test_no_input_requires_grad_with_closed_over_lora():
    """Frozen embeddings feed the block; only LoRA parameters closed over inside fn require grad."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16).requires_grad_(False)
    lora = LoRALinear.from_linear(nn.Linear(16, 16), r=4, alpha=8, dropout=0.1).train()
    nn.init.normal_(lora.lora_B, std=0.2)
    ids = torch.randint(0, 50, (2, 7))

    def step(ckpt):
        lora.zero_grad()
        hidden = emb(ids)
        assert not hidden.requires_grad
        out = ckpt(lambda h: nn.functional.silu(lora(h)) * h, hidden)
        out.pow(2).mean().backward()
        return {"A": lora.lora_A.grad, "B": lora.lora_B.grad}

    results = _run_all(step)
    assert results["lowcost"]["A"].abs().sum() > 0
    _assert_all_equal(results)


def test_tensor_kwargs_non_tensor_and_nested_outputs():
    mlp, x0, scale0 = _mlp(0.0), torch.randn(4, 16), torch.randn(16)

    def fn(x, *, scale, tag="t"):
        y = mlp(x) * scale
        return {"y": y, "pair": (y.sin(), tag), "n": 3}

    def step(ckpt):
        mlp.zero_grad()
        x, scale = x0.clone().requires_grad_(), scale0.clone().requires_grad_()
        out = ckpt(fn, x, scale=scale, tag="block")
        assert out["pair"][1] == "block" and out["n"] == 3
        (out["y"].sum() + out["pair"][0].sum()).backward()
        return {**_grads(mlp, x.grad, scale.grad)}

    _assert_all_equal(_run_all(step))


def test_nested_checkpoints():
    torch.manual_seed(0)
    inner, outer = _mlp(0.2), _mlp(0.2)
    x0 = torch.randn(4, 16)

    def step(ckpt):
        inner.zero_grad(), outer.zero_grad()
        x = x0.clone().requires_grad_()
        out = ckpt(lambda t: outer(ckpt(inner, t.cos()) + t), x)
        out.square().sum().backward()
        return {**_grads(inner), **{f"o.{k}": v for k, v in _grads(outer, x.grad).items()}}

    _assert_all_equal(_run_all(step))


def test_autograd_grad_and_backward_inputs():
    mlp, x0 = _mlp(0.2), torch.randn(4, 16)
    weight = mlp[0].weight

    def step(ckpt):
        mlp.zero_grad()
        x = x0.clone().requires_grad_()
        out = ckpt(mlp, x)
        gx, gw = torch.autograd.grad(out.sum(), (x, weight), retain_graph=True)
        out.square().sum().backward(inputs=[mlp[3].weight])
        assert mlp[0].weight.grad is None and x.grad is None
        return {"gx": gx, "gw": gw, "w3": mlp[3].weight.grad}

    _assert_all_equal(_run_all(step))


def test_retain_graph_backward_twice():
    mlp, x0 = _mlp(0.2), torch.randn(4, 16)

    def step(ckpt):
        mlp.zero_grad()
        out = ckpt(mlp, x0)
        out.sum().backward(retain_graph=True)
        out.square().sum().backward()
        return _grads(mlp)

    _assert_all_equal(_run_all(step))


def test_shared_parameter_in_two_blocks_gets_one_gradient():
    """DDP-style: the parameter's AccumulateGrad runs once, with the sum of both blocks' contributions."""
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    x0 = torch.randn(4, 16)
    fired = []
    shared.weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))

    def step(ckpt):
        shared.zero_grad()
        fired.clear()
        h = ckpt(lambda t: torch.tanh(shared(t)), x0)
        out = ckpt(lambda t: torch.relu(shared(t)) * t, h)
        out.sum().backward()
        assert len(fired) == 1, f"{len(fired)} gradient-ready events for one backward"
        return _grads(shared)

    _assert_all_equal(_run_all(step))


def test_early_stop_skips_the_tail_of_fn():
    """After the last tensor backward needs is rebuilt, the rest of fn is not run again."""
    lin = nn.Linear(8, 8)
    calls = {"head": 0, "tail": 0}

    def fn(x):
        calls["head"] += 1
        y = lin(x).sin()       # sin saves its input: the last saved tensor
        calls["tail"] += 1     # after the last save
        return y + 1           # add saves nothing

    checkpoint(fn, torch.randn(3, 8)).sum().backward()
    assert calls == {"head": 2, "tail": 1}


def test_mismatch_names_the_first_differing_tensor():
    lin = nn.Linear(8, 8)
    width = {"n": 8}

    def fn(x):
        y = lin(x).relu()
        return y[:, : width["n"]].exp()

    out = checkpoint(fn, torch.randn(3, 8))
    width["n"] = 5
    with pytest.raises(CheckpointMismatchError, match=r"saved tensor #\d+ .*forward saved shape \(3, 8\).*"
                                                      r"recomputation produced shape \(3, 5\)"):
        out.sum().backward()


def test_keeps_only_inputs_and_recomputing_flag():
    mlp, x = _mlp(0.0), torch.randn(64, 16, requires_grad=True)
    params = list(mlp.parameters())
    with track(params, hook=True) as plain:
        out_plain = mlp(x)
    with track(params, hook=True) as ckpt:
        out = checkpoint(mlp, x)
    assert ckpt.bytes() == x.numel() * 4 < plain.bytes()
    assert ckpt.bytes(kinds=["input"]) == x.numel() * 4
    seen = []
    out.register_hook(lambda g: seen.append(recomputing()))
    mlp[0].register_forward_hook(lambda *a: seen.append(recomputing()))
    out.sum().backward()
    assert seen == [False, True] and not recomputing()
    del out_plain


def test_use_reentrant_true_is_refused_and_no_grad_passes_through():
    with pytest.raises(ValueError, match="non-reentrant"):
        checkpoint(torch.sin, torch.randn(2), use_reentrant=True)
    with torch.no_grad():
        assert checkpoint(lambda t: t * 2, torch.ones(2)).tolist() == [2.0, 2.0]


@pytest.mark.gpu
def test_cuda_dropout_is_replayed():
    mlp, x0 = _mlp(0.3).cuda(), torch.randn(4, 16, device="cuda")

    def step(ckpt):
        mlp.zero_grad()
        x = x0.clone().requires_grad_()
        ckpt(mlp, x).square().sum().backward()
        return _grads(mlp, x.grad)

    _assert_all_equal(_run_all(step))


def test_selective_keeps_only_reachable_matmul_outputs():
    """Selective keeps lin1's output (relu is recomputed from it), not lin2's (read after the last save)."""
    from lowcost.checkpoint import checkpoint_with
    from lowcost.checkpoint.selective import save_matmuls
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(8, 32), nn.Linear(32, 16)
    x = torch.randn(5, 8)
    fn = lambda t: lin2(torch.relu(lin1(t))) * 2  # noqa: E731
    ref = fn(x)
    ref.sum().backward()
    grads_ref = [p.grad.clone() for p in (*lin1.parameters(), *lin2.parameters())]
    lin1.zero_grad(), lin2.zero_grad()
    with track(list(lin1.parameters()) + list(lin2.parameters())) as kept:
        out, frame = checkpoint_with(fn, (x,), {}, selective=save_matmuls)
    assert kept.bytes(kinds=["cache"]) == 5 * 32 * 4
    out.sum().backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads_ref, (*lin1.parameters(), *lin2.parameters())))

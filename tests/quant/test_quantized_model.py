"""lowcost.quantize on tiny models, LoRA on the quantized base against LoRA on its dequantized dense weights,
adapter files (PEFT layout, read by PEFT onto the dense model), merge, checkpointing and every bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowcost
from lowcost.nn import QuantizedLinear
from lowcost.quant import quantize
from quant_cases import make_quantized
from tiny_models import gpt2, llama

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _frozen(build=llama):
    model = build().eval()
    model.requires_grad_(False)
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The model with every QuantizedLinear replaced by an nn.Linear holding its dequantized weight."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)
            linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    return dense


def _lora_grads(model, config, seed=3):
    lowcost.apply(model, lora=config)
    return _random_adapter_step(model, seed)


def _random_adapter_step(model, seed):
    """Loss and adapter gradients of one training step with seeded random adapters and dropout draws."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.train()
    torch.manual_seed(seed)   # the dropout seeds are drawn from torch's generator
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("scheme, double", [("nf4", False), ("nf4", True), ("int8", False)])
def test_quantized_model_equals_its_dequantized_twin(scheme, double):
    model = _frozen()
    report = quantize(model, scheme, double_quant=double)
    assert len(report.modules) == 14 and report.skipped[0][0] == "lm_head"
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in report.names)
    torch.testing.assert_close(model(IDS).logits, dequantized_copy(model)(IDS).logits, rtol=1e-5, atol=1e-5)
    assert report.bytes == sum(model.get_submodule(n).weight.nbytes for n in report.names)


def test_lora_on_quantized_base_equals_lora_on_dense_dequantized_base():
    """Loss and every adapter gradient, the model level of 'LoRA on a quantized base = LoRA on its dequantized
    weight' (fp32, dropout 0 and 0.1: the Philox mask is the same on both paths)."""
    for dropout in (0.0, 0.1):
        quantized = _frozen()
        quantize(quantized, "nf4", double_quant=True)
        dense = dequantized_copy(quantized)
        config = lowcost.LoRAConfig(r=4, alpha=8, dropout=dropout)
        loss_q, grads_q = _lora_grads(quantized, config)
        loss_d, grads_d = _lora_grads(dense, config)
        torch.testing.assert_close(loss_q, loss_d, rtol=1e-5, atol=1e-6)
        assert grads_q.keys() == grads_d.keys() and len(grads_q) == 28
        for name in grads_q:
            torch.testing.assert_close(grads_q[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_saves_in_peft_layout_and_peft_reads_it_onto_the_dense_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = _frozen()
    quantize(model, "nf4")
    dense = dequantized_copy(model)
    _lora_grads(model, lowcost.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    model.eval()
    lowcost.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(dense, tmp_path).eval()
    torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    again = _frozen()
    quantize(again, "nf4")
    lowcost.load_adapter(again, tmp_path)
    torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_merge_on_a_quantized_base_returns_dense_merged_weights():
    model = _frozen()
    quantize(model, "int8")
    _lora_grads(model, lowcost.LoRAConfig(r=4, alpha=8))
    model.eval()
    adapted = model(IDS).logits.detach()
    merged, drift = lowcost.merge(model)
    layer = merged.model.layers[0].mlp.down_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and len(drift.layers) == 14
    assert not any(isinstance(m, QuantizedLinear) for m in merged.model.layers.modules())
    torch.testing.assert_close(merged(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    assert drift.min_retained > 0.999999


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointing_a_quantized_lora_model_gives_the_same_gradients(policy):
    plain, ckpt = _frozen(), _frozen()
    for m in (plain, ckpt):
        quantize(m, "nf4")
    _, want = _lora_grads(plain, lowcost.LoRAConfig(r=4, dropout=0.1))
    lowcost.apply(ckpt, checkpoint=lowcost.CheckpointConfig(policy=policy))
    _, got = _lora_grads(ckpt, lowcost.LoRAConfig(r=4, dropout=0.1))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_gpt2_conv1d_and_bf16_compute_dtype():
    model = _frozen(gpt2).to(torch.bfloat16)
    report = quantize(model, "nf4")
    assert {n.rsplit(".", 1)[-1] for n in report.names} == {"c_attn", "c_proj", "c_fc"}
    layer = model.transformer.h[0].attn.c_attn
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (96, 32)
    twin = dequantized_copy(model)
    torch.testing.assert_close(model(IDS).logits.float(), twin(IDS).logits.float(), rtol=2e-2, atol=2e-2)


def test_targets_exclude_and_padding_report():
    model = _frozen()
    report = quantize(model, "nf4", block_size=32, targets=r".*mlp\..*", exclude=["down_proj"])
    assert sorted({n.rsplit(".", 1)[-1] for n in report.names}) == ["gate_proj", "up_proj"]
    assert ("model.layers.0.mlp.down_proj", "excluded") in report.skipped
    model2 = _frozen()
    report2 = quantize(model2, "nf4", block_size=32)   # K = 48 for down_proj: padded to 64, the others K = 32
    assert {m.name for m in report2.modules if m.padded} == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    assert "padded to whole blocks" in str(report2)


# ------------------------------------------------------------------------------------------------ bad input
def _snapshot(model):
    return {name: module for name, module in model.named_modules()}


def test_a_weight_that_requires_grad_is_refused_and_nothing_changes():
    model = llama()   # fresh: every parameter requires grad
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' has a weight that requires grad"):
        quantize(model, "nf4")
    assert _snapshot(model) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "q4_0"}, "scheme must be one of"),
    ({"scheme": "nf4", "block_size": 48}, "block_size must be one of"),
    ({"scheme": "int8", "double_quant": True}, "double_quant applies to scheme='nf4' only"),
    ({"targets": ["nothing_here"]}, "selects no nn.Linear"),
])
def test_bad_arguments(kwargs, message):
    model = _frozen()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        quantize(model, **kwargs)
    assert _snapshot(model) == before


def test_failure_midway_puts_every_layer_back(monkeypatch):
    import lowcost.quant.quantize_model as qmod
    model = _frozen()
    before = _snapshot(model)
    calls = []
    real = qmod.quantize_weight

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("simulated")
        return real(*args, **kwargs)
    monkeypatch.setattr(qmod, "quantize_weight", flaky)
    with pytest.raises(MemoryError):
        quantize(model, "nf4")
    assert _snapshot(model) == before


def test_quantize_after_apply_is_refused():
    model = _frozen()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=2))
    with pytest.raises(RuntimeError, match="quantize before lowcost.apply"):
        quantize(model, "nf4")


def test_backend_without_the_format_names_the_module_and_leaves_the_model_alone(monkeypatch):
    """Triton takes every format now and CUDA cannot run here, so a Triton without Q6_K is simulated: the
    refusal machinery is what is tested (the op-level test checks the real CUDA refusal)."""
    pytest.importorskip("triton")
    from lowcost.ops import _quant_backends
    monkeypatch.setitem(_quant_backends.QUANT_SUPPORT, "triton", ("nf4", "int8"))
    model = _frozen()
    model.model.layers[1].mlp.up_proj = QuantizedLinear(make_quantized("q6_k", 48, 256))  # planned, never run
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"backend='triton' has no kernel for a 'q6_k' weight \('model.layers.1.mlp.up_proj'\)"):
        lowcost.apply(model, lora=lowcost.LoRAConfig(r=2, backend="triton"))
    assert _snapshot(model) == before and lowcost.patch.patch_state(model) is None


def _fused_step(model, fused, seed=3):
    """apply(fused=...), then ``_random_adapter_step``: the report, the loss and the adapter gradients."""
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1), fused=fused)
    return (report, *_random_adapter_step(model, seed))


@pytest.mark.parametrize("backend", [None, "triton"])
def test_fused_mlp_on_a_quantized_base_equals_the_unfused_layers(backend, monkeypatch):
    """apply's fused MLP takes quantized gate/up/down (lowcost.ops.qlora_gated_mlp): the same loss and
    adapter gradients as the unfused quantized LoRA layers, with the same dropout draws. With
    LOWCOST_BACKEND=triton (the interpreter here) it runs the dequantizing Triton kernels, against the unfused
    quantized layers on Triton."""
    if backend is not None:
        pytest.importorskip("triton")
        monkeypatch.setenv("LOWCOST_BACKEND", backend)
    model = _frozen()
    quantize(model, "nf4")
    twin = copy.deepcopy(model)
    report, loss, grads = _fused_step(model, ("mlp",))
    assert [f for f in report.fusion.taken if f.kind == "mlp"] and \
        not [f for f in report.fusion.refused if f.kind == "mlp"]
    _, loss_ref, grads_ref = _fused_step(twin, None)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_mlp_refuses_what_it_cannot_take_on_a_quantized_base():
    model = _frozen()
    quantize(model, "nf4", exclude=["down_proj"])
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8), fused=("mlp",))
    refused = [f for f in report.fusion.refused if f.kind == "mlp"]
    assert refused and all("quantized but not the other projections" in f.detail for f in refused)


def test_fused_mlp_on_a_quantized_base_with_cuda_checks_formats_and_the_device(monkeypatch):
    """backend cuda on a quantized base (apply refuses it on a machine without a GPU, so the fusion's checks are
    called directly on the adapted layers): a format cuda's dequantizing GEMMs do not decode is refused by name
    (cuda's list shortened to simulate one), a device it cannot run on with the reason; else no objection
    (tests/quant/test_qlora_gated_mlp_cuda.py runs the fusion)."""
    from lowcost.ops import _quant_backends
    from lowcost.patch.fuse_mlp import _backend_problem, _quantized_problem
    model = _frozen()
    quantize(model, "nf4")
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8), fused=None)
    mlp = model.model.layers[0].mlp
    layers = {attr: getattr(mlp, attr) for attr in ("gate_proj", "up_proj", "down_proj")}
    monkeypatch.setenv("LOWCOST_BACKEND", "cuda")
    assert _quantized_problem(layers, packed=False) == ""
    monkeypatch.setitem(_quant_backends.QUANT_SUPPORT, "cuda", ("int8", "q8_0"))
    assert _quantized_problem(layers, packed=False) == \
        "quantized base weights in ['nf4'] with backend='cuda': its dequantizing GEMMs do not decode them"
    for layer in layers.values():
        layer.backend = "cuda"
    assert _backend_problem(layers) == "backend='cuda' cannot run here: the CUDA kernels need CUDA tensors " \
        "(tensors are on cpu)"

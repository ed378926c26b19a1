"""PEFT 0.21 and lowcost side by side on the models and LoRA cases of PEFT's own test suite
(huggingface/peft tests/test_custom_models.py: its MLP / Conv1D+Embedding / deep-MLP models and LoRA case list,
the multi-rank patterns of TestMultiRankAdapter; plus tiny Llama, Qwen2 and GPT-2 built from configs), rewritten.

For every case lowcost implements ("same"), starting from PEFT's own adapter (random A and B):
- PEFT's file → ``lowcost.load_adapter``: the same adapted modules, outputs and every factor's gradient;
- ``lowcost.apply`` with the same settings adapts the same modules;
- ``lowcost.save_adapter`` → ``PeftModel.from_pretrained``: the same outputs;
- ``lowcost.merge`` against PEFT's ``merge_and_unload``;
- ``lowcost.accelerate_peft`` on the PEFT model: the same outputs and gradients.
For every case lowcost does not implement ("refused"), loading PEFT's file is a ValueError naming the reason and
the model is left untouched. fp32, compared in eval mode (dropout off), relative to the largest magnitude.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lowcost
from lowcost.patch import lora_layers
from lowcost.patch.peft_config import lora_kwargs_from_peft
from peft_cases import BUILDERS, INPUTS, peft_adapted_names, rel_err
from tiny_models import assert_unchanged, gpt2, llama, qwen2, snapshot

TOL = 1e-5
HF = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2}
DEEP_RANKS = {f"layers.{i}.lin{j}": 16 // (i + 1) for i in range(4) for j in range(2)}

CASES = {
    # PEFT's "Vanilla MLP 1-6" LoRA cases
    "MLP-1-regex": ("MLP", {"target_modules": "lin0"}, "same"),
    "MLP-2-list": ("MLP", {"target_modules": ["lin0"]}, "same"),
    "MLP-3-lin1": ("MLP", {"target_modules": ["lin1"]}, "same"),
    "MLP-4-both": ("MLP", {"target_modules": ["lin0", "lin1"]}, "same"),
    "MLP-5-modules_to_save": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, "same"),
    "MLP-6-alpha-dropout": ("MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}, "same"),
    "MLP-rslora-patterns": ("MLP", {"target_modules": ["lin0", "lin1"], "use_rslora": True,
                                    "rank_pattern": {"lin1": 3}, "alpha_pattern": {"lin0": 5}}, "same"),
    # PEFT's "Embedding + transformers Conv1D 1-3"
    "EmbConv1D-1-conv1d": ("EmbConv1D", {"target_modules": ["conv1d"]}, "same"),
    "EmbConv1D-2-emb": ("EmbConv1D", {"target_modules": ["emb"]}, "same"),
    "EmbConv1D-3-both": ("EmbConv1D", {"target_modules": ["emb", "conv1d"]}, "same"),
    # TestMultiRankAdapter, and PEFT's layer filter
    "DeepMLP-multirank": ("DeepMLP", {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8,
                                      "rank_pattern": DEEP_RANKS,
                                      "alpha_pattern": {k: 2 * v for k, v in DEEP_RANKS.items()}}, "same"),
    "DeepMLP-layers_pattern": ("DeepMLP", {"target_modules": ["lin1"], "layers_to_transform": 3,
                                           "layers_pattern": "layers"}, "same"),
    # tiny transformers
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}, "same"),
    "llama-layers_to_transform": ("llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
                                  "same"),
    "llama-qv-embed": ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}, "same"),
    "qwen2-mlp-norm": ("qwen2", {"target_modules": ["gate_proj", "up_proj", "down_proj"],
                                 "modules_to_save": ["model.norm"]}, "same"),
    "gpt2-conv1d-wte": ("gpt2", {"target_modules": ["c_attn", "c_proj", "wte"]}, "same"),
    # PEFT cases lowcost does not implement
    "MLP-DoRA": ("MLP", {"target_modules": ["lin0"], "use_dora": True}, "use_dora"),
    "MLP-lora_bias": ("MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True}, "lora_bias"),
    "MLP-target_parameters": ("MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
                              "target_parameters"),
    "EmbConv1D-trainable-tokens": ("EmbConv1D", {"target_modules": ["conv1d"],
                                                 "trainable_token_indices": {"emb": [0, 10]}},
                                   "trainable_token_indices"),
    "Conv2d": ("Conv2d", {"target_modules": ["conv2d", "lin0"]}, "Conv2d"),
    "MHA": ("MHA", {"target_modules": ["mha"]}, "MultiheadAttention"),
}
SAME = [c for c, (_, _, outcome) in CASES.items() if outcome == "same"]
REFUSED = [c for c, (_, _, outcome) in CASES.items() if outcome != "same"]


def build(name):
    return HF[name]() if name in HF else BUILDERS[name]()


def batch(name):
    if name in HF:
        return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return INPUTS[name]()


def forward(model, x):
    out = model(input_ids=x) if not x.is_floating_point() and hasattr(model, "config") else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_of(model, x):
    out = forward(model, x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return (out * weights).sum()


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """case → (directory of PEFT's saved adapter, the PEFT model), built once."""
    made = {}

    def make(case):
        if case not in made:
            model_name, kwargs, _ = CASES[case]
            torch.manual_seed(1)
            peft_model = quiet(get_peft_model, build(model_name), LoraConfig(init_lora_weights=False, **kwargs))
            path = tmp_path_factory.mktemp(case)
            peft_model.save_pretrained(path)
            made[case] = (path, peft_model.eval())
        return made[case]
    return make


def factor_grads(model, peft_model, x):
    """(ours, PEFT's) gradient of every adapter factor, keyed alike, after one backward in eval mode."""
    for m in (model, peft_model):
        m.eval().zero_grad()
        loss_of(m, x).backward()
    peft_modules = dict(peft_model.base_model.model.named_modules())
    pairs = {}
    for name, layer in lora_layers(model).items():
        peft_layer = peft_modules[name]
        a, b = ((peft_layer.lora_embedding_A["default"], peft_layer.lora_embedding_B["default"])
                if hasattr(layer, "embedding_dim") else
                (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight))
        pairs[f"{name}.A"], pairs[f"{name}.B"] = (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)
    return pairs


@pytest.mark.parametrize("case", SAME)
def test_peft_file_loads_with_the_same_modules_outputs_and_gradients(case, peft_files):
    path, peft_model = peft_files(case)
    model_name, kwargs, _ = CASES[case]
    x = batch(model_name)
    model = build(model_name)
    lowcost.load_adapter(model, path)
    assert set(lora_layers(model)) == peft_adapted_names(peft_model)
    assert rel_err(forward(model.eval(), x), forward(peft_model, x)) <= TOL
    for key, (ours, theirs) in factor_grads(model, peft_model, x).items():
        assert rel_err(ours, theirs) <= TOL, key
    fresh = build(model_name)
    config = lora_kwargs_from_peft(LoraConfig(**kwargs).to_dict(), fresh, [n for n, _ in fresh.named_modules()])
    report = quiet(lowcost.apply, fresh, lora=lowcost.LoRAConfig(**config))
    assert set(report.names) == peft_adapted_names(peft_model)


@pytest.mark.parametrize("case", SAME)
def test_lowcost_file_loads_in_peft_and_merges_like_peft(case, peft_files, tmp_path):
    path, peft_model = peft_files(case)
    model_name = CASES[case][0]
    x = batch(model_name)
    model = build(model_name)
    lowcost.load_adapter(model, path)
    lowcost.save_adapter(model, tmp_path / "ours")
    again = quiet(PeftModel.from_pretrained, build(model_name), str(tmp_path / "ours")).eval()
    assert peft_adapted_names(again) == peft_adapted_names(peft_model)
    assert rel_err(forward(again, x), forward(peft_model, x)) <= TOL
    merged, _ = quiet(lowcost.merge, model, probe=x if x.is_floating_point() else None)
    peft_merged = quiet(copy.deepcopy(peft_model).merge_and_unload)
    assert rel_err(forward(merged.eval(), x), forward(peft_merged.eval(), x)) <= TOL


@pytest.mark.parametrize("case", [c for c in SAME if CASES[c][0] in HF or c.startswith("MLP")])
def test_accelerate_peft_keeps_outputs_and_gradients(case, peft_files):
    _, peft_model = peft_files(case)
    x = batch(CASES[case][0])
    fused = copy.deepcopy(peft_model)
    lowcost.accelerate_peft(fused)
    assert rel_err(forward(fused.eval(), x), forward(peft_model, x)) <= TOL
    for m in (fused, peft_model):
        m.zero_grad()
        loss_of(m, x).backward()
    theirs = dict(peft_model.named_parameters())
    for name, p in fused.named_parameters():
        if p.grad is not None:
            assert rel_err(p.grad, theirs[name].grad) <= TOL, name


@pytest.mark.parametrize("case", REFUSED)
def test_what_lowcost_does_not_implement_is_refused(case, peft_files):
    path, _ = peft_files(case)
    model_name, _, reason = CASES[case]
    model = build(model_name)
    before = snapshot(model)
    with pytest.raises(ValueError, match=reason):
        lowcost.load_adapter(model, path)
    assert_unchanged(model, before)

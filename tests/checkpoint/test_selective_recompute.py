"""Selective checkpointing with ``recompute=(...)``: the matmuls inside the named block submodules are run
again in backward instead of kept. Bit-exact gradients (LoRA dropout inside the recomputed module, both the
fused op's seeded dropout and PEFT's nn.Dropout), the exact number of recomputed matmuls, the exact bytes
saved, hooks removed at uninstall, and the configuration errors."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ckpt_models import assert_same, build_llama
from lowcost.checkpoint import (CheckpointConfig, Decision, RecomputeCounter, apply_checkpointing, checkpointing_of,
                                recomputing, remove_checkpointing, track)
from lowcost.checkpoint import selective as selective_mod
from lowcost.checkpoint.install import install, resolve_blocks, uninstall
from lowcost.checkpoint.selective import default_save_ops

LAYERS = 2
O_PROJ = ("self_attn.o_proj",)
SAVE_OPS = default_save_ops()


def build(kind: str):
    """Tiny 2-layer Llama with LoRA (dropout 0.1) on every block linear: PEFT, or fused via lowcost.apply."""
    if kind == "peft":
        return build_llama(peft=True, layers=LAYERS, dropout=0.1)
    import lowcost
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, use_cache=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1, targets="all-linear"))
    assert report.paths() == {"fused": 7 * LAYERS}
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so every gradient path carries signal
            nn.init.normal_(p, std=0.1)
    return model.train()


def modules_named(model, suffix: str) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("." + suffix)]


class _OpsInside(TorchDispatchMode):
    """Plain forward: the saved-kind ops (matmul, attention, lowcost::lora_linear) that run inside
    ``modules`` (forward hooks of the test's own), and the storages of their outputs."""

    def __init__(self, modules):
        super().__init__()
        self.depth, self.count, self.storages = 0, 0, {}
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(lambda *_: setattr(self, "depth", self.depth + 1)))
            self.handles.append(m.register_forward_hook(lambda *_: setattr(self, "depth", self.depth - 1)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth > 0 and func.overloadpacket in SAVE_OPS:
            self.count += 1
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):  # held, so that a freed storage's address is not reused
                    self.storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t)
        return out

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


def ops_inside(model, ids, suffix: str) -> tuple[int, int]:
    """(number of saved-kind ops, bytes of their outputs) inside the modules named ``…suffix``, one forward."""
    with _OpsInside(modules_named(model, suffix)) as probe:
        model(input_ids=ids, labels=ids).loss
    return probe.count, sum(n for n, _ in probe.storages.values())


def step(model, ids, config=None, seed=5):
    """One step (fixed seed): loss, trainable gradients, the kept-bytes tracker and the recomputed-op count."""
    params = list(model.parameters())
    if config is not None:
        apply_checkpointing(model, config)
    try:
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        with track(params, hook=True) as kept:
            loss = model(input_ids=ids, labels=ids).loss
        with RecomputeCounter() as counter:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        if config is not None:
            remove_checkpointing(model)
    assert selective_mod._region_stack() == []  # every region entered was left
    return loss.detach(), grads, kept, counter.count


@pytest.mark.parametrize("kind, per_block", [("lowcost", 1), ("peft", 3)], ids=["lowcost-lora", "peft"])
def test_o_proj_recompute_exact_counts_and_bytes(kind, per_block, ids):
    """per_block: the matmuls of one o_proj — the fused op, or PEFT's base + lora_A + lora_B."""
    model = build(kind)
    n_ops, o_bytes = ops_inside(model, ids, "self_attn.o_proj")
    assert n_ops == per_block * LAYERS and o_bytes > 0

    loss_ref, grads_ref, plain_kept, plain_count = step(model, ids)
    assert plain_count == 0
    loss_sel, grads_sel, sel_kept, sel_count = step(model, ids, CheckpointConfig(policy="selective"))
    loss_o, grads_o, o_kept, o_count = step(model, ids, CheckpointConfig(policy="selective", recompute=O_PROJ))

    # bit-exact vs no checkpointing and vs plain selective
    assert torch.equal(loss_o, loss_ref) and torch.equal(loss_sel, loss_ref)
    assert_same(grads_ref, grads_o, "selective+o_proj vs none")
    assert_same(grads_sel, grads_o, "selective+o_proj vs selective")

    # the recompute is the o_proj matmuls, nothing else; plain selective recomputes none
    assert sel_count == 0
    assert o_count == n_ops == per_block * LAYERS

    # kept bytes drop by exactly the o_proj outputs (all from the selective cache)
    assert sel_kept.bytes() - o_kept.bytes() == o_bytes
    assert sel_kept.bytes(kinds=["cache"]) - o_kept.bytes(kinds=["cache"]) == o_bytes
    for kind_ in ("saved", "input"):
        assert sel_kept.bytes(kinds=[kind_]) == o_kept.bytes(kinds=[kind_])
    assert o_kept.bytes() < sel_kept.bytes() < plain_kept.bytes()


@pytest.mark.parametrize("kind", ["lowcost", "peft"], ids=["lowcost-lora", "peft"])
def test_o_proj_dropout_mask_reaches_the_gradients(kind, ids):
    """Guard for the exactness test: o_proj's LoRA dropout mask changes its gradients, so a recompute that drew
    another mask (fused op's seed, or PEFT's nn.Dropout) could not give bit-identical gradients."""
    model = build(kind)
    _, grads_5, _, _ = step(model, ids, seed=5)
    _, grads_6, _, _ = step(model, ids, seed=6)
    keys = [k for k in grads_5 if "self_attn.o_proj.lora_A" in k]
    assert len(keys) == LAYERS
    assert all(not torch.equal(grads_5[k], grads_6[k]) for k in keys)


def test_nested_regions_recompute_whole_attention(ids):
    """"self_attn" and "o_proj" (nested regions): all of attention is recomputed — q/k/v (one grouped op, the
    default "qkv" fusion), o and SDPA."""
    model = build("lowcost")
    n_ops, attn_bytes = ops_inside(model, ids, "self_attn")
    assert n_ops == 3 * LAYERS
    _, grads_ref, _, _ = step(model, ids)
    _, _, sel_kept, _ = step(model, ids, CheckpointConfig(policy="selective"))
    _, grads, kept, count = step(model, ids, CheckpointConfig(policy="selective", recompute=("self_attn", "o_proj")))
    assert_same(grads_ref, grads, "selective+self_attn")
    assert count == n_ops
    assert sel_kept.bytes() - kept.bytes() == attn_bytes


def test_early_stop_inside_a_region_leaves_it():
    """The block's last saved tensor is packed inside the recomputed module, so the recompute's early stop
    raises out of that module's forward: the region must still be left, and gradients stay exact."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(2)])
    x = torch.randn(4, 8)

    def grads():
        blocks.zero_grad(set_to_none=True)
        h = x
        for b in blocks:
            h = b(h)
        with RecomputeCounter() as counter:
            h.square().sum().backward()
        return {n: p.grad.clone() for n, p in blocks.named_parameters()}, counter.count

    ref, _ = grads()
    calls = {"entered": 0, "finished": 0}
    probes = []
    for b in blocks:  # the test's own hooks: did a recompute enter b[2] and leave it by an exception?
        probes.append(b[2].register_forward_pre_hook(
            lambda *_: calls.__setitem__("entered", calls["entered"] + recomputing())))
        probes.append(b[2].register_forward_hook(
            lambda *_: calls.__setitem__("finished", calls["finished"] + recomputing())))
    apply_checkpointing(blocks, CheckpointConfig(policy="selective", recompute=("2",)))
    try:
        got, count = grads()
    finally:
        assert remove_checkpointing(blocks) == 2
        for h in probes:
            h.remove()
    assert calls == {"entered": 2, "finished": 0}  # each recompute stopped inside the region
    assert selective_mod._region_stack() == []
    assert_same(ref, got, "recompute=('2',)")
    assert count == 0  # the stop comes as addmm saves its input, before the addmm itself runs


def _hooks(model) -> dict:
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("kind", ["lowcost", "peft"], ids=["lowcost-lora", "peft"])
def test_hooks_on_matching_modules_only_and_removed(kind):
    model = build(kind)
    before, keys = _hooks(model), list(model.state_dict())
    report = apply_checkpointing(model, CheckpointConfig(policy="selective", recompute=("o_proj",)))
    try:
        during = _hooks(model)
        changed = {name for name in before if during[name] != before[name]}
        # "o_proj" matches the whole (PEFT-wrapped) layer, not its base_layer / lora_A / lora_B
        assert changed == {name for name, _ in model.named_modules() if name.endswith("self_attn.o_proj")}
        assert len(changed) == LAYERS
        assert all(during[n] == (before[n][0] + 1, before[n][1] + 1) for n in changed)
        assert list(model.state_dict()) == keys
        assert [str(d) for d in checkpointing_of(model)] == ["selective[recompute=o_proj]"] * LAYERS
        assert "policy=selective, recompute=o_proj" in str(report)
        assert "selective[recompute=o_proj]" in str(report)
    finally:
        assert remove_checkpointing(model) == LAYERS
    assert _hooks(model) == before
    assert list(model.state_dict()) == keys


def test_config_errors_and_normalisation():
    with pytest.raises(ValueError, match=r"recompute=.*self_attn\.o_proj.*policy='full'"):
        CheckpointConfig(policy="full", recompute=O_PROJ)
    with pytest.raises(ValueError, match=r"recompute.*policy='every_k'"):
        CheckpointConfig(policy="every_k", recompute=O_PROJ)
    with pytest.raises(ValueError, match=r"recompute.*policy='budget'"):
        CheckpointConfig(budget=0.5, recompute=O_PROJ)
    for bad in (("",), (".o_proj",), ("self_attn..o_proj",), (3,), 3):
        with pytest.raises(ValueError, match="recompute"):
            CheckpointConfig(policy="selective", recompute=bad)
    assert CheckpointConfig(policy="selective", recompute="o_proj").recompute == ("o_proj",)
    assert CheckpointConfig(policy="selective", recompute=["o_proj"]).recompute == ("o_proj",)
    assert CheckpointConfig(policy="selective").recompute == ()
    with pytest.raises(ValueError, match="recompute.*'full'"):
        Decision("full", recompute=O_PROJ)
    assert str(Decision("selective", recompute=("self_attn.o_proj", "mlp.down_proj"))) == \
        "selective[recompute=self_attn.o_proj,mlp.down_proj]"
    assert str(Decision("selective")) == "selective"


@pytest.mark.parametrize("kind", ["lowcost", "peft"], ids=["lowcost-lora", "peft"])
def test_unknown_path_raises_before_the_model_changes(kind):
    model = build(kind)
    model.config.use_cache = True
    apply_checkpointing(model, CheckpointConfig(policy="full", disable_use_cache=False))
    model.config.use_cache = True
    before = _hooks(model)
    try:
        # "proj" is not a whole name component of "self_attn.o_proj"; "o_projection" names nothing
        for entry in ("proj", "o_projection", "attn.o_proj"):
            with pytest.raises(ValueError, match=rf"recompute='{entry}'") as err:
                apply_checkpointing(model, CheckpointConfig(policy="selective", recompute=("o_proj", entry)))
            listed = str(err.value).split("are: ")[1].split(", ")
            assert listed == ["self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                              "self_attn.o_proj", "mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            # nothing changed: the earlier checkpointing is still installed, no hook added, use_cache kept
            assert [d.mode for d in checkpointing_of(model)] == ["full"] * LAYERS
            assert _hooks(model) == before
            assert model.config.use_cache is True
    finally:
        remove_checkpointing(model)


def test_install_checks_every_block_before_changing_any():
    model = build("lowcost")
    blocks = resolve_blocks(model)
    before = _hooks(model)
    decisions = [Decision("selective", recompute=("o_proj",)), Decision("selective", recompute=("mlp.nothing",))]
    with pytest.raises(ValueError, match="recompute='mlp.nothing'.*model.layers.1"):
        install(blocks, decisions)
    assert all("forward" not in b.__dict__ for _, b in blocks) and _hooks(model) == before
    # a path found in one checkpointed block is fine even if another block lacks it
    del model.model.layers[1].self_attn.o_proj
    model.model.layers[1].self_attn.add_module("out", nn.Identity())
    install(blocks, [Decision("selective", recompute=("o_proj",))] * LAYERS)
    try:
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 1
    finally:
        assert uninstall(blocks) == LAYERS
    assert _hooks(model) == {n: (0, 0) for n in _hooks(model)}

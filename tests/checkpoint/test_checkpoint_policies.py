"""Per-block policies: their decisions, bit-exact gradients on a tiny Llama with LoRA (vs no checkpointing
and vs HF gradient checkpointing, i.e. torch.utils.checkpoint), state_dict keys, selective's zero
recomputed matmuls, sqrt's segments, offload's prefetch."""
import pytest
import torch

from ckpt_models import assert_same, build_llama, llama_grads
from lowcost.checkpoint import (CheckpointConfig, Decision, RecomputeCounter, apply_checkpointing, checkpointing_of,
                                decide, remove_checkpointing, track)


def _modes(policy, n, **kw):
    return [str(d) for d in decide(policy, n, CheckpointConfig(policy=policy, **kw))]


def test_policy_decisions():
    assert _modes("full", 3) == ["full"] * 3
    assert _modes("none", 2) == ["none"] * 2
    assert _modes("every_k", 5, k=2) == ["full", "none", "full", "none", "full"]
    assert _modes("every_k", 4, k=3) == ["full", "none", "none", "full"]
    assert _modes("selective", 2) == ["selective"] * 2
    assert _modes("offload", 2) == ["offload"] * 2
    assert _modes("sqrt", 9) == [f"full[segment {i // 3}]" for i in range(9)]
    segs = [d.segment for d in decide("sqrt", 10)]
    assert segs == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]   # ⌈√10⌉ = 4 segments of ⌈10/4⌉ = 3
    with pytest.raises(ValueError, match="unknown checkpoint policy"):
        decide("most", 3)


@pytest.fixture(scope="module")
def peft_llama():
    return build_llama(peft=True)


@pytest.fixture(scope="module")
def reference(peft_llama):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    return ids, llama_grads(peft_llama, ids)


@pytest.mark.parametrize("policy", ["full", "every_k", "sqrt", "selective", "offload"])
def test_policy_gradients_bit_exact_and_state_dict_unchanged(peft_llama, reference, policy):
    ids, (loss_ref, grads_ref) = reference
    keys = list(peft_llama.state_dict())
    report = apply_checkpointing(peft_llama, CheckpointConfig(policy=policy))
    try:
        assert [d.mode for d in checkpointing_of(peft_llama)] == report.modes()
        assert list(peft_llama.state_dict()) == keys
        loss, grads = llama_grads(peft_llama, ids)
        assert torch.equal(loss, loss_ref)
        assert_same(grads_ref, grads, policy)
    finally:
        assert remove_checkpointing(peft_llama) == sum(m != "none" for m in report.modes())
    assert "forward" not in peft_llama.base_model.model.model.layers[0].__dict__


def test_matches_hf_gradient_checkpointing(peft_llama, reference):
    """HF's gradient checkpointing (torch.utils.checkpoint, non-reentrant) gives the same gradients."""
    ids, (_, grads_ref) = reference
    (getattr(peft_llama, "activation_checkpointing_enable", None) or peft_llama.gradient_checkpointing_enable)()
    try:
        _, grads_hf = llama_grads(peft_llama, ids)
    finally:
        (getattr(peft_llama, "activation_checkpointing_disable", None) or peft_llama.gradient_checkpointing_disable)()
    apply_checkpointing(peft_llama, CheckpointConfig(policy="full"))
    try:
        _, grads = llama_grads(peft_llama, ids)
    finally:
        remove_checkpointing(peft_llama)
    assert_same(grads_hf, grads, "vs HF")
    assert_same(grads_ref, grads_hf, "HF vs none")


@pytest.mark.parametrize("lowcost_lora", [False, True], ids=["peft", "lowcost-lora"])
def test_selective_recomputes_no_matmul_and_saves_less(lowcost_lora, ids):
    model = build_llama(peft=not lowcost_lora, lowcost_lora=lowcost_lora)
    params = list(model.parameters())
    _, grads_ref = llama_grads(model, ids)
    with track(params, hook=True) as plain:
        model(input_ids=ids, labels=ids).loss
    for policy, expect_zero in (("selective", True), ("full", False)):
        apply_checkpointing(model, CheckpointConfig(policy=policy))
        try:
            with track(params, hook=True) as kept:
                torch.manual_seed(5)
                loss = model(input_ids=ids, labels=ids).loss
            model.zero_grad()
            with RecomputeCounter() as counter:
                loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        finally:
            remove_checkpointing(model)
        assert_same(grads_ref, grads, policy)
        assert (counter.count == 0) == expect_zero, f"{policy}: {counter.count} matmuls recomputed"
        assert kept.bytes() < plain.bytes()
        if policy == "selective":
            assert kept.bytes(kinds=["cache"]) > 0


def test_sqrt_keeps_one_input_per_segment(ids):
    model = build_llama(peft=True, layers=4)
    hidden_bytes = ids.numel() * 32 * 4
    counts = {}
    for policy in ("full", "sqrt"):
        apply_checkpointing(model, CheckpointConfig(policy=policy))
        try:
            with track(list(model.parameters())) as kept:
                model(input_ids=ids, labels=ids).loss
        finally:
            remove_checkpointing(model)
        counts[policy] = sum(1 for n, _, kind, _ in kept.storages.values() if kind == "input" and n == hidden_bytes)
    assert counts == {"full": 4, "sqrt": 2}


def _hand_each_layer_a_view(model, detach: bool = False) -> list:
    """Forward pre-hooks that replace each decoder layer's hidden states by a new view of them, as FSDP2's
    pre-forward hook does (``detach``: by a detached alias instead); returns the handles."""
    def hook(module, args, kwargs):
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        alias = hidden.detach() if detach else hidden.view_as(hidden)
        return ((alias,) + tuple(args[1:]) if args else ()), ({**kwargs, "hidden_states": alias} if not args else kwargs)
    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.base_model.model.model.layers]


@pytest.mark.parametrize("detach", [False, True])
def test_sqrt_rederives_a_view_of_the_previous_output(ids, detach):
    """Under FSDP2 the second block of a segment receives a new view of the first block's output. The segment
    must re-derive it like the output itself (2 kept inputs for 4 blocks, not 3), with the same gradients as
    without checkpointing. A detached alias is not the output for autograd, so it is kept (4 inputs)."""
    model = build_llama(peft=True, layers=4)
    handles = _hand_each_layer_a_view(model, detach)
    hidden_bytes = ids.numel() * 32 * 4
    try:
        reference = _grads_or_none(model, ids)
        apply_checkpointing(model, CheckpointConfig(policy="sqrt"))
        try:
            with track(list(model.parameters())) as kept:
                grads = _grads_or_none(model, ids)
        finally:
            remove_checkpointing(model)
    finally:
        for handle in handles:
            handle.remove()
    inputs = sum(1 for n, _, kind, _ in kept.storages.values() if kind == "input" and n == hidden_bytes)
    assert inputs == (4 if detach else 2)   # detached: the second block of each segment keeps its input too
    assert reference.keys() == grads.keys()
    for name, expected in reference.items():   # detached: the blocks before the last alias get no gradient
        assert (expected is None and grads[name] is None) or torch.equal(expected, grads[name]), name


def _grads_or_none(model, ids) -> dict:
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _offload_step(model, ids):
    """One step (RNG seeded as ``llama_grads`` seeds it) under ``offload``: (report, tracker, loss, grads)."""
    report = apply_checkpointing(model, CheckpointConfig(policy="offload"))
    try:
        with track(list(model.parameters())) as kept:
            torch.manual_seed(5)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    finally:
        remove_checkpointing(model)
    return report, kept, loss.detach(), grads


def test_offload_copies_out_and_prefetches_back(peft_llama, reference):
    ids, (_, grads_ref) = reference
    report, kept, _, grads = _offload_step(peft_llama, ids)
    stats = report.offloader.stats
    assert kept.bytes(kinds=["input"]) == 0 and kept.bytes(kinds=["offload"]) == stats["offloaded_bytes"] > 0
    # the last block (recomputed first) copies on demand; each earlier one was prefetched ahead of need
    assert stats["on_demand"] > 0 and stats["prefetched"] >= 3
    assert_same(grads_ref, grads, "offload")


def test_offload_copies_again_an_input_modified_in_place_between_steps():
    """A step reusing the same input tensor object with new contents (a buffer filled in place) must not be
    recomputed from the previous step's host copy."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
    x = torch.randn(4, 8)

    def grads():
        out = x
        for block in blocks:
            out = torch.tanh(block(out))
        return torch.autograd.grad(out.square().sum(), list(blocks.parameters()))

    apply_checkpointing(blocks, CheckpointConfig(policy="offload"))
    try:
        grads()
        x.mul_(3)  # same object, new values: the next step's host copy must be fresh
        actual = grads()
    finally:
        remove_checkpointing(blocks)
    for a, e in zip(actual, grads()):
        assert torch.equal(a, e)


def test_blocks_found_for_gpt2_and_bert_and_lists():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=50, n_positions=16))
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, vocab_size=50))
    assert apply_checkpointing(gpt2).blocks == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert apply_checkpointing(bert, CheckpointConfig(policy="every_k", k=2)).modes() == ["full", "none"]
    ids = torch.randint(0, 50, (2, 8))
    gpt2.train()(input_ids=ids, labels=ids).loss.backward()
    bert(input_ids=ids).last_hidden_state.sum().backward()
    assert remove_checkpointing(gpt2) == 3 and remove_checkpointing(bert) == 1
    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    assert apply_checkpointing(blocks, CheckpointConfig(policy="sqrt")).blocks[2] == "blocks.2"
    assert remove_checkpointing(list(blocks)) == 3
    assert Decision("none").mode == "none"


@pytest.mark.gpu
@pytest.mark.parametrize("lora", ["peft", "lowcost"])
def test_offload_on_cuda_pins_prefetches_and_matches(lora):
    """On a GPU: inputs leave the device for pinned host memory on the side stream, come back prefetched,
    and the gradients equal no checkpointing's (same kernels, same inputs, CUDA RNG replayed)."""
    model = build_llama(peft=lora == "peft", lowcost_lora=lora == "lowcost").cuda()
    ids = torch.randint(0, 64, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    loss_ref, grads_ref = llama_grads(model, ids)
    report, kept, loss, grads = _offload_step(model, ids)
    torch.cuda.synchronize()
    stats = report.offloader.stats
    assert report.offloader.stream is not None
    assert kept.bytes(kinds=["input"]) == 0 and kept.bytes(kinds=["offload"], device_type="cuda") == 0
    assert kept.bytes(kinds=["offload"], device_type="cpu") == stats["offloaded_bytes"] > 0
    hosts = [entry[1] for entry in report.offloader._hosts.values()]
    assert hosts and all(h.is_pinned() for h in hosts)
    assert stats["on_demand"] > 0 and stats["prefetched"] >= 3
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    # PEFT: the same cuBLAS calls on the same inputs (1e-6 leaves room for algorithm choice only). lowcost on a
    # GPU sums dA/dB with fp32 atomics in arbitrary order, so two identical steps differ by rounding (~1e-7).
    rtol, atol = (1e-6, 1e-7) if lora == "peft" else (1e-5, 1e-6)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=name)

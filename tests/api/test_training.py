"""A patched model trains unchanged in a plain loop and in the HF ``Trainer``; ``torch.compile(fullgraph=True)``
traces a patched tiny Llama with 0 graph breaks."""
from __future__ import annotations

import torch

import lowcost
from lowcost.patch import lora_layers
from tiny_models import SEQ, VOCAB, llama


def test_plain_loop_with_dropout_learns():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_steps(tmp_path):
    from transformers import Trainer, TrainingArguments
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.05))
    frozen = model.model.embed_tokens.weight.detach().clone()
    before = {n: layer.lora_B.detach().clone() for n, layer in lora_layers(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    result = Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert torch.equal(model.model.embed_tokens.weight, frozen)
    assert any(not torch.equal(layer.lora_B, before[n]) for n, layer in lora_layers(model).items())


def test_compile_fullgraph_has_no_graph_breaks():
    import torch._dynamo as dynamo
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, dropout=0.05))
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    dynamo.reset()
    explanation = dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager = model(input_ids=ids, labels=ids)
    out = compiled(input_ids=ids, labels=ids)
    assert out.logits is None and eager.logits is None          # the fused loss (lowcost.apply's default)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    model.train()
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(layer.lora_A.grad is not None for layer in lora_layers(model).values())
    dynamo.reset()

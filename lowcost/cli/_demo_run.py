"""The two runs of ``lowcost demo`` and its table. Both runs share the model weights as loaded, the text,
the LoRA rank and alpha, the dropout, the steps, the sequences per step, the learning-rate schedule and the
data order (``_train.Batches`` with one seed); they differ in the LoRA implementation, the checkpointing and
the tokenizer (lowcost adds domain words, so its sequences of the same token count cover more text)."""
from __future__ import annotations

import copy
import dataclasses
import platform
from pathlib import Path

import torch

from lowcost.cli import CLIError
from lowcost.cli._demo_corpus import cut, domain_words, lee_documents, smollm2_gguf
from lowcost.cli._encode import collate, pad_id, sequences
from lowcost.cli._measure import (SavedBytes, peak_meter, hardware, mib, optimizer_state_bytes, resident_weight_bytes,
                                  trainable)
from lowcost.cli._train import Batches, History, Plan, evaluate, make_optimizer, run as run_steps
from lowcost.cli.demo import TRACED_STEPS, Arm, dumps

PEFT_NAME = "PEFT LoRA + HF checkpointing"
LOWCOST_NAME = "lowcost"


class Text:
    """The corpus split, and its batches for one tokenizer."""

    def __init__(self, settings: dict):
        documents = lee_documents()
        held = settings["held_out"]
        if held >= len(documents):
            raise CLIError(f"--held-out {held}: the corpus has only {len(documents)} stories")
        self.train = documents[:-held]
        self.held = [cut(doc, 4 * settings["seq_len"]) for doc in documents[-held:]]
        self.settings = settings

    def batches(self, tokenizer, seed: int) -> tuple[Batches, list]:
        seq_len, batch = self.settings["seq_len"], self.settings["batch"]
        needed = max(1, self.settings["steps"]) * batch * seq_len * 2      # tokens: twice what the steps read
        train, chars = [], 0
        for doc in self.train:                                              # tokenize only what can be read
            train.append(doc)
            chars += len(doc)
            if chars > 4 * needed:
                break
        windows, _ = sequences(train, "text", tokenizer, seq_len)
        held, _ = sequences(self.held, "text", tokenizer, seq_len)
        pad = pad_id(tokenizer)
        return Batches(windows, batch, seed, pad), [collate(held[i:i + batch], pad) for i in range(0, len(held), batch)]


def _train(arm: Arm, model, batches: Batches, settings: dict, args, dev, hf_checkpointing: bool) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    steps = settings["steps"]
    plan = Plan(total_steps=steps, lr=args.lr, warmup=1 if steps > 2 else 0)
    optimizer, scheduler = make_optimizer(params, plan)

    def first_forward(forward):
        with SavedBytes(model, hf_checkpointing=hf_checkpointing) as saved:
            loss = forward()
        arm.saved_bytes = saved.bytes
        return loss

    torch.manual_seed(args.seed + 1)              # the same dropout stream for both runs
    history = History()
    traced = min(TRACED_STEPS, steps)             # by step 2 the optimizer state exists: the steady peak
    with peak_meter(dev) as peak:
        run_steps(model, params, batches, dataclasses.replace(plan, total_steps=traced), optimizer, scheduler, dev,
                  history, first_forward=first_forward, label=f"{arm.name} (memory traced)")
    if steps > traced:
        run_steps(model, params, batches, plan, optimizer, scheduler, dev, history, start_step=traced, label=arm.name)
    arm.peak_bytes = peak.bytes if steps else None
    arm.step_seconds, arm.losses = history.seconds, history.loss
    arm.optimizer_bytes = optimizer_state_bytes(optimizer)
    arm.trainable, arm.total = trainable(model)
    arm.weight_bytes = resident_weight_bytes(model)


def _after(arm: Arm, model, held: list, dev, steps: int) -> None:
    arm.after = evaluate(model, held, dev, progress=f"{arm.name}: held-out after") if steps else arm.step0


def peft_arm(model, tokenizer, text: Text, settings: dict, args, dev, before: dict) -> Arm:
    """(a) PEFT LoRA on every linear layer of the blocks + transformers' gradient checkpointing."""
    from peft import LoraConfig, get_peft_model
    arm = Arm(PEFT_NAME, before=before, step0=before, checkpointing="transformers (torch.utils.checkpoint, "
              "non-reentrant), every block")
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.dropout,
                                             target_modules="all-linear"))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False
    batches, held = text.batches(tokenizer, args.seed)
    _train(arm, model, batches, settings, args, dev, hf_checkpointing=True)
    _after(arm, model, held, dev, settings["steps"])
    return arm


def lowcost_arm(model, tokenizer, text: Text, settings: dict, args, dev, before: dict, checkpoint) -> Arm:
    """(b) domain tokens (sub-token mean), the base quantized (--quantize nf4/int8; a gguf model comes
    quantized), then fused LoRA and lowcost's checkpointing in one apply."""
    from lowcost.api import LoRAConfig, apply
    from lowcost.quant import quantize
    from lowcost.warmstart import add_tokens
    arm = Arm(LOWCOST_NAME, before=before, checkpointing=f"lowcost {checkpoint.policy}",
              quantized=args.quantize or "")
    words = domain_words(text.train, tokenizer, settings["new_tokens"]) if settings["new_tokens"] else []
    if words:
        arm.new_tokens = add_tokens(model, tokenizer, words).total("added")
    if args.quantize in ("nf4", "int8"):
        quantize(model, args.quantize)                  # every linear layer but the output head, in place
    batches, held = text.batches(tokenizer, args.seed)
    changed = " and ".join(w for w, on in (("the new tokens", words), (f"the {args.quantize} base", args.quantize))
                           if on)
    arm.step0 = evaluate(model, held, dev, progress=f"lowcost: held-out with {changed}") if changed else before
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=args.dropout, targets="all-linear")
    first = {k: v.to(dev) for k, v in batches.micro(0).items() if k != "chars"}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        apply(model, lora=lora, checkpoint=checkpoint, profile_step=lambda: model(**first).loss)
    _train(arm, model, batches, settings, args, dev, hf_checkpointing=False)
    _after(arm, model, held, dev, settings["steps"])
    return arm


def compare(args, settings: dict, dev, checkpoint) -> dict:
    from lowcost.cli._options import load_model
    gguf = smollm2_gguf()
    text = Text(settings)
    model, tokenizer = load_model(str(gguf), "float32", dev)
    _, held = text.batches(tokenizer, args.seed)
    before = evaluate(model, held, dev, progress="held-out before (original model)")
    peft = peft_arm(copy.deepcopy(model), tokenizer, text, settings, args, dev, before)
    if args.quantize == "gguf":                          # the lowcost run keeps the file's blocks
        model = load_model(str(gguf), "float32", dev, quantize="gguf")[0]
    ours = lowcost_arm(model, tokenizer, text, settings, args, dev, before, checkpoint)
    base = {None: "dequantised to float32", "gguf": "lowcost's run keeps its Q4_1 blocks"}.get(
        args.quantize, f"dequantised to float32; lowcost's run quantizes it to {args.quantize}")
    return {"settings": {**settings, "lr": args.lr, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r,
                         "dropout": args.dropout, "checkpoint": checkpoint.policy, "seed": args.seed,
                         "quick": args.quick, "quantize": args.quantize},
            "model": f"SmolLM2-135M-Instruct ({gguf.name}, {base})",
            "text": f"gensim Lee news corpus: {len(text.train)} stories for training, {len(text.held)} held out "
                    f"(each cut to {4 * settings['seq_len']} characters)",
            "hardware": hardware(dev), "torch": torch.__version__, "python": platform.python_version(),
            "arms": [peft, ours]}


def _ratio(ours, theirs) -> str:
    return f"{ours / theirs:.2f}×" if ours is not None and theirs else "—"


def _nats(result: dict) -> str:
    return f"{result['nats_per_char']:.4f}" if result else "—"


def _before(ours: Arm) -> str:
    changes = " and ".join(w for w, on in (("the new tokens", ours.new_tokens), (f"the {ours.quantized} base",
                                                                                ours.quantized)) if on)
    return f"{_nats(ours.before)} → {_nats(ours.step0)} with {changes}" if changes else _nats(ours.step0)


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    peft, ours = result["arms"]
    steps = result["settings"]["steps"]
    size = lambda n: mib(n) if n is not None else "— (no step ran)"  # noqa: E731
    seconds = lambda s: f"{s:.2f} s" if s is not None else "— (no step ran)"  # noqa: E731
    rows = [
        ["trainable parameters", f"{peft.trainable:,}", f"{ours.trainable:,}", _ratio(ours.trainable, peft.trainable)],
        ["optimizer state (AdamW)", size(peft.optimizer_bytes if steps else None),
         size(ours.optimizer_bytes if steps else None), _ratio(ours.optimizer_bytes, peft.optimizer_bytes)],
        ["saved activations, one step", size(peft.saved_bytes), size(ours.saved_bytes),
         _ratio(ours.saved_bytes, peft.saved_bytes)],
        ["peak memory of training above the weights", size(peft.peak_bytes), size(ours.peak_bytes),
         _ratio(ours.peak_bytes, peft.peak_bytes)],
        ["step time (median)", seconds(peft.step_time()), seconds(ours.step_time()),
         _ratio(ours.step_time(), peft.step_time())],
        ["held-out nats/char, before (step 0)", _nats(peft.step0), _before(ours), ""],
        [f"held-out nats/char, after {steps} steps", _nats(peft.after) if steps else "— (no step ran)",
         _nats(ours.after) if steps else "— (no step ran)", ""],
        ["new tokens", "0", str(ours.new_tokens), ""],
        ["model weights, resident (base + adapters)", mib(peft.weight_bytes), mib(ours.weight_bytes) +
         (f" ({ours.quantized} base)" if ours.quantized else ""), _ratio(ours.weight_bytes, peft.weight_bytes)],
    ]
    return ["", PEFT_NAME, LOWCOST_NAME, "lowcost / PEFT"], rows


def render(header: list[str], rows: list[list[str]], result: dict) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    s = result["settings"]
    load = " / ".join(f"{a:.1f}" for a in (result["load_average_start"][0], result["load_average_end"][0]))
    notes = [f"{result['model']}; {result['text']}.",
             f"Both runs: LoRA r={s['lora_r']} alpha={s['lora_alpha']} dropout {s['dropout']} on every linear layer "
             f"of the blocks, {s['steps']} steps of {s['batch']}×{s['seq_len']} tokens, AdamW lr {s['lr']:g} "
             f"(warm-up, cosine), seed {s['seed']}; lowcost checkpointing: {s['checkpoint']}.",
             "nats/char = held-out negative log-likelihood per character of text, comparable across tokenizers; "
             "peak memory over the first " + f"{TRACED_STEPS} steps: " + ("CUDA max allocated" if "CUDA" in
             result["hardware"] else "torch's CPU allocator, from the profiler's allocation records") + "; step "
             "time: the median of the steps after those (the last step's when no other ran).",
             f"{result['hardware']}; torch {result['torch']}; wall time {result['wall_seconds']:.0f} s; "
             f"1-min load average at start / end {load}."]
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), ""] + notes)


def write(out: Path, header: list[str], rows: list[list[str]], result: dict) -> None:
    from lowcost.cli._plots import loss_curve, table as table_png
    from lowcost.cli._rundir import write_file
    result = {**result, "table": {"header": header, "rows": rows}}
    write_file(out / "demo.json", dumps(result))
    table_png(out / "demo_table.png", header, rows, f"lowcost demo ({result['hardware']})")
    curves = {arm.name: (list(range(1, len(arm.losses) + 1)), arm.losses) for arm in result["arms"]}
    loss_curve(out / "demo_loss.png", curves, {},
               "lowcost demo: SmolLM2-135M on Lee news (training loss per token; the tokenizers differ)")
    print(f"wrote {out / 'demo.json'}, {out / 'demo_table.png'}, {out / 'demo_loss.png'}")

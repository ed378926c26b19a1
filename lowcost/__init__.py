"""lowcost: cheaper fine-tuning for PyTorch — fused LoRA kernels, warm starts, our own checkpointing.

``import lowcost`` never fails because the compiled extension is missing: it warns once and the
pure-torch / Triton paths are used.
"""
from lowcost import _extension  # noqa: F401  (loads lowcost._C when built)
from lowcost import ops
from lowcost.nn import LoRAEmbedding, LoRALinear
from lowcost.ops import lora_embedding, lora_linear
from lowcost.checkpoint import entry as checkpoint  # callable: lowcost.checkpoint(fn, *args)
from lowcost.checkpoint import CheckpointConfig
from lowcost.api import (LoRAConfig, accelerate_peft, active_adapters, add_adapter, apply, delete_adapter,
                         disable_adapter, load_adapter, merge, save_adapter, set_adapter, unapply)
from lowcost import warmstart
from lowcost.quant import QuantReport, export_gguf, quantize
from lowcost.models import load_pretrained, load_tokenizer

__version__ = "0.1.0"
__all__ = ["ops", "lora_linear", "lora_embedding", "LoRALinear", "LoRAEmbedding", "__version__", "LoRAConfig",
           "apply", "unapply", "save_adapter", "load_adapter", "merge", "accelerate_peft", "add_adapter",
           "set_adapter", "active_adapters", "delete_adapter", "disable_adapter", "warmstart", "load_pretrained",
           "load_tokenizer", "checkpoint", "CheckpointConfig", "quantize", "export_gguf", "QuantReport"]

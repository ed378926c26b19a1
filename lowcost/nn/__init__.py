"""Modules whose forward is one op call, holding one or more named LoRA adapters (``lowcost.nn.adapters``)."""
from lowcost.nn.adapters import AdapterSpec, LoRAAdapter
from lowcost.nn.lora_embedding import LoRAEmbedding
from lowcost.nn.lora_gated_mlp import LoRAGatedMLP
from lowcost.nn.lora_linear import LoRALinear
from lowcost.nn.fused_layer_norm import FusedLayerNorm
from lowcost.nn.fused_rms_norm import FusedRMSNorm
from lowcost.nn.quantized import QuantizedEmbedding, QuantizedLinear

__all__ = ["LoRALinear", "LoRAEmbedding", "LoRAGatedMLP", "LoRAAdapter", "AdapterSpec", "QuantizedLinear",
           "QuantizedEmbedding", "FusedRMSNorm", "FusedLayerNorm"]

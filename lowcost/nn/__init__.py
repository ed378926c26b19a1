"""Modules whose forward is one op call."""
from lowcost.nn.lora_linear import LoRALinear

__all__ = ["LoRALinear"]

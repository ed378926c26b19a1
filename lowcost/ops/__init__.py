"""Dispatcher-registered ops with autograd. The only layer that picks a backend (``lowcost.ops.backend``)."""
from lowcost.ops.backend import BACKENDS, resolve_backend
from lowcost.ops.layer_norm import layer_norm
from lowcost.ops.linear_cross_entropy import linear_cross_entropy
from lowcost.ops.lora_embedding import lora_embedding
from lowcost.ops.lora_gated_mlp import lora_gated_mlp
from lowcost.ops.lora_grouped_linear import lora_grouped_linear
from lowcost.ops.lora_linear import lora_linear
from lowcost.ops.qlinear_cross_entropy import qlinear_cross_entropy
from lowcost.ops.qlora_gated_mlp import qlora_gated_mlp
from lowcost.ops.qlora_grouped_linear import qlora_grouped_linear
from lowcost.ops.qlora_linear import qlora_linear, quantized_linear
from lowcost.ops.rms_norm import rms_norm
from lowcost.ops.autocast import register as _register_autocast_rules

_register_autocast_rules()  # after every op above is defined

__all__ = ["lora_linear", "lora_embedding", "linear_cross_entropy", "lora_gated_mlp", "lora_grouped_linear",
           "qlinear_cross_entropy", "qlora_gated_mlp", "qlora_grouped_linear", "qlora_linear",
           "quantized_linear", "rms_norm", "layer_norm", "resolve_backend", "BACKENDS"]

"""Pure-torch ground truth for every kernel family; also the CPU fallback."""
from lowcost.reference.lora_embedding import lora_embedding_backward, lora_embedding_forward
from lowcost.reference.lora_linear import lora_linear_backward, lora_linear_forward
from lowcost.reference.philox import apply_dropout, dropout_keep_mask, dropout_threshold, keep_scale

__all__ = ["lora_linear_forward", "lora_linear_backward", "lora_embedding_forward", "lora_embedding_backward",
           "apply_dropout", "dropout_keep_mask", "dropout_threshold", "keep_scale"]

"""Quantized frozen weights, pure torch: the formats' math (quantize / dequantize) and ``QuantizedWeight``.

Ground truth for the dequantizing kernels, and the CPU path. NF4 and int8 (``nf4``, ``int8``), GGUF blocks as
they are in the file (``gguf_blocks``); fixed code books in ``codebooks``.
"""
from lowcost.reference.quant.codebooks import NF4_VALUES, dynamic_map, nf4_code
from lowcost.reference.quant.gguf_blocks import BLOCK_TYPES, row_bytes
from lowcost.reference.quant.int8 import quantize_int8
from lowcost.reference.quant.nf4 import NF4_BLOCK_SIZES, padded_width, quantize_nf4
from lowcost.reference.quant.weight import (FORMATS, QuantizedWeight, dequantize_packed, quant_format,
                                            workspace_elements)

__all__ = ["NF4_VALUES", "dynamic_map", "nf4_code", "BLOCK_TYPES", "row_bytes", "quantize_int8", "NF4_BLOCK_SIZES",
           "padded_width", "quantize_nf4", "FORMATS", "QuantizedWeight", "dequantize_packed", "quant_format",
           "workspace_elements"]

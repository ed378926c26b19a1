"""Quantized frozen weights: ``quantize`` (NF4 / int8 in place), GGUF blocks kept as in the file, export.

The formats' math and ``QuantizedWeight`` live in ``lowcost.reference.quant``; the frozen layers
(``QuantizedLinear``, ``QuantizedEmbedding``) in ``lowcost.nn``. This layer swaps them into models, reports
bytes, and writes GGUF files back (``export_gguf``).
"""
from lowcost.nn.quantized import QuantizedEmbedding, QuantizedLinear, is_quantized
from lowcost.quant.export_gguf import export_gguf
from lowcost.quant.quantize_model import quantize, quantize_weight
from lowcost.quant.report import QuantizedModule, QuantReport
from lowcost.reference.quant import QuantizedWeight

__all__ = ["quantize", "export_gguf", "quantize_weight", "QuantReport", "QuantizedModule", "QuantizedWeight", "QuantizedLinear",
           "QuantizedEmbedding", "is_quantized"]

"""Quantized module twins."""

from adaround.nn.quant_layer import QUANTIZABLE, QuantLayer, apply_layer

__all__ = ["QUANTIZABLE", "QuantLayer", "apply_layer"]

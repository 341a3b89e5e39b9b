"""Layer-wise reconstruction: cache a layer's inputs and targets, optimise its rounding."""

from adaround.reconstruct.cache import collect_layer_data
from adaround.reconstruct.loop import LayerResult, adaround_layer

__all__ = ["LayerResult", "adaround_layer", "collect_layer_data"]

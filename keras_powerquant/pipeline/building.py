"""Stage 6, building: the PowerQuant Keras model of a fitted plan."""

import dataclasses
from typing import Any

import numpy as np

from keras_powerquant.converter.builder import ModelBuilder
from keras_powerquant.converter.registry import linear_type


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """The converted model.

    Attributes:
        model: the PowerQuant `keras.Model`.
        quantized_layers: `id(original layer)` -> its PowerQuant layer in `model`.
        reused: names of the float layers reused as they are (their config
            does not round-trip).
    """

    model: Any
    quantized_layers: dict
    reused: list


def build(request, analysis, plan):
    """The `BuiltModel` of `plan` (the analysed plan, or refinement's)."""
    if request.bias_correction is not None:
        _give_every_layer_a_bias(plan)
    builder = ModelBuilder(analysis.graph, analysis.folds, plan, request.config.per_channel, analysis.nested_plan)
    model = builder.build()
    return BuiltModel(model, builder.quantized_layers, list(builder.reused))


def _give_every_layer_a_bias(plan):
    """A corrected layer needs a bias to hold the correction: zeros where it had none."""
    for layer_plan in plan.layers.values():
        if layer_plan.bias is None:
            channels = linear_type(layer_plan.layer).output_channels(layer_plan.kernel.shape)
            layer_plan.bias = np.zeros(channels, dtype=np.float32)

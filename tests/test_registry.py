"""The registry of linear layer types agrees with the Keras and PowerQuant layers it names."""

import keras
import numpy as np
import pytest

from keras_powerquant.converter.registry import LINEAR_LAYER_TYPES
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.registry import LinearLayerType

L = keras.layers

# One small instance of each registered class, with an input it accepts.
_EXAMPLES = {
    L.Dense: (lambda: L.Dense(3), (2, 5)),
    L.Conv1D: (lambda: L.Conv1D(3, 2), (2, 6, 4)),
    L.Conv2D: (lambda: L.Conv2D(6, 2, strides=2, padding="same", groups=2), (2, 6, 6, 4)),
    L.Conv3D: (lambda: L.Conv3D(3, 2), (2, 4, 4, 4, 2)),
    L.DepthwiseConv1D: (lambda: L.DepthwiseConv1D(3, depth_multiplier=2), (2, 6, 4)),
    L.DepthwiseConv2D: (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (2, 6, 6, 4)),
}


def test_every_entry_has_an_example():
    assert set(_EXAMPLES) == {entry.keras_class for entry in LINEAR_LAYER_TYPES}


@pytest.mark.parametrize("entry", LINEAR_LAYER_TYPES, ids=lambda e: e.keras_class.__name__)
def test_entry_matches_its_layers(entry):
    make, shape = _EXAMPLES[entry.keras_class]
    layer = make()
    outputs = layer(np.zeros(shape, np.float32))
    kernel_shape = tuple(layer.kernel.shape)
    # The layout's output channels are the layer's output channels.
    assert entry.output_channels(kernel_shape) == outputs.shape[entry.channel_axis(layer, len(outputs.shape))]
    assert entry.channels_last(layer)
    assert entry.float_reason(layer) is None
    if entry.quantized_class is None:
        return
    assert entry.quantized_class.channel_ndim == entry.channel_ndim
    quantized = entry.quantized_class(weight_bits=8, **entry.quantized_arguments(layer))
    quantized_outputs = quantized(np.zeros(shape, np.float32))
    assert quantized._kernel_shape == kernel_shape
    assert quantized_outputs.shape == outputs.shape


def test_channel_axis_follows_data_format():
    entry = linear_type(L.Conv2D(2, 1, data_format="channels_first"))
    layer = L.Conv2D(2, 1, data_format="channels_first")
    assert entry.channel_axis(layer, 4) == 1
    assert not entry.channels_last(layer)
    dense = L.Dense(2)
    assert linear_type(dense).channel_axis(dense, 3) == 2


def test_exact_types_only():
    class MyDense(L.Dense):
        pass

    assert linear_type(MyDense(2)) is None
    assert linear_type(L.BatchNormalization()) is None
    assert linear_type(L.Dense(2)).layout == "dense"


def test_groups_and_zero_padding():
    conv = L.Conv2D(4, 3, padding="same", groups=2)
    assert linear_type(conv).groups(conv) == 2
    assert linear_type(conv).pads_input(conv)
    depthwise = L.DepthwiseConv2D(3, padding="valid")
    assert linear_type(depthwise).groups(depthwise) == 1
    assert not linear_type(depthwise).pads_input(depthwise)
    # A 1x1 "same" convolution reads no padding; a causal one with a window does.
    pointwise = L.Conv2D(4, 1, strides=2, padding="same")
    assert not linear_type(pointwise).pads_input(pointwise)
    causal = L.Conv1D(4, 2, padding="causal")
    assert linear_type(causal).pads_input(causal)
    assert not linear_type(L.Dense(3)).pads_input(L.Dense(3))


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="Unknown layout"):
        LinearLayerType(L.Dense, "transposed")

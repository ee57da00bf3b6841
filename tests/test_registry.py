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
    L.Conv2DTranspose: (lambda: L.Conv2DTranspose(3, 2, strides=2, output_padding=1), (2, 5, 5, 4)),
    L.EinsumDense: (lambda: L.EinsumDense("abc,dc->abd", (None, 3), bias_axes="d"), (2, 5, 4)),
}


def test_every_entry_has_an_example():
    assert set(_EXAMPLES) == {entry.keras_class for entry in LINEAR_LAYER_TYPES}


@pytest.mark.parametrize("entry", LINEAR_LAYER_TYPES, ids=lambda e: e.keras_class.__name__)
def test_entry_matches_its_layers(entry):
    make, shape = _EXAMPLES[entry.keras_class]
    layer = make()
    outputs = layer(np.zeros(shape, np.float32))
    # The kernel in the entry's layout (output channels last); its output channels are the layer's.
    kernel_shape = entry.stored_kernel(layer, layer.kernel.numpy()).shape
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


@pytest.mark.parametrize(
    "equation, output_shape, bias_axes, input_shape",
    [
        ("abcd,dce->abe", (None, 5), "e", (2, 6, 3, 4)),  # contracted letters in the other order
        ("abc,ced->abde", (None, 3, 5), "e", (2, 6, 4)),  # output letters in the other order
        ("...cd,cde->...e", 5, "e", (2, 7, 6, 3, 4)),
        ("abc,cde->abde", (None, 3, 5), "d", (2, 6, 4)),  # a bias broadcast over the last axis
    ],
)
def test_einsum_over_several_axes_is_a_dense_on_flattened_axes(equation, output_shape, bias_axes, input_shape):
    """The converter's kernel is `(in, out)` on the flattened trailing axes, in input and output order."""
    layer = L.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(input_shape).astype("float32")
    layer.build(input_shape)
    layer.kernel.assign(rng.standard_normal(layer.kernel.shape))
    layer.bias.assign(rng.standard_normal(layer.bias.shape))
    outputs = layer(x).numpy()
    entry = linear_type(layer)
    assert entry.float_reason(layer) is None
    kernel = entry.stored_kernel(layer, layer.kernel.numpy())
    bias = entry.stored_bias(layer, layer.bias.numpy())
    rows, columns = kernel.shape
    leading = outputs.shape[: outputs.ndim - (2 if len(equation.split("->")[1].lstrip(".")) == 4 else 1)]
    flat_inputs = x.reshape(leading + (rows,))
    np.testing.assert_allclose((flat_inputs @ kernel + bias).reshape(outputs.shape), outputs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(entry.keras_kernel(layer, kernel), layer.kernel.numpy())
    assert entry.output_channels(kernel.shape) == columns == int(np.prod(outputs.shape[len(leading) :]))
    # The PowerQuant layer holds the same kernel in its own axes, and a bias on every output channel.
    quantized = entry.quantized_class(weight_bits=8, use_bias=True, **entry.quantized_arguments(layer))
    quantized(x)
    assert quantized._kernel_shape == entry.quantized_kernel(layer, kernel).shape
    assert tuple(quantized.bias.shape) == entry.quantized_bias(layer, bias).shape
    np.testing.assert_array_equal(entry.converter_kernel(layer, entry.quantized_kernel(layer, kernel)), kernel)

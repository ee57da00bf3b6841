"""SeparableConv2D as the two layers it computes: a depthwise then a pointwise convolution.

`keras.layers.SeparableConv2D` computes `act(pointwise(depthwise(x)) + b)`:
a `DepthwiseConv2D` (its strides, padding and dilation, no bias) followed by
a 1x1 `Conv2D` (its filters, bias and activation); TensorFlow's own
`separable_conv2d` runs exactly these two ops. The flat graph shows each
SeparableConv2D call as those two layers, so every stage of the converter
(planning, weight fits, BatchNorm folding into the pointwise part,
statistics, bias correction, refinement) handles them as it handles any
depthwise and 1x1 convolution: each kernel gets its own exponent and scales.
The float layers are named `<name>_depthwise` and `<name>_pointwise`, so the
report says where each part came from.

The tensor between the two is an ordinary tensor of the plan: like every
input of a quantized layer, it is quantized at the activation bit width
(as TFLite's converter does when it splits a separable convolution).
"""

import keras

L = keras.layers

DEPTHWISE_SUFFIX = "_depthwise"
POINTWISE_SUFFIX = "_pointwise"


def is_separable(layer):
    """Whether the flat graph splits this layer (exact type, as everywhere in the converter)."""
    return type(layer) is L.SeparableConv2D


def split_layers(layer):
    """The float `(DepthwiseConv2D, Conv2D)` pair that computes what `layer` does, unbuilt.

    Args:
        layer: a `keras.layers.SeparableConv2D`.
    """
    config = layer.get_config()
    shared = {key: config[key] for key in ("data_format", "dtype", "trainable")}
    depthwise = L.DepthwiseConv2D(
        kernel_size=config["kernel_size"],
        strides=config["strides"],
        padding=config["padding"],
        depth_multiplier=config["depth_multiplier"],
        dilation_rate=config["dilation_rate"],
        use_bias=False,
        name=layer.name + DEPTHWISE_SUFFIX,
        **shared,
    )
    pointwise = L.Conv2D(
        filters=config["filters"],
        kernel_size=1,
        activation=config["activation"],
        use_bias=config["use_bias"],
        name=layer.name + POINTWISE_SUFFIX,
        **shared,
    )
    return depthwise, pointwise


def set_split_weights(layer, depthwise, pointwise):
    """Copies `layer`'s kernels (and bias) into its built split layers."""
    depthwise.set_weights([keras.ops.convert_to_numpy(layer.depthwise_kernel)])
    weights = [keras.ops.convert_to_numpy(layer.pointwise_kernel)]
    if layer.use_bias:
        weights.append(keras.ops.convert_to_numpy(layer.bias))
    pointwise.set_weights(weights)


class SeparableSplitter:
    """Replaces each call of a SeparableConv2D by calls of its split layers.

    A layer called several times is split once and its two layers are
    called as often, so they stay shared, as the original was.
    """

    def __init__(self):
        self._pairs = {}

    def __call__(self, layer, input_tensor):
        """Calls the split layers of `layer` on a new symbolic input like `input_tensor`.

        The new input has no Keras history, so the original model's layers
        gain no outbound nodes.

        Returns:
            `(input, [depthwise, pointwise])`: the new symbolic input and the
            split layers, whose last inbound nodes are these calls.
        """
        first_call = id(layer) not in self._pairs
        if first_call:
            self._pairs[id(layer)] = split_layers(layer)
        depthwise, pointwise = self._pairs[id(layer)]
        inputs = keras.KerasTensor(input_tensor.shape, dtype=input_tensor.dtype)
        pointwise(depthwise(inputs))
        if first_call:
            set_split_weights(layer, depthwise, pointwise)
        return inputs, [depthwise, pointwise]

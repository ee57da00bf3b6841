"""The linear layer types the converter knows: one `LinearLayerType` per Keras class.

An entry states everything the converter needs about a layer type: its
kernel layout, the PowerQuant layer that replaces it, the config keys that
layer takes over, the channel axis a BatchNorm must normalize to fold into
it (from after it, or from before it where the layer reads no zero
padding: see `converter/folding.py`), and why a given instance stays
float. Adding a layer type is one entry here (plus its PowerQuant layer).

Kernel layouts (the `layout` strings of `keras_powerquant.quantization`'s
folding, statistics and bias correction):

- "dense": `(in, out)`; one output channel per column.
- "conv": `(*spatial, in // groups, out)` (Conv1D/2D/3D); the last axis is
  the output channel, the one before it the input channel within its group
  (output channel `o` reads input group `o // (out // groups)`).
- "depthwise": `(*spatial, in, multiplier)`; output channel
  `i * multiplier + j` uses slice `[..., i, j]`, so the two trailing axes
  together are the output channels.

Exact types are matched (not subclasses): a subclass may override `call`,
and then folding or replacing it would change what the model computes.
"""

import dataclasses
import math
from typing import Callable
from typing import Optional

import keras

from keras_powerquant.layers import PowerQuantConv1D
from keras_powerquant.layers import PowerQuantConv2D
from keras_powerquant.layers import PowerQuantConv3D
from keras_powerquant.layers import PowerQuantDense
from keras_powerquant.layers import PowerQuantDepthwiseConv2D
from keras_powerquant.quantization.layouts import check_layout
from keras_powerquant.quantization.layouts import OUTPUT_CHANNEL_NDIM

L = keras.layers

# Config keys of the convolutions that PowerQuant layers take over.
_WINDOW_KEYS = ("kernel_size", "strides", "padding", "data_format", "dilation_rate")
_CONV_KEYS = ("filters", "groups") + _WINDOW_KEYS


def data_format_channel_axis(layer, rank):
    """Channel axis of a layer's output of `rank` dims: 1 for channels_first, else the last."""
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


@dataclasses.dataclass(frozen=True)
class LinearLayerType:
    """What the converter knows about one Keras linear layer class.

    Attributes:
        keras_class: the Keras layer class (matched exactly).
        layout: kernel layout, one of "dense", "conv", "depthwise" (see the
            module docstring).
        quantized_class: the `QuantizedKernelLayer` subclass that replaces
            it, or None: a following BatchNorm folds into it, but it stays
            a float layer.
        config_keys: keys of the Keras layer's `get_config()` passed to
            `quantized_class` (besides the arguments every quantized layer
            takes: bits, exponent, activation, use_bias...).
        channel_axis: `channel_axis(layer, rank)`: the axis of the layer's
            rank-`rank` output that holds its output channels; a following
            BatchNorm folds into the layer only if it normalizes that axis.
        float_reason: `float_reason(layer)`: why this instance cannot be
            quantized (e.g. a configuration the PowerQuant layer lacks), or
            None.
    """

    keras_class: type
    layout: str
    quantized_class: Optional[type] = None
    config_keys: tuple = ()
    channel_axis: Callable = data_format_channel_axis
    float_reason: Callable = lambda layer: None  # noqa: E731 - every instance is quantized

    def __post_init__(self):
        check_layout(self.layout)

    @property
    def channel_ndim(self):
        """How many trailing kernel axes index output channels."""
        return OUTPUT_CHANNEL_NDIM[self.layout]

    def output_channels(self, kernel_shape):
        """Number of output channels of a kernel of shape `kernel_shape`."""
        return math.prod(kernel_shape[len(kernel_shape) - self.channel_ndim :])

    def channels_last(self, layer):
        """Whether the layer's outputs (and inputs) hold channels on the last axis."""
        # Rank 3 tells the last axis (2) from the first non-batch one (1).
        return self.channel_axis(layer, 3) == 2

    def groups(self, layer):
        """Channel groups of the layer's kernel (1 but for grouped convolutions)."""
        return getattr(layer, "groups", 1) if self.layout == "conv" else 1

    def pads_input(self, layer):
        """Whether some output reads zero padding around the input ("same"/"causal" with a window > 1)."""
        if self.layout == "dense" or layer.padding == "valid":
            return False
        return any(k > 1 for k in layer.kernel_size)

    def quantized_arguments(self, layer):
        """The `config_keys` arguments of `quantized_class`, from the layer's config."""
        config = layer.get_config()
        return {key: config[key] for key in self.config_keys}


LINEAR_LAYER_TYPES = (
    LinearLayerType(L.Dense, "dense", PowerQuantDense, ("units",)),
    LinearLayerType(L.Conv1D, "conv", PowerQuantConv1D, _CONV_KEYS),
    LinearLayerType(L.Conv2D, "conv", PowerQuantConv2D, _CONV_KEYS),
    LinearLayerType(L.Conv3D, "conv", PowerQuantConv3D, _CONV_KEYS),
    LinearLayerType(L.DepthwiseConv1D, "depthwise"),
    LinearLayerType(L.DepthwiseConv2D, "depthwise", PowerQuantDepthwiseConv2D, ("depth_multiplier",) + _WINDOW_KEYS),
)
_BY_CLASS = {entry.keras_class: entry for entry in LINEAR_LAYER_TYPES}


def linear_type(layer):
    """The layer's `LinearLayerType` (exact class match), or None."""
    return _BY_CLASS.get(type(layer))


def quantized_classes():
    """The PowerQuant layer classes of all entries, in registry order."""
    return tuple(e.quantized_class for e in LINEAR_LAYER_TYPES if e.quantized_class is not None)

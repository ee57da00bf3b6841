"""The linear layer types the converter knows: one `LinearLayerType` per Keras class.

An entry states everything the converter needs about a layer type: its
kernel layout, the PowerQuant layer that replaces it, the config keys that
layer takes over, the channel axis a BatchNorm must normalize to fold into
it (from after it, or from before it where the layer reads no zero
padding: see `converter/folding.py`), and why a given instance stays
float. Adding a layer type is one entry here (plus its PowerQuant layer).

Kernel layouts (the `layout` strings of `keras_powerquant.quantization`'s
folding, statistics and bias correction):

- "dense": `(in, out)`; one output channel per column. An EinsumDense
  over several trailing axes is a Dense on them flattened (`Flattening`).
- "conv": `(*spatial, in // groups, out)` (Conv1D/2D/3D); the last axis is
  the output channel, the one before it the input channel within its group
  (output channel `o` reads input group `o // (out // groups)`).
- "depthwise": `(*spatial, in, multiplier)`; output channel
  `i * multiplier + j` uses slice `[..., i, j]`, so the two trailing axes
  together are the output channels.

Exact types are matched (not subclasses): a subclass may override `call`,
and then folding or replacing it would change what the model computes.

Embedding and the recurrent layers are not linear layers of the graph
rewrite: they are `WEIGHT_ONLY_LAYER_TYPES` (one `WeightOnlyLayerType`
each, replaced whole by `converter.nested`, inputs float; docs/method.md §11).
"""

import dataclasses
import math
from typing import Callable
from typing import Optional

import keras
import numpy as np

from keras_powerquant.layers import PowerQuantConv1D
from keras_powerquant.layers import PowerQuantConv2D
from keras_powerquant.layers import PowerQuantConv2DTranspose
from keras_powerquant.layers import PowerQuantConv3D
from keras_powerquant.layers import PowerQuantDense
from keras_powerquant.layers import PowerQuantDepthwiseConv1D
from keras_powerquant.layers import PowerQuantDepthwiseConv2D
from keras_powerquant.layers import PowerQuantEinsumDense
from keras_powerquant.layers import PowerQuantEmbedding
from keras_powerquant.layers import PowerQuantGRU
from keras_powerquant.layers import PowerQuantLSTM
from keras_powerquant.layers import PowerQuantSimpleRNN
from keras_powerquant.layers.einsum_dense import EinsumEquation
from keras_powerquant.layers.recurrent import RNN_KEYS
from keras_powerquant.quantization.bias_correction import transposed_tap_coverage
from keras_powerquant.quantization.layouts import check_layout
from keras_powerquant.quantization.layouts import OUTPUT_CHANNEL_NDIM

L = keras.layers

# Config keys of the convolutions that PowerQuant layers take over.
_WINDOW_KEYS = ("kernel_size", "strides", "padding", "data_format", "dilation_rate")
_CONV_KEYS = ("filters", "groups") + _WINDOW_KEYS


def data_format_channel_axis(layer, rank):
    """Channel axis of a layer's output of `rank` dims: 1 for channels_first, else the last."""
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


def _transposed_coverage(layer, input_shape, output_shape):
    channels_first = layer.data_format == "channels_first"
    sizes_in = input_shape[2:] if channels_first else input_shape[1:-1]
    sizes_out = output_shape[2:] if channels_first else output_shape[1:-1]
    axes = zip(sizes_in, sizes_out, layer.kernel_size, layer.strides, layer.dilation_rate)
    return [transposed_tap_coverage(*sizes, k, s, d, layer.padding) for *sizes, k, s, d in axes]


@dataclasses.dataclass(frozen=True)
class Flattening:
    """How a "dense" kernel with several input or output axes is a Dense on flattened axes.

    The Keras kernel (after `kernel_axes`) is `row_shape + column_shape`;
    the converter's kernel is its reshape to `(prod(row_shape),
    prod(column_shape))`, rows and columns in row-major order, i.e. the
    flattened trailing axes of the layer's input and output. The
    statistics, folds and corrections of the last input (output) axis
    repeat over the other row (column) axes: `row_tiles` (`column_tiles`)
    times.
    """

    row_shape: tuple
    column_shape: tuple

    @property
    def row_tiles(self):
        return math.prod(self.row_shape[:-1])

    @property
    def column_tiles(self):
        return math.prod(self.column_shape[:-1])

    def flat_kernel(self, kernel):
        return np.reshape(kernel, (math.prod(self.row_shape), math.prod(self.column_shape)))

    def unflat_kernel(self, kernel):
        return np.reshape(kernel, self.row_shape + self.column_shape)

    def flat_bias(self, bias):
        """A Keras bias (broadcasting against the output axes) as one value per column."""
        return np.broadcast_to(bias, self.column_shape).ravel()


def _generalised_dense_reason(equation, bias_axes):
    """Why an EinsumDense is not a Dense on flattened trailing axes, or None.

    It is one when the contracted kernel letters are the input's trailing
    letters and the kernel's output letters the output's (each group in
    any order), and the leading letters of input and output agree and are
    not in the kernel (batch, sequence, elided axes on the left).
    """
    parts = EinsumEquation.parse(equation)
    contracted, produced = parts.contracted_axes, parts.output_axes
    inputs, outputs = parts.inputs, parts.outputs
    problem = None
    if parts.ellipsis == "right":
        problem = "its ellipsis is on the right, after the axes it maps"
    elif not contracted or not produced:
        problem = "its kernel has no contracted axis or no output axis"
    elif len(set(parts.kernel)) != len(parts.kernel) or len(set(inputs)) != len(inputs):
        problem = "a letter repeats within a spec"
    elif set(produced) & set(inputs):
        problem = f"its output axes '{''.join(c for c in produced if c in inputs)}' are also input axes"
    elif set(inputs[len(inputs) - len(contracted) :]) != set(contracted):
        problem = f"the contracted axes '{contracted}' are not the input's trailing axes"
    elif set(outputs[len(outputs) - len(produced) :]) != set(produced):
        problem = f"the kernel's output axes '{produced}' are not the output's trailing axes"
    elif inputs[: len(inputs) - len(contracted)] != outputs[: len(outputs) - len(produced)]:
        problem = "the input's and output's leading (batch-like) axes differ"
    elif bias_axes is not None and not set(bias_axes) <= set(produced):
        problem = f"bias_axes '{bias_axes}' are not all kernel output axes"
    if problem is None:
        return None
    return (
        f"EinsumDense equation '{equation}' (bias_axes={bias_axes!r}) is not a Dense on trailing axes: {problem}"
    )


def _einsum_float_reason(layer):
    return _generalised_dense_reason(layer.equation, layer.bias_axes)


def _einsum_dense_letters(layer):
    """The kernel letters as the converter orders them: contracted in input order, outputs in output order."""
    parts = EinsumEquation.parse(layer.equation)
    return "".join(c for c in parts.inputs if c in parts.contracted_axes), parts.channel_axes


def _einsum_kernel_axes(layer):
    rows, columns = _einsum_dense_letters(layer)
    return tuple(EinsumEquation.parse(layer.equation).kernel.index(c) for c in rows + columns)


def _einsum_flattening(layer):
    sizes = dict(zip(EinsumEquation.parse(layer.equation).kernel, layer.kernel.shape))
    rows, columns = _einsum_dense_letters(layer)
    return Flattening(tuple(sizes[c] for c in rows), tuple(sizes[c] for c in columns))


def _einsum_arguments(layer):
    """The PowerQuantEinsumDense of the converter's kernel: its kernel letters in the converter's order.

    Its bias, if any, covers every kernel output axis (`use_bias`): a bias
    correction is per output channel.
    """
    rows, columns = _einsum_dense_letters(layer)
    equation = EinsumEquation.parse(layer.equation).with_kernel(rows + columns)
    return {"equation": equation, "output_shape": layer.get_config()["output_shape"]}


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
        arguments: `arguments(layer)`: those arguments, where they are not
            config values as they are (then `config_keys` is unused).
        channel_axis: `channel_axis(layer, rank)`: the axis of the layer's
            rank-`rank` output that holds its output channels; a following
            BatchNorm folds into the layer only if it normalizes that axis.
        float_reason: `float_reason(layer)`: why this instance cannot be
            quantized (e.g. a configuration the PowerQuant layer lacks), or
            None.
        kernel_axes: `kernel_axes(layer)`: the permutation that takes the
            Keras kernel to `layout` (output channels last), or None when
            it is in `layout` already (Conv2DTranspose's `(kh, kw, out, in)`
            is not). The converter's kernels (folding, fits, the PowerQuant
            layer's `set_float_weights`) are in `layout`.
        tap_coverage: `tap_coverage(layer, input_shape, output_shape)`: per
            spatial axis, the fraction of output positions each tap reaches,
            for layers whose taps do not reach them all (a transposed
            convolution's reach about `1 / stride`); None for convolutions,
            whose coverage only padding lowers.
        flattening: `flattening(layer)`: the `Flattening` of a "dense"
            kernel with several input or output axes (an EinsumDense over
            several trailing axes), or None: the kernel is `layout` as it is.
            The converter's kernel is then 2-D and its bias one value per
            column; the PowerQuant layer holds them in their axes
            (`quantized_kernel`, `quantized_bias`).
    """

    keras_class: type
    layout: str
    quantized_class: Optional[type] = None
    config_keys: tuple = ()
    channel_axis: Callable = data_format_channel_axis
    float_reason: Callable = lambda layer: None  # noqa: E731 - every instance is quantized
    kernel_axes: Optional[Callable] = None
    tap_coverage: Optional[Callable] = None
    arguments: Optional[Callable] = None
    flattening: Optional[Callable] = None

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

    def row_tiles(self, layer):
        """How often the input's last-axis channels repeat down the kernel's input channels."""
        return 1 if self.flattening is None else self.flattening(layer).row_tiles

    def column_tiles(self, layer):
        """How often the output's last-axis channels repeat across the kernel's output channels."""
        return 1 if self.flattening is None else self.flattening(layer).column_tiles

    def input_channel_ndim(self, layer):
        """How many trailing input axes the kernel's input channels index (flattened)."""
        return 1 if self.flattening is None else len(self.flattening(layer).row_shape)

    def stored_kernel(self, layer, kernel):
        """The Keras kernel of `layer` in `layout`."""
        if self.kernel_axes is not None:
            kernel = np.transpose(kernel, self.kernel_axes(layer))
        return kernel if self.flattening is None else self.flattening(layer).flat_kernel(kernel)

    def keras_kernel(self, layer, kernel):
        """A kernel in `layout` back in the Keras layer's own layout."""
        if self.flattening is not None:
            kernel = self.flattening(layer).unflat_kernel(kernel)
        return kernel if self.kernel_axes is None else np.transpose(kernel, np.argsort(self.kernel_axes(layer)))

    def stored_bias(self, layer, bias):
        """The Keras layer's bias as one value per output channel of `layout`."""
        return bias if self.flattening is None else self.flattening(layer).flat_bias(bias)

    def quantized_kernel(self, layer, kernel):
        """A kernel in `layout` in the stored layout of the layer's `quantized_class`."""
        return kernel if self.flattening is None else self.flattening(layer).unflat_kernel(kernel)

    def converter_kernel(self, layer, kernel):
        """A kernel in the stored layout of `quantized_class` in `layout`: `quantized_kernel`'s inverse."""
        return kernel if self.flattening is None else self.flattening(layer).flat_kernel(kernel)

    def quantized_bias(self, layer, bias):
        """One value per output channel in the bias shape of `quantized_class` (and of `config_with_bias`)."""
        if bias is None or self.flattening is None:
            return bias
        return np.reshape(bias, self.flattening(layer).column_shape)

    def config_with_bias(self, layer):
        """The Keras layer's config with a bias on every output channel (to carry a folded BatchNorm)."""
        config = layer.get_config()
        if self.flattening is None:
            return {**config, "use_bias": True}
        return {**config, "bias_axes": _einsum_dense_letters(layer)[1]}

    def linear_config(self, layer):
        """The Keras layer's config with neither bias nor activation: its linear map alone."""
        config = {**layer.get_config(), "activation": None}
        if self.flattening is None:
            return {**config, "use_bias": False}
        return {**config, "bias_axes": None}

    def quantized_arguments(self, layer):
        """The layer-specific arguments of `quantized_class` (`arguments`, or the `config_keys` values)."""
        if self.arguments is not None:
            return self.arguments(layer)
        config = layer.get_config()
        return {key: config[key] for key in self.config_keys}


LINEAR_LAYER_TYPES = (
    LinearLayerType(L.Dense, "dense", PowerQuantDense, ("units",)),
    LinearLayerType(L.Conv1D, "conv", PowerQuantConv1D, _CONV_KEYS),
    LinearLayerType(L.Conv2D, "conv", PowerQuantConv2D, _CONV_KEYS),
    LinearLayerType(L.Conv3D, "conv", PowerQuantConv3D, _CONV_KEYS),
    LinearLayerType(L.DepthwiseConv1D, "depthwise", PowerQuantDepthwiseConv1D, ("depth_multiplier",) + _WINDOW_KEYS),
    LinearLayerType(L.DepthwiseConv2D, "depthwise", PowerQuantDepthwiseConv2D, ("depth_multiplier",) + _WINDOW_KEYS),
    LinearLayerType(
        L.Conv2DTranspose,
        "conv",
        PowerQuantConv2DTranspose,
        ("filters", "output_padding") + _WINDOW_KEYS,
        kernel_axes=lambda layer: (0, 1, 3, 2),
        tap_coverage=_transposed_coverage,
    ),
    LinearLayerType(
        L.EinsumDense,
        "dense",
        PowerQuantEinsumDense,
        # A BatchNorm folds only into the equations that convert (its
        # parameters repeated over the other kernel output axes).
        channel_axis=lambda layer, rank: rank - 1 if _einsum_float_reason(layer) is None else None,
        float_reason=_einsum_float_reason,
        kernel_axes=_einsum_kernel_axes,
        arguments=_einsum_arguments,
        flattening=_einsum_flattening,
    ),
)
_BY_CLASS = {entry.keras_class: entry for entry in LINEAR_LAYER_TYPES}


def linear_type(layer):
    """The layer's `LinearLayerType` (exact class match), or None."""
    return _BY_CLASS.get(type(layer))


@dataclasses.dataclass(frozen=True)
class WeightOnlyLayerType:
    """A Keras layer class quantized weight-only, replaced whole (never folded into, no input quantizer).

    Its input is no activation to quantize (an Embedding's ids), or is
    read inside a recurrence (an RNN's steps). These layers are not linear
    layers of the graph rewrite (no BatchNorm folding, statistics, bias
    correction or refinement): `converter.nested` replaces them, in the
    model graph (`path == ()`) and inside other layers.

    Attributes:
        keras_class: the Keras layer class (matched exactly).
        quantized_class: the PowerQuant layer that replaces it; it takes
            `weight_bits`, `weight_exponent`, `per_channel` and `arguments(layer)`,
            and has `set_float_weights(kernel, bias, clip_fraction)`.
        weights: `weights(layer)`: `(kernel, bias)` float32 arrays, the kernel
            with its scale channels on its last axis (as the exponent fit
            takes it), bias None without one.
        arguments: `arguments(layer)`: the `quantized_class` arguments besides the quantizer's.
        float_reason: `float_reason(layer)`: why this instance stays float, or None.
        to_quantized: `to_quantized(kernel)`: `weights`' kernel as `set_float_weights` takes it.
    """

    keras_class: type
    quantized_class: type
    weights: Callable
    arguments: Callable
    float_reason: Callable = lambda layer: None  # noqa: E731 - every instance is quantized
    to_quantized: Callable = lambda kernel: kernel  # noqa: E731 - the same layout

    # The kernel of `weights` holds one scale channel per index of its last axis.
    channel_ndim = 1

    def quantized_arguments(self, layer):
        return self.arguments(layer)

    def quantized_kernel(self, layer, kernel):
        return self.to_quantized(kernel)

    def quantized_bias(self, layer, bias):
        return bias


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable).astype(np.float32)


def _embedding_weights(layer):
    # Transposed: the rows (tokens) are the scale channels, on the last axis.
    return _numpy(layer.embeddings).T, None


def _embedding_float_reason(layer):
    if getattr(layer, "quantization_mode", None) is not None:
        return f"already quantized by Keras (quantization_mode={layer.quantization_mode!r})"
    if getattr(layer, "lora_enabled", False):
        return "LoRA enabled: its table is the sum of two weights"
    return None


def _recurrent_weights(layer):
    cell = layer.cell
    kernel = np.concatenate([_numpy(cell.kernel), _numpy(cell.recurrent_kernel)], axis=0)
    return kernel, _numpy(cell.bias) if cell.use_bias else None


def _recurrent_arguments(layer, *cell_keys):
    config = layer.get_config()
    keys = RNN_KEYS + ("units", "activation", "use_bias") + cell_keys
    return {key: config[key] for key in keys if key in config}


WEIGHT_ONLY_LAYER_TYPES = (
    WeightOnlyLayerType(
        L.Embedding,
        PowerQuantEmbedding,
        _embedding_weights,
        lambda layer: {"input_dim": layer.input_dim, "output_dim": layer.output_dim, "mask_zero": layer.mask_zero},
        _embedding_float_reason,
        to_quantized=np.transpose,
    ),
    WeightOnlyLayerType(L.SimpleRNN, PowerQuantSimpleRNN, _recurrent_weights, _recurrent_arguments),
    WeightOnlyLayerType(
        L.LSTM, PowerQuantLSTM, _recurrent_weights, lambda layer: _recurrent_arguments(layer, "recurrent_activation")
    ),
    WeightOnlyLayerType(
        L.GRU,
        PowerQuantGRU,
        _recurrent_weights,
        lambda layer: _recurrent_arguments(layer, "recurrent_activation", "reset_after"),
    ),
)
_WEIGHT_ONLY_BY_CLASS = {entry.keras_class: entry for entry in WEIGHT_ONLY_LAYER_TYPES}


def weight_only_type(layer):
    """The layer's `WeightOnlyLayerType` (exact class match), or None."""
    return _WEIGHT_ONLY_BY_CLASS.get(type(layer))


def kernel_type(layer):
    """The layer's `LinearLayerType` or `WeightOnlyLayerType`, or None."""
    return linear_type(layer) or weight_only_type(layer)


def quantized_classes():
    """The PowerQuant layer classes of all entries, in registry order."""
    return tuple(e.quantized_class for e in LINEAR_LAYER_TYPES if e.quantized_class is not None)

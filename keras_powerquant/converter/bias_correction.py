"""Bias correction stages of `convert` (docs/method.md §7), run on the built quantized model.

Analytic (data-free): `shift = (W_hat - W) E[x]`, with `E[x]` per input
channel from the propagated BatchNorm statistics (after a ReLU, the mean of
the rectified Gaussian `E[relu(N(beta, gamma^2))]`). It corrects the
kernel's own quantization error; the first layer, whose input (the network
input) has no data-free statistics, is left as is.

Empirical (calibration data, real or synthetic): `shift = E[W_hat x_hat] -
E[W x]`, with `E[x]` from the float model and `E[x_hat]` from the quantized
model, layer by layer in graph order so each layer sees inputs of a model
whose earlier layers are already corrected. It corrects the kernel's error
and the mean shift arriving from upstream (activation quantization
included), measured on the calibration data.

Both need only per-channel input means (see
`keras_powerquant.quantization.bias_correction` for the padding model), so
memory stays bounded: running sums per channel, and a bounded cache of
calibration batches that the layer-by-layer passes reuse.
"""

import dataclasses
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.bias_correction import bias_shift
from keras_powerquant.quantization.bias_correction import effective_kernel
from keras_powerquant.quantization.bias_correction import tap_coverage

# Batch size of the correction passes: larger batches than calibration's
# default run the many passes faster; memory stays that of a few batches.
_PASS_BATCH_SIZE = 128


@dataclasses.dataclass(frozen=True)
class BiasCorrection:
    """The correction of one layer's bias.

    Attributes:
        method: "analytic" or "empirical".
        shift: float64 `(channels,)` subtracted from the bias, or None when
            the layer was not corrected.
        reason: why it was not corrected.
    """

    method: str
    shift: Optional[np.ndarray] = None
    reason: Optional[str] = None

    @property
    def norm(self):
        """Euclidean norm of the shift, None when not corrected."""
        return None if self.shift is None else float(np.linalg.norm(self.shift))


def _coverage(op):
    layer = op.layer
    entry = linear_type(layer)
    if entry.layout == "dense" or not _channels_last(layer):
        return None
    if entry.tap_coverage is not None:
        return entry.tap_coverage(layer, op.input_tensors[0].shape, op.output_tensors[0].shape)
    sizes = op.input_tensors[0].shape[1:-1]
    return [
        tap_coverage(size, k, s, d, layer.padding)
        for size, k, s, d in zip(sizes, layer.kernel_size, layer.strides, layer.dilation_rate)
    ]


def _shift(layer_plan, quantized_layer, input_mean, quantized_input_mean):
    """`bias_shift` of a quantized layer from its float and quantized input means."""
    op = layer_plan.op
    entry = linear_type(op.layer)
    coverage = _coverage(op)
    dequantized = entry.converter_kernel(op.layer, keras.ops.convert_to_numpy(quantized_layer.dequantized_kernel()))
    return bias_shift(
        effective_kernel(layer_plan.kernel, entry.layout, coverage),
        effective_kernel(dequantized, entry.layout, coverage),
        input_mean,
        quantized_input_mean,
        entry.layout,
        entry.groups(op.layer),
    )


def _channels_last(layer):
    return linear_type(layer).channels_last(layer)


def analytic_corrections(plan, stats, quantized_layers):
    """Analytic corrections from data-free statistics.

    Args:
        plan: the `ConversionPlan`, fitted.
        stats: `TensorStats` by tensor key, from `propagate_statistics`.
        quantized_layers: `id(original layer)` -> built PowerQuant layer.

    Returns:
        A dict `id(original layer)` -> `BiasCorrection`.
    """
    corrections = {}
    for key, layer_plan in plan.layers.items():
        gaussians = stats[layer_plan.input_key].gaussians
        channels = layer_plan.op.input_tensors[0].shape[-1]
        if gaussians is None or gaussians.channels != channels or not _channels_last(layer_plan.layer):
            corrections[key] = BiasCorrection("analytic", reason="no data-free statistics of its input")
            continue
        # Each input channel's mean, at every index of the other contracted axes.
        mean = np.tile(gaussians.mean, linear_type(layer_plan.layer).row_tiles(layer_plan.layer))
        shift = _shift(layer_plan, quantized_layers[key], mean, mean)
        corrections[key] = BiasCorrection("analytic", shift)
    return corrections


def _channel_sums(tensor, channel_ndim):
    """Per-channel sums over every axis but the `channel_ndim` last (flattened), float64 `(channels,)`."""
    channels = tf.reduce_prod(tf.shape(tensor)[len(tensor.shape) - channel_ndim :])
    flat = tf.reshape(tf.cast(tensor, tf.float64), [-1, channels])
    return tf.reduce_sum(flat, axis=0), tf.shape(flat, out_type=tf.int64)[0]


def _summing(compute, channel_ndims):
    """A traced function: the per-channel sums of each tensor `compute(inputs)` returns.

    `channel_ndims` gives, per tensor, how many trailing axes are its
    channels. Traced once and reused by every pass: the model's variables
    (the biases being corrected) are read at each call.
    """
    return tf.function(
        lambda inputs: [_channel_sums(t, n) for t, n in zip(keras.tree.flatten(compute(inputs)), channel_ndims)]
    )


def _input_means(function, batches):
    """Per-channel means over all batches of the tensors a `_summing` function sums."""
    sums, counts = None, None
    for batch in batches:
        results = function([tf.convert_to_tensor(a) for a in batch])
        batch_sums = [r[0].numpy() for r in results]
        batch_counts = [int(r[1]) for r in results]
        if sums is None:
            sums, counts = batch_sums, batch_counts
        else:
            sums = [a + b for a, b in zip(sums, batch_sums)]
            counts = [a + b for a, b in zip(counts, batch_counts)]
    return [total / count for total, count in zip(sums, counts)]


def _rebatched(batches, size):
    """The same samples in batches of `size` (the last one smaller)."""
    arrays = [np.concatenate(parts) for parts in zip(*batches)]
    total = arrays[0].shape[0]
    return [[a[start : start + size] for a in arrays] for start in range(0, total, size)]


def _waves(graph, plan):
    """Quantized layers grouped so that each group depends only on earlier groups."""
    depth = {key: 0 for key in graph.input_keys}
    waves = {}
    for op in graph.ops:
        level = max((depth.get(k, 0) for k in op.input_keys), default=0)
        if id(op.layer) in plan.layers:
            waves.setdefault(level, []).append(id(op.layer))
            level += 1
        for key in op.output_keys:
            depth[key] = level
    return [waves[level] for level in sorted(waves)]


def empirical_corrections(graph, plan, model, quantized_layers, batches, progress=None):
    """Empirical corrections on calibration batches, applied wave by wave.

    Layers are grouped in waves that depend only on earlier waves; each
    wave's biases are corrected in `model` before the next wave's inputs
    are measured, so every layer sees the corrected upstream model. A pass
    costs one forward run of the model over `batches`.

    Args:
        graph: the original model's `FlatGraph`.
        plan: the `ConversionPlan`, fitted.
        model: the built quantized model (its biases are updated in place).
        quantized_layers: `id(original layer)` -> its PowerQuant layer in `model`.
        batches: a list of flat input lists (reused by every pass).
        progress: optional `progress(done, total)` over waves.

    Returns:
        A dict `id(original layer)` -> `BiasCorrection` (already applied).
    """
    batches = _rebatched(batches, _PASS_BATCH_SIZE)
    corrections = {
        key: BiasCorrection("empirical", reason="channels_first layout")
        for key, layer_plan in plan.layers.items()
        if not _channels_last(layer_plan.layer)
    }
    layer_keys = [key for key in plan.layers if key not in corrections]
    if not layer_keys:
        return corrections
    input_keys = [plan.layers[key].input_key for key in layer_keys]

    def float_inputs(inputs):
        _, kept = graph.evaluate(inputs, lambda op, args, kwargs: op.layer(*args, **kwargs), keep=set(input_keys))
        return [kept[key] for key in input_keys]

    # Means per input channel of the kernel: over several trailing axes for a flattened einsum.
    layers = [plan.layers[key].layer for key in layer_keys]
    channel_ndims = [linear_type(layer).input_channel_ndim(layer) for layer in layers]
    float_means = dict(zip(layer_keys, _input_means(_summing(float_inputs, channel_ndims), batches)))
    probe = keras.Model(model.inputs, [quantized_layers[key].input for key in layer_keys])
    probe_sums = _summing(lambda inputs: probe(inputs, training=False), channel_ndims)
    waves = [[key for key in wave if key in float_means] for wave in _waves(graph, plan)]
    for done, wave in enumerate(waves, start=1):
        quantized_means = dict(zip(layer_keys, _input_means(probe_sums, batches)))
        for key in wave:
            shift = _shift(plan.layers[key], quantized_layers[key], float_means[key], quantized_means[key])
            corrections[key] = BiasCorrection("empirical", shift)
        apply_corrections(quantized_layers, {key: corrections[key] for key in wave})
        if progress is not None:
            progress(done, len(waves))
    return corrections


def refined_corrections(plan, shifts):
    """Empirical corrections measured by refinement (`Refinement.bias_shifts`), by layer key.

    Refinement measures each layer's output mean directly, on its
    subsample, with the corrections of the layers before it applied: the
    same correction as `empirical_corrections` without its
    uniform-input-mean model of padding.
    """
    corrections = {}
    for key, layer_plan in plan.layers.items():
        shift = shifts.get(layer_plan.layer.name)
        reason = None if shift is not None else "channels_first layout"
        corrections[key] = BiasCorrection("empirical", shift, reason)
    return corrections


def apply_corrections(quantized_layers, corrections):
    """Subtracts each correction's shift from its layer's bias variable."""
    for key, correction in corrections.items():
        if correction.shift is None:
            continue
        bias = quantized_layers[key].bias
        # One shift per output channel, in the bias' shape (several axes for an einsum's).
        shift = np.reshape(correction.shift, bias.shape).astype(np.float32)
        bias.assign(keras.ops.convert_to_numpy(bias) - shift)

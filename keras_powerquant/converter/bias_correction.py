"""Bias correction stages of `convert` (docs/method.md §7), run on the built quantized model.

Each quantized linear layer's bias loses the mean shift of its outputs,
`shift = E[W_hat x_hat] - E[W x]` per output channel, that quantization
(of its kernel, its input and every layer before it) brings.

Measured (calibration data, real or synthetic): the output means
themselves, on the calibration samples. A linear layer's mean output is the
layer (no bias, no activation) applied to its mean input, taken per
position (`InputMeans`), so the float model's means come from the
calibration pass and the quantized model's from one pass of the quantized
model, layer by layer in graph order so that each layer sees the inputs of a
model whose earlier layers are already corrected. Exact, zero padding at
the borders included; refinement's loss measures the same shifts
(`refined_corrections`).

Analytic (data-free): `shift = (W_hat - W) E[x]`, with `E[x]` per input
channel from the propagated BatchNorm statistics (after a ReLU, the mean of
the rectified Gaussian `E[relu(N(beta, gamma^2))]`), the same at every
position (`keras_powerquant.quantization.bias_correction`'s padding model).
It corrects the kernel's own quantization error; the first layer, whose
input (the network input) has no data-free statistics, is left as is.

Memory stays bounded: one sample's worth of mean per corrected layer input,
and a bounded cache of calibration batches for the quantized pass.
"""

import dataclasses
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant.converter.graph import CompiledCalls
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.limits import DEFAULT_CALIBRATION_BATCH_SIZE
from keras_powerquant.quantization.bias_correction import bias_shift
from keras_powerquant.quantization.bias_correction import effective_kernel
from keras_powerquant.quantization.bias_correction import tap_coverage

# Batch size of the correction pass, calibration's default: each op runs as
# a traced function (`CompiledCalls`), where batches of 128 gain nothing and
# EfficientNet-Lite2's tensors of 0.9 GB cost seconds to allocate the first time.
_PASS_BATCH_SIZE = DEFAULT_CALIBRATION_BATCH_SIZE


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


class _LinearResponse:
    """The mean output, per output channel, of one layer's linear map for a given mean input.

    A copy of the float layer without bias and activation, whose kernel is
    set for each call: `response(kernel, mean)` is the mean over positions
    of `layer(mean)`, `kernel` in the converter's layout and `mean` of one
    input sample's shape. Float64 `(channels,)` in the converter's output
    channel order.
    """

    def __init__(self, layer):
        self.entry = linear_type(layer)
        self.layer = layer
        self.linear = type(layer).from_config({**self.entry.linear_config(layer), "name": f"{layer.name}_linear"})

    def __call__(self, kernel, mean):
        inputs = tf.constant(np.asarray(mean, np.float32)[None])
        if not self.linear.built:
            self.linear.build(inputs.shape)
        self.linear.set_weights([self.entry.keras_kernel(self.layer, np.asarray(kernel, np.float32))])
        outputs = self.linear(inputs).numpy()
        channels = self.entry.output_channels(kernel.shape)
        return np.mean(np.reshape(outputs, (-1, channels)), axis=0, dtype=np.float64)


def _rebatched(batches, size):
    """The same samples in batches of `size` (the last one smaller)."""
    arrays = [np.concatenate(parts) for parts in zip(*batches)]
    total = arrays[0].shape[0]
    return [[a[start : start + size] for a in arrays] for start in range(0, total, size)]


def correction_inputs(plan):
    """The input keys of the layers empirical correction measures (`InputMeans`' keys)."""
    return [layer_plan.input_key for layer_plan in plan.layers.values() if _channels_last(layer_plan.layer)]


def empirical_corrections(graph, plan, model, quantized_layers, batches, float_means, progress=None):
    """Measured corrections on calibration batches, in one pass of the quantized model.

    The quantized model runs operation by operation on all `batches` at
    once (in chunks of `_PASS_BATCH_SIZE`); when a quantized layer is
    reached, every layer upstream of it is already corrected, so its mean
    input is that of the corrected upstream model: its shift (its mean
    output, less the float layer's on the float mean input) is computed and
    applied before it runs. This is the correction of one pass per wave of
    layers that depend only on earlier waves, at the cost of one pass.
    Memory is that of the tensors live at one point of the graph for all
    the samples of `batches` (which `convert` bounds, `BIAS_CORRECTION_SAMPLES`).

    Args:
        graph: the original model's `FlatGraph`.
        plan: the `ConversionPlan`, fitted.
        model: the built quantized model (its biases are updated in place).
        quantized_layers: `id(original layer)` -> its PowerQuant layer in `model`.
        batches: a list of flat input lists.
        float_means: `{input key: per-position mean}` of the float model on
            `batches` (`InputMeans.means()` of the calibration pass, keys
            from `correction_inputs`).
        progress: optional `progress(done, total)` over corrected layers.

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
    by_quantized_layer = {id(quantized_layers[key]): key for key in layer_keys}
    quantized_graph = FlatGraph(model)
    last_use = {}
    for op in quantized_graph.ops:
        for key in op.input_keys:
            last_use[key] = op.index
    values = {key: [batch[i] for batch in batches] for i, key in enumerate(quantized_graph.input_keys)}
    values = {key: [tf.convert_to_tensor(a) for a in chunks] for key, chunks in values.items()}
    done = 0
    call_op = CompiledCalls(training=False)
    for op in quantized_graph.ops:
        key = by_quantized_layer.get(id(op.layer)) if op.is_layer else None
        if key is not None and key not in corrections:
            layer_plan = plan.layers[key]
            chunks = values[op.input_key]
            total = sum(tf.reduce_sum(chunk, axis=0).numpy().astype(np.float64) for chunk in chunks)
            quantized_mean = total / sum(int(chunk.shape[0]) for chunk in chunks)
            response = _LinearResponse(layer_plan.layer)
            dequantized = linear_type(layer_plan.layer).converter_kernel(
                layer_plan.layer, keras.ops.convert_to_numpy(quantized_layers[key].dequantized_kernel())
            )
            shift = response(dequantized, quantized_mean) - response(
                layer_plan.kernel, float_means[layer_plan.input_key]
            )
            corrections[key] = BiasCorrection("empirical", shift)
            apply_corrections(quantized_layers, {key: corrections[key]})
            done += 1
            if progress is not None:
                progress(done, len(layer_keys))
        outputs = []
        for i in range(len(batches)):
            args, kwargs = op.call_arguments({k: values[k][i] for k in op.input_keys})
            outputs.append(keras.tree.flatten(call_op(op, args, kwargs)))
        for j, out_key in enumerate(op.output_keys):
            values[out_key] = [chunk_outputs[j] for chunk_outputs in outputs]
        for in_key in op.input_keys:
            if last_use.get(in_key) == op.index and in_key not in quantized_graph.output_keys:
                values.pop(in_key, None)
    return corrections


def refined_corrections(plan, shifts):
    """Empirical corrections measured by refinement (`Refinement.bias_shifts`), by layer key.

    Refinement measures each layer's output mean directly, on its
    subsample, with the corrections of the layers before it applied: the
    same correction as `empirical_corrections`, on refinement's samples.
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

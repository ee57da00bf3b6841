"""Data-free statistics of every tensor of a model (docs/method.md §4).

Each tensor gets a `TensorStats`: per-channel Gaussian moments (for
propagation into the next layer) and a sampler of its value distribution
(for fitting a quantizer). BatchNorm outputs are `Normal(beta, gamma^2)`;
other tensors are propagated from those, or are unknown.
"""

import dataclasses
import functools
import re
from typing import Callable
from typing import Optional

import keras
import numpy as np

from keras_powerquant import keras_internals
from keras_powerquant.converter.folding import batch_norm_parameters
from keras_powerquant.converter.folding import linear_weights
from keras_powerquant.converter.layer_types import activation_layer_spec
from keras_powerquant.converter.layer_types import fused_activation_spec
from keras_powerquant.converter.layer_types import is_sign_preserving
from keras_powerquant.converter.layer_types import LINEAR
from keras_powerquant.converter.operations import is_elementwise
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.statistics import add_gaussians
from keras_powerquant.quantization.statistics import average_pool_gaussians
from keras_powerquant.quantization.statistics import batchnorm_gaussians
from keras_powerquant.quantization.statistics import ChannelGaussians
from keras_powerquant.quantization.statistics import concatenate_gaussians
from keras_powerquant.quantization.statistics import layernorm_gaussians
from keras_powerquant.quantization.statistics import linear_gaussians
from keras_powerquant.quantization.statistics import max_pool_gaussians
from keras_powerquant.quantization.statistics import mixed_gaussians
from keras_powerquant.quantization.statistics import tiled_gaussians

L = keras.layers

# Activation ranges are fitted on samples with heavier tails than the
# Gaussian model (a unit-variance Student t with this many degrees of
# freedom; None for Gaussian): real activations have them, and Gaussian
# samples gave 8-bit clips about half the calibrated ones. 10 was chosen on
# held-out training images of the shared ResNet-8 (benchmarks/RESULTS.md,
# "Data-free accuracy"). Moments propagated through the graph stay Gaussian.
DATA_FREE_TAIL_DOF = 10
# At this many bits and more, the tails are heavier still: a Student t with
# HIGH_BITS_TAIL_DOF degrees of freedom (finite variance, infinite kurtosis;
# real per-channel kurtosis was 5-16 on the shared ResNet-8 and a CIFAR
# Xception, against 4 for 10 degrees of freedom). With 256 levels a clip cut
# into the real range costs far more than the resolution a wider clip
# gives up, and calibration then clips near the observed maximum: the
# 10-dof samples gave 8-bit clips 1.2-1.6x tighter than calibration even
# right after a BatchNorm (docs/method.md §4, issue 20).
HIGH_BITS = 8
HIGH_BITS_TAIL_DOF = 4


def tail_dof(bits=None):
    """Degrees of freedom of the Student t a quantizer of `bits` bits is fitted on."""
    if bits is not None and bits >= HIGH_BITS:
        return HIGH_BITS_TAIL_DOF
    return DATA_FREE_TAIL_DOF


def _fit_samples(gaussians, bits=None):
    return gaussians.samples(tail_dof=tail_dof(bits))


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """What is known of a tensor without data.

    Attributes:
        gaussians: per-channel moments along the last axis, or None when the
            channel layout is unknown.
        sampler: `sampler(bits=None)` returns a 1-D sample of the tensor's
            values for fitting a quantizer of `bits` bits (the tail model
            depends on them, see `tail_dof`), or None when they cannot be
            modelled.
        rule: how the statistics were obtained, for the report.
        steps: how far they are from a normalization: the linear layers and
            merges between the tensor and the last BatchNorm (or
            LayerNormalization) output they were propagated from (0 right
            after one), or None when they do not come from one. Each step
            adds a modelling assumption (Gaussian sums, independent inputs).
    """

    gaussians: Optional[ChannelGaussians]
    sampler: Optional[Callable[[], np.ndarray]]
    rule: str
    steps: Optional[int] = None

    @property
    def description(self):
        """The rule with the distance from a normalization, for the report."""
        if self.sampler is None or not self.steps:
            return self.rule
        return f"{self.rule} ({self.steps} step{'s' if self.steps > 1 else ''} from a normalization)"

    @classmethod
    def of_gaussians(cls, gaussians):
        return cls(gaussians, lambda bits=None: _fit_samples(gaussians, bits).ravel(), gaussians.rule)

    @classmethod
    def unknown(cls, rule):
        return cls(None, None, rule)

    def with_gaussians(self, gaussians):
        return dataclasses.replace(self, gaussians=gaussians)


def _activated(stats, spec, name=None):
    """Pushes stats through an elementwise activation.

    Args:
        stats: the input's `TensorStats`.
        spec: an `ActivationSpec`, or a numpy function of `(channels, n)`
            samples (then `name` names it).
    """
    if spec is None:
        return TensorStats.unknown("unknown: activation without a numpy model")
    if spec == LINEAR:
        return stats
    if stats.gaussians is None:
        return TensorStats.unknown(stats.rule)
    fn = spec if callable(spec) else spec.numpy_function()
    rule = f"{stats.rule} -> {name or spec.name}"
    _, gaussians = stats.gaussians.map(fn, rule)
    pre = stats.gaussians
    return TensorStats(gaussians, lambda bits=None: fn(_fit_samples(pre, bits)).ravel(), rule)


def _linear_stats(op, stats_in, fold):
    """Stats of a linear layer's output in the original graph (a BatchNorm folded into it
    from before is still a layer of that graph: its output is `stats_in`)."""
    layer = op.layer
    entry = linear_type(layer)
    if fold is not None and fold.batch_norm is not None:
        gamma, beta, _, _ = batch_norm_parameters(fold.batch_norm)
        return TensorStats.of_gaussians(batchnorm_gaussians(gamma, beta))
    gaussians = stats_in.gaussians
    channels_in = op.input_tensors[0].shape[-1]
    if gaussians is None or not entry.channels_last(layer) or gaussians.channels != channels_in:
        return TensorStats.unknown(stats_in.rule)
    kernel, bias = linear_weights(layer)
    tap_weights = None
    if entry.tap_coverage is not None:
        coverage = entry.tap_coverage(layer, op.input_tensors[0].shape, op.output_tensors[0].shape)
        tap_weights = functools.reduce(np.multiply.outer, coverage)
    # A kernel over several trailing input axes reads each last-axis channel at every index of the others.
    gaussians = tiled_gaussians(gaussians, entry.row_tiles(layer))
    pre = linear_gaussians(gaussians, kernel, bias, entry.layout, entry.groups(layer), tap_weights)
    out = _activated(TensorStats.of_gaussians(pre), fused_activation_spec(layer))
    if entry.column_tiles(layer) == 1 or out.gaussians is None:
        return out
    # Several output axes: the moments of each last-axis channel mix its values over the
    # other output axes; the tensor's samples keep every output channel's own distribution.
    rule = f"{out.rule} (mixed over its output axes but the last)"
    return TensorStats(mixed_gaussians(out.gaussians, op.output_tensors[0].shape[-1], rule), out.sampler, rule)


def _flattened(stats, input_shape, output_shape):
    """Channel moments after Flatten/Reshape (row-major, so value `f` of a
    sample sits in input channel `f mod c` and output channel `f mod c'`).

    When `c'` is a multiple of `c`, output channel `k` holds input channel
    `k mod c`; when `c'` divides `c`, it mixes input channels `k, k + c',
    k + 2c'...` in equal parts (moment-matched). Otherwise the channels are
    unknown.
    """
    gaussians = stats.gaussians
    if gaussians is None or None in input_shape[1:] or None in output_shape[1:]:
        return stats.with_gaussians(None)
    channels, new_channels = input_shape[-1], output_shape[-1]
    if new_channels % channels == 0:
        return stats.with_gaussians(tiled_gaussians(gaussians, new_channels // channels))
    if channels % new_channels == 0:
        return stats.with_gaussians(mixed_gaussians(gaussians, new_channels))
    return stats.with_gaussians(None)


def _merged(op, inputs):
    layer = op.layer
    if any(s.gaussians is None for s in inputs):
        return TensorStats.unknown(f"unknown: input of {type(layer).__name__} '{layer.name}' unknown")
    if type(layer) is L.Add:
        return TensorStats.of_gaussians(add_gaussians([s.gaussians for s in inputs]))
    if type(layer) is L.Multiply:
        return _product(inputs)
    if type(layer) is L.Average:
        n = len(inputs)
        summed = add_gaussians([s.gaussians for s in inputs], "propagated: average")
        return TensorStats.of_gaussians(ChannelGaussians(summed.mean / n, summed.var / n**2, summed.rule))
    rank = len(op.output_tensors[0].shape)
    if type(layer) is L.Concatenate and layer.axis % rank == rank - 1:
        return TensorStats.of_gaussians(concatenate_gaussians([s.gaussians for s in inputs]))
    return TensorStats.unknown(f"unknown: no statistics rule for {type(layer).__name__}")


def _product(inputs):
    """Moments of a product of independent channels (squeeze-and-excitation gates)."""
    gaussians = [s.gaussians for s in inputs]
    if len({g.channels for g in gaussians}) != 1:
        return TensorStats.unknown("unknown: product of tensors with different channels")
    mean, second = np.ones_like(gaussians[0].mean), np.ones_like(gaussians[0].mean)
    for g in gaussians:
        mean, second = mean * g.mean, second * (g.var + np.square(g.mean))
    rule = "propagated: product"
    return TensorStats.of_gaussians(ChannelGaussians(mean, second - np.square(mean), rule))


def _elementwise_operation(op, stats):
    """Pushes stats through a one-input `keras.ops` operation by running it on samples."""
    if stats.gaussians is None:
        return TensorStats.unknown(stats.rule)
    channels = stats.gaussians.channels
    for constant in keras_internals.node_constants(op.node):
        shape = np.shape(constant)
        if any(n != 1 for n in shape[:-1]) or (shape and shape[-1] not in (1, channels)):
            return TensorStats.unknown(f"unknown: constants of '{op.layer.name}' are not per channel")

    def apply(samples):  # samples: (channels, n); the operation broadcasts along the last axis
        args, kwargs = op.call_arguments({op.input_key: samples.T.astype(np.float32)})
        return np.asarray(keras.ops.convert_to_numpy(op.run(args, kwargs)), dtype=np.float64).T

    # Named by the operation's kind ("clip", "hard_silu"), not its instance name, which
    # depends on how many such operations the Keras session has created.
    kind = re.sub(r"(?<!^)(?=[A-Z])", "_", keras_internals.keras_op_name(op.layer)).lower()
    return _activated(stats, apply, kind)


def _operation_stats(op, inputs):
    """Statistics of the output of a `keras.ops` operation that is not a layer."""
    name = keras_internals.keras_op_name(op.layer)
    in_shape, out_shape = op.input_tensors[0].shape, op.output_tensors[0].shape
    if is_elementwise(op) and tuple(in_shape) == tuple(out_shape):
        return _elementwise_operation(op, inputs[0])
    if any(s.gaussians is None for s in inputs):
        return TensorStats.unknown(f"unknown: input of '{op.layer.name}' unknown")
    if name in ("Add", "Subtract") and len(inputs) == 2:
        first, second = inputs[0].gaussians, inputs[1].gaussians
        if first.channels == second.channels:
            mean = first.mean + second.mean if name == "Add" else first.mean - second.mean
            rule = f"propagated: {name.lower()}"
            return TensorStats.of_gaussians(ChannelGaussians(mean, first.var + second.var, rule))
    if name == "Multiply" and len(inputs) == 2:
        return _product(inputs)
    if name in ("Reshape", "ExpandDims", "Squeeze"):
        return _flattened(inputs[0], in_shape, out_shape)
    if name in ("Mean", "Max") and len(inputs) == 1 and in_shape[-1] == out_shape[-1]:
        axes = op.layer.axis if isinstance(op.layer.axis, (tuple, list)) else (op.layer.axis,)
        if op.layer.axis is not None and all(a % len(in_shape) != len(in_shape) - 1 for a in axes):
            # As pooling: averaging over positions only narrows the distribution.
            return inputs[0]
    return TensorStats.unknown(f"unknown: no statistics rule for operation {type(op.layer).__name__}")


def _prelu(layer, stats):
    alpha = keras.ops.convert_to_numpy(layer.alpha).astype(np.float64)
    if stats.gaussians is None or alpha.size != stats.gaussians.channels or alpha.shape[-1] != alpha.size:
        return TensorStats.unknown(f"unknown: PReLU '{layer.name}' with alphas not per channel")
    alpha = alpha.reshape(-1, 1)
    return _activated(stats, lambda x: np.where(x >= 0, x, alpha * x), f"prelu '{layer.name}'")


def _rescaled(layer, stats):
    if stats.gaussians is None:
        return TensorStats.unknown(stats.rule)
    scale = np.asarray(layer.scale, dtype=np.float64)
    offset = np.asarray(layer.offset, dtype=np.float64)
    gaussians = ChannelGaussians(
        stats.gaussians.mean * scale + offset,
        stats.gaussians.var * np.square(scale),
        f"{stats.rule} -> rescaling",
    )
    return TensorStats.of_gaussians(gaussians)


def _layer_norm(layer, output_shape):
    """`layernorm_gaussians` of a LayerNormalization over the last axis alone (not RMS scaling)."""
    rank, channels = len(output_shape), output_shape[-1]
    if [axis % rank for axis in layer.axis] != [rank - 1] or layer.rms_scaling or channels is None:
        return TensorStats.unknown("unknown: LayerNormalization not over the last axis alone, or RMS scaling")
    gamma = np.asarray(layer.gamma) if layer.scale else np.ones(channels)
    beta = np.asarray(layer.beta) if layer.center else np.zeros(channels)
    return TensorStats.of_gaussians(layernorm_gaussians(gamma, beta))


_MAX_POOLING = (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)
# Correlation of the values one max-pooling window reads (neighbouring
# positions of a feature map), for `max_pool_gaussians`.
MAX_POOL_CORRELATION = 0.5


def _max_pooled(layer, stats):
    """Max pooling raises the mean (the maximum of a window) and narrows the spread."""
    window = int(np.prod(layer.pool_size))
    rule = f"{stats.rule} -> max pooling"
    return TensorStats.of_gaussians(max_pool_gaussians(stats.gaussians, window, MAX_POOL_CORRELATION, rule))


_AVERAGE_POOLING = (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)
_GLOBAL_AVERAGE_POOLING = (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D)
_AVERAGE_POOLING += _GLOBAL_AVERAGE_POOLING
# Correlation of neighbouring positions an average pooling reads, for
# `average_pool_gaussians`: 0.75 matched the spread of a global average
# of a CIFAR Xception's last feature map and erred wide (0.5 matched) on
# the shared ResNet-8's.
AVERAGE_POOL_CORRELATION = 0.75


def _average_pooled(op, stats):
    layer = op.layer
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return stats
    if type(layer) in _GLOBAL_AVERAGE_POOLING:
        window = tuple(op.input_tensors[0].shape[1:-1])
    else:
        window = tuple(layer.pool_size)
    if not window or None in window:
        return stats
    rule = f"{stats.rule} -> average pooling"
    return TensorStats.of_gaussians(
        average_pool_gaussians(stats.gaussians, window, AVERAGE_POOL_CORRELATION, rule))


def propagate_statistics(graph, folds):
    """Data-free `TensorStats` of every tensor key of the graph.

    Args:
        graph: the model's `FlatGraph`.
        folds: BatchNorm folds from `plan_folds`.

    Returns:
        A dict from tensor key to `TensorStats`.
    """
    stats = {key: TensorStats.unknown("unknown: model input") for key in graph.input_keys}
    for op in graph.ops:
        layer = op.layer
        inputs = [stats[k] for k in op.input_keys]
        kind = type(layer)
        if kind is L.BatchNormalization:
            rank = len(op.output_tensors[0].shape)
            axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
            if axis % rank == rank - 1:
                gamma, beta, _, _ = batch_norm_parameters(layer)
                out = TensorStats.of_gaussians(batchnorm_gaussians(gamma, beta))
            else:
                out = TensorStats.unknown("unknown: BatchNormalization not on the last axis")
        elif kind is L.LayerNormalization:
            out = _layer_norm(layer, op.output_tensors[0].shape)
        elif not op.is_layer:
            out = _operation_stats(op, inputs)
        elif kind is L.PReLU:
            out = _prelu(layer, inputs[0])
        elif linear_type(layer) is not None:
            out = _linear_stats(op, inputs[0], folds.get(id(layer)))
        elif activation_layer_spec(layer) is not None:
            out = _activated(inputs[0], activation_layer_spec(layer))
        elif kind in (L.Add, L.Average, L.Concatenate, L.Multiply):
            out = _merged(op, inputs)
        elif kind is L.Rescaling:
            out = _rescaled(layer, inputs[0])
        elif kind in (L.Flatten, L.Reshape):
            out = _flattened(inputs[0], op.input_tensors[0].shape, op.output_tensors[0].shape)
        elif kind in _MAX_POOLING and inputs[0].gaussians is not None:
            out = _max_pooled(layer, inputs[0])
        elif kind in _AVERAGE_POOLING and inputs[0].gaussians is not None:
            out = _average_pooled(op, inputs[0])
        elif len(inputs) == 1 and is_sign_preserving(layer):
            # Pooling, padding, dropout...: the value distribution is kept
            # (averaging only narrows it, so this errs on the wide side).
            out = inputs[0]
            if op.output_tensors[0].shape[-1] != op.input_tensors[0].shape[-1]:
                out = out.with_gaussians(None)
        else:
            out = TensorStats.unknown(f"unknown: no statistics rule for {kind.__name__} '{layer.name}'")
        out = dataclasses.replace(out, steps=_steps(op, inputs, folds))
        for key in op.output_keys:
            stats[key] = out
    return stats


def _steps(op, inputs, folds):
    """`TensorStats.steps` of an op's output: 0 after a normalization, one more after a linear
    layer or a merge than its inputs' largest, the input's through any other op."""
    layer = op.layer
    fold = folds.get(id(layer))
    folded = fold is not None and fold.batch_norm is not None
    if type(layer) in (L.BatchNormalization, L.LayerNormalization) or folded:
        return 0
    if not inputs or any(s.steps is None for s in inputs):
        return None
    farthest = max(s.steps for s in inputs)
    if len(inputs) > 1 or (op.is_layer and linear_type(layer) is not None):
        return farthest + 1
    return farthest

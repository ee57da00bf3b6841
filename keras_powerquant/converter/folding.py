"""Which BatchNormalization layers fold into a linear layer next to them.

A BatchNorm folds backward into the linear layer that feeds it (`y =
BN(W x + b)`), or, failing that, forward into the linear layer it feeds
(`y = W BN(x) + b`, pre-activation networks) where that is exact: the
layer must never read zero padding, which the BatchNorm would have
shifted (Dense, "valid" convolutions, 1x1 kernels).
"""

import dataclasses
from typing import Optional

import keras
import numpy as np

from keras_powerquant.converter.layer_types import fused_activation_spec
from keras_powerquant.converter.layer_types import LINEAR
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.folding import fold_batch_norm
from keras_powerquant.quantization.folding import fold_batch_norm_forward


@dataclasses.dataclass(frozen=True)
class Fold:
    """The BatchNorms folded into one linear layer.

    Attributes:
        linear: the linear layer.
        layout: its kernel layout (see `registry`).
        batch_norm: the BatchNorm its output feeds, or None.
        input_batch_norm: the BatchNorm that feeds it, or None.
        input_key: the key of `input_batch_norm`'s input, which the folded
            layer reads instead of the BatchNorm's output; None without one.
    """

    linear: keras.layers.Layer
    layout: str
    batch_norm: Optional[keras.layers.BatchNormalization] = None
    input_batch_norm: Optional[keras.layers.BatchNormalization] = None
    input_key: Optional[tuple] = None

    @property
    def batch_norms(self):
        """The folded BatchNorms, the input one first."""
        return [bn for bn in (self.input_batch_norm, self.batch_norm) if bn is not None]

    @property
    def batch_norm_names(self):
        """Their names, comma-separated (for the report)."""
        return ", ".join(bn.name for bn in self.batch_norms)


def _channel_axis_reason(bn, linear, rank):
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if [a % rank for a in axes] != [linear_type(linear).channel_axis(linear, rank)]:
        return f"it normalizes axis {bn.axis}, not the channel axis of '{linear.name}'"
    return None


def _why_not_foldable(graph, op):
    """Reason a BatchNorm call cannot be folded into the layer before it, or None if it can."""
    bn = op.layer
    if len(graph.calls(bn)) != 1:
        return "the BatchNormalization layer is called more than once"
    producer = graph.producer.get(op.input_key)
    if producer is None:
        return "its input is a model input"
    linear = producer.layer
    if linear_type(linear) is None:
        return f"its input comes from {type(linear).__name__} '{linear.name}', not a Dense/Conv layer"
    if len(graph.calls(linear)) != 1:
        return f"'{linear.name}' is shared (called more than once)"
    if graph.only_consumer(op.input_key) is not op:
        return f"the output of '{linear.name}' has other consumers"
    if fused_activation_spec(linear) != LINEAR:
        return f"'{linear.name}' applies an activation before the BatchNormalization"
    return _channel_axis_reason(bn, linear, len(producer.output_tensors[0].shape))


def _linear_consumer(graph, op):
    """The op of the linear layer that alone reads the BatchNorm's output, or None."""
    consumer = graph.only_consumer(op.output_key)
    if consumer is None or linear_type(consumer.layer) is None or consumer.input_keys != [op.output_key]:
        return None
    return consumer


def _why_not_forward(graph, op, consumer):
    """Reason a BatchNorm call cannot be folded into the linear layer after it, or None if it can."""
    linear = consumer.layer
    if len(graph.calls(linear)) != 1:
        return f"'{linear.name}' is shared (called more than once)"
    if linear_type(linear).pads_input(linear):
        return (
            f"'{linear.name}' zero-pads its input (padding '{linear.padding}', kernel {linear.kernel_size}), "
            "where the BatchNorm's shift would be lost: folding it there is not exact"
        )
    return _channel_axis_reason(op.layer, linear, len(op.output_tensors[0].shape))


def plan_folds(graph):
    """Finds the BatchNorm calls to fold: backward first, then forward.

    Returns:
        `(folds, skipped)`: `folds` maps `id(linear layer)` to a `Fold`;
        `skipped` lists `(batch_norm_layer, reason)` for those left in place.
    """
    folds, pending, seen = {}, [], set()
    for op in graph.ops:
        # A nested model called twice calls its BatchNorms twice: judge each layer once.
        if type(op.layer) is not keras.layers.BatchNormalization or id(op.layer) in seen:
            continue
        seen.add(id(op.layer))
        reason = _why_not_foldable(graph, op)
        if reason is None:
            linear = graph.producer[op.input_key].layer
            folds[id(linear)] = Fold(linear, linear_type(linear).layout, batch_norm=op.layer)
        else:
            pending.append((op, reason))
    skipped = []
    for op, reason in pending:
        consumer = _linear_consumer(graph, op) if len(graph.calls(op.layer)) == 1 else None
        forward_reason = _why_not_forward(graph, op, consumer) if consumer is not None else None
        if consumer is not None and forward_reason is None:
            linear = consumer.layer
            fold = folds.get(id(linear), Fold(linear, linear_type(linear).layout))
            folds[id(linear)] = dataclasses.replace(fold, input_batch_norm=op.layer, input_key=op.input_key)
        elif consumer is not None:
            skipped.append((op.layer, f"{reason}; and before '{consumer.layer.name}': {forward_reason}"))
        else:
            skipped.append((op.layer, reason))
    return folds, skipped


def fold_records(folds):
    """Report entries `{"batch_norm": name, "into": linear layer name}`, one per folded BatchNorm."""
    return [{"batch_norm": bn.name, "into": f.linear.name} for f in folds.values() for bn in f.batch_norms]


def batch_norm_parameters(bn):
    """`(gamma, beta, moving_mean, moving_variance)` as float64 arrays."""
    mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), dtype=np.float64)
    ones, zeros = np.ones_like(mean), np.zeros_like(mean)
    gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else ones
    beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else zeros
    variance = keras.ops.convert_to_numpy(bn.moving_variance)
    return (np.asarray(gamma, np.float64), np.asarray(beta, np.float64), mean, np.asarray(variance, np.float64))


def linear_weights(layer, fold=None):
    """`(kernel, bias)` of a linear layer as float32 numpy, with `fold`'s BatchNorms folded in.

    The kernel is in the layer type's `layout` and the bias one value per
    output channel (see `registry`); `bias` is None for a layer without
    bias and no fold.
    """
    entry = linear_type(layer)
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float32)
    kernel = entry.stored_kernel(layer, kernel)
    bias = None
    # EinsumDense has a bias when it has `bias_axes`, and no `use_bias`.
    if getattr(layer, "use_bias", True) and getattr(layer, "bias", None) is not None:
        bias = entry.stored_bias(layer, np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float32))
    if fold is None:
        return kernel, bias
    if fold.input_batch_norm is not None:
        bn = fold.input_batch_norm
        # A BatchNorm of the last input axis scales that channel at every index of the others.
        parameters = [np.tile(p, entry.row_tiles(layer)) for p in batch_norm_parameters(bn)]
        kernel, bias = fold_batch_norm_forward(kernel, bias, *parameters, bn.epsilon, fold.layout, entry.groups(layer))
    if fold.batch_norm is not None:
        bn = fold.batch_norm
        parameters = [np.tile(p, entry.column_tiles(layer)) for p in batch_norm_parameters(bn)]
        kernel, bias = fold_batch_norm(kernel, bias, *parameters, bn.epsilon, fold.layout)
    return kernel, bias

"""Which BatchNormalization layers fold into the linear layer before them."""

import dataclasses

import keras
import numpy as np

from keras_powerquant.converter.layer_types import fused_activation_spec
from keras_powerquant.converter.layer_types import LINEAR
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.folding import fold_batch_norm


@dataclasses.dataclass
class Fold:
    """A BatchNorm folded into the linear layer that feeds it."""

    linear: keras.layers.Layer
    batch_norm: keras.layers.BatchNormalization
    layout: str


def _why_not_foldable(graph, op):
    """Reason a BatchNorm call cannot be folded, or None if it can."""
    bn = op.layer
    if len(graph.calls(bn)) != 1:
        return "the BatchNormalization layer is called more than once"
    producer = graph.producer.get(op.input_key)
    if producer is None:
        return "its input is a model input"
    linear = producer.layer
    entry = linear_type(linear)
    if entry is None:
        return f"its input comes from {type(linear).__name__} '{linear.name}', not a Dense/Conv layer"
    if len(graph.calls(linear)) != 1:
        return f"'{linear.name}' is shared (called more than once)"
    if graph.only_consumer(op.input_key) is not op:
        return f"the output of '{linear.name}' has other consumers"
    if fused_activation_spec(linear) != LINEAR:
        return f"'{linear.name}' applies an activation before the BatchNormalization"
    rank = len(producer.output_tensors[0].shape)
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if [a % rank for a in axes] != [entry.channel_axis(linear, rank)]:
        return f"it normalizes axis {bn.axis}, not the channel axis of '{linear.name}'"
    return None


def plan_folds(graph):
    """Finds the BatchNorm calls to fold.

    Returns:
        `(folds, skipped)`: `folds` maps `id(linear layer)` to a `Fold`;
        `skipped` lists `(batch_norm_layer, reason)` for those left in place.
    """
    folds, skipped, seen = {}, [], set()
    for op in graph.ops:
        # A nested model called twice calls its BatchNorms twice: judge each layer once.
        if type(op.layer) is not keras.layers.BatchNormalization or id(op.layer) in seen:
            continue
        seen.add(id(op.layer))
        reason = _why_not_foldable(graph, op)
        if reason is None:
            linear = graph.producer[op.input_key].layer
            folds[id(linear)] = Fold(linear, op.layer, linear_type(linear).layout)
        else:
            skipped.append((op.layer, reason))
    return folds, skipped


def batch_norm_parameters(bn):
    """`(gamma, beta, moving_mean, moving_variance)` as float64 arrays."""
    mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), dtype=np.float64)
    ones, zeros = np.ones_like(mean), np.zeros_like(mean)
    gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else ones
    beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else zeros
    variance = keras.ops.convert_to_numpy(bn.moving_variance)
    return (np.asarray(gamma, np.float64), np.asarray(beta, np.float64), mean, np.asarray(variance, np.float64))


def linear_weights(layer, fold=None):
    """`(kernel, bias)` of a linear layer as float32 numpy, BatchNorm folded in if given.

    `bias` is None for a layer without bias and no fold.
    """
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float32)
    bias = None
    if getattr(layer, "use_bias", False) and layer.bias is not None:
        bias = np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float32)
    if fold is None:
        return kernel, bias
    gamma, beta, mean, variance = batch_norm_parameters(fold.batch_norm)
    return fold_batch_norm(
        kernel, bias, gamma, beta, mean, variance, fold.batch_norm.epsilon, fold.layout
    )

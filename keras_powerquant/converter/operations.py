"""What the converter knows about `keras.ops` operations that are not layers.

Keras 3 Functional graphs record calls such as `x + 3.0`, `x * y`,
`keras.ops.relu(x)` or `keras.ops.mean(x, axis=(1, 2))` as graph nodes of
built-in operations (`Add`, `Multiply`, `Relu`, `Mean`...). They have no
weights: the converted model calls them as they are. The converter only
needs to know which are elementwise activations (they can be replaced by a
quantized activation), which keep values on a quantization grid, and which
keep values non-negative. Operations are matched by their class name in
`keras.ops` (`keras_internals.keras_op_name`); others are opaque.
"""

import numbers

import numpy as np

from keras_powerquant import keras_internals

# Single-input activation operations and the Keras activation name they compute.
_ACTIVATION_NAMES = {
    "Relu": "relu",
    "Relu6": "relu6",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softplus": "softplus",
    "Softsign": "softsign",
    "Silu": "silu",
    "HardSigmoid": "hard_sigmoid",
    "HardSilu": "hard_silu",
    "Selu": "selu",
}

# Values of the output are values of the input, moved or selected.
_GRID_PRESERVING = frozenset({"Reshape", "Transpose", "ExpandDims", "Squeeze", "Max", "Min"})

# Output >= 0 when every tensor input and every numeric constant is >= 0.
_SIGN_PRESERVING = _GRID_PRESERVING | frozenset(
    {"Add", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Mean", "Sum", "Concatenate", "Sqrt"}
)

# Output >= 0 whatever the input.
_NONNEGATIVE = frozenset({"Absolute", "Square", "Exp"})

# Elementwise operations: with one tensor input (the others constants that
# broadcast along the last axis) each output value is a function of the
# input value at the same position.
ELEMENTWISE = (
    frozenset(_ACTIVATION_NAMES)
    | _NONNEGATIVE
    | frozenset({"Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Clip"})
    | frozenset({"Negative", "Sqrt", "Gelu", "LeakyRelu", "Elu"})
)


def operation_activation_spec(operation, make_spec):
    """The elementwise activation a `keras.ops` operation computes, or None.

    Args:
        operation: a graph operation that is not a layer.
        make_spec: `make_spec(name, max_value=None, negative_slope=0.0)`
            returns the converter's `ActivationSpec`.

    Returns:
        An `ActivationSpec`, or None when the operation is no activation
        the converter can quantize (`gelu` with `approximate=True`, the
        default of `keras.ops.gelu`, is one: PowerQuantActivation's "gelu"
        is the exact one).
    """
    name = keras_internals.keras_op_name(operation)
    if name in _ACTIVATION_NAMES:
        return make_spec(_ACTIVATION_NAMES[name])
    if name == "Gelu" and not operation.approximate:
        return make_spec("gelu")
    if name == "Elu" and float(operation.alpha) == 1.0:
        return make_spec("elu")
    if name == "LeakyRelu":
        return make_spec("relu", negative_slope=float(operation.negative_slope))
    if name == "Clip" and _is_number(operation.x_min) and _is_number(operation.x_max):
        if float(operation.x_min) == 0.0:
            return make_spec("relu", max_value=float(operation.x_max))
    return None


def is_grid_preserving_operation(operation):
    return keras_internals.keras_op_name(operation) in _GRID_PRESERVING


def is_elementwise(op):
    """Whether a flat-graph `Op` of a non-layer operation is elementwise on one tensor."""
    return keras_internals.keras_op_name(op.layer) in ELEMENTWISE and len(op.input_keys) == 1


def output_nonnegative(op, nonnegative_inputs, activation_spec):
    """Whether a non-layer operation's output is >= 0 by construction.

    Args:
        op: the flat-graph `Op`.
        nonnegative_inputs: whether each of `op.input_keys` is known >= 0.
        activation_spec: `operation_activation_spec` of the operation.
    """
    if activation_spec is not None:
        return activation_spec.nonnegative
    name = keras_internals.keras_op_name(op.layer)
    if name in _NONNEGATIVE:
        return True
    if name == "Clip":
        return _is_number(op.layer.x_min) and float(op.layer.x_min) >= 0.0
    if name not in _SIGN_PRESERVING or not all(nonnegative_inputs):
        return False
    return all(_nonnegative_constant(c) for c in keras_internals.node_constants(op.node))


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _nonnegative_constant(value):
    try:
        return bool(np.all(np.asarray(value, dtype=np.float64) >= 0))
    except (TypeError, ValueError):
        return False

"""What the converter knows about activations and value-preserving layer types.

Linear layer types (kernels, folding, their PowerQuant layers) are in
`registry`. Exact types are matched (not subclasses): a subclass may
override `call`, and then its values would no longer be what we assume.
"""

import dataclasses

import keras

from keras_powerquant import keras_internals
from keras_powerquant.converter.operations import is_grid_preserving_operation
from keras_powerquant.converter.operations import operation_activation_spec
from keras_powerquant.quantization.activation_functions import NONNEGATIVE_ACTIVATIONS
from keras_powerquant.quantization.activation_functions import NUMPY_ACTIVATIONS
from keras_powerquant.quantization.activation_functions import relu

L = keras.layers

# Layers whose outputs are inputs values moved, dropped, repeated or zero
# padded: a quantized tensor stays on its quantization grid through them.
GRID_PRESERVING = (
    L.Flatten,
    L.Reshape,
    L.Permute,
    L.RepeatVector,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianDropout,
    L.GaussianNoise,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.Identity,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.MaxPooling3D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.GlobalMaxPooling3D,
)

# Layers whose output is non-negative whenever all their inputs are.
SIGN_PRESERVING = GRID_PRESERVING + (
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.Add,
    L.Average,
    L.Maximum,
    L.Minimum,
    L.Multiply,
    L.Concatenate,
)


def is_grid_preserving(layer):
    if not keras_internals.is_layer(layer):
        return is_grid_preserving_operation(layer)
    if type(layer) is L.UpSampling2D or type(layer) is L.UpSampling3D:
        return getattr(layer, "interpolation", "nearest") == "nearest"
    return type(layer) in GRID_PRESERVING or type(layer) is L.UpSampling1D


def is_sign_preserving(layer):
    return is_grid_preserving(layer) or type(layer) in SIGN_PRESERVING


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """An elementwise activation the converter can quantize.

    Attributes:
        name: the Keras activation name (a key of `NUMPY_ACTIVATIONS`).
        max_value, negative_slope, threshold: `relu` arguments.
    """

    name: str
    max_value: float = None
    negative_slope: float = 0.0
    threshold: float = 0.0

    @property
    def nonnegative(self):
        if self.name == "relu":
            return self.negative_slope == 0.0 and self.threshold >= 0.0
        return self.name in NONNEGATIVE_ACTIVATIONS

    def numpy_function(self):
        if self.name == "relu":
            return lambda x: relu(x, self.max_value, self.negative_slope, self.threshold)
        return NUMPY_ACTIVATIONS[self.name]

    def layer_arguments(self):
        """Keyword arguments of `PowerQuantActivation` for this activation."""
        arguments = {"activation": self.name}
        if self.name == "relu":
            arguments.update(
                max_value=self.max_value,
                negative_slope=self.negative_slope,
                threshold=self.threshold,
            )
        return arguments


LINEAR = ActivationSpec("linear")


def _relu_spec(max_value=None, negative_slope=0.0, threshold=0.0):
    max_value = None if max_value is None else float(max_value)
    if max_value == 6.0 and negative_slope == 0.0 and threshold == 0.0:
        return ActivationSpec("relu6")
    return ActivationSpec("relu", max_value, float(negative_slope), float(threshold))


def _spec_of_name(name, max_value=None, negative_slope=0.0):
    if name == "relu":
        return _relu_spec(max_value, negative_slope)
    return ActivationSpec(name)


def spec_of_function(function):
    """`ActivationSpec` of a Keras activation function, or None if unsupported."""
    if function is None:
        return LINEAR
    name = keras.activations.serialize(function)
    if not isinstance(name, str) or name not in NUMPY_ACTIVATIONS:
        return None
    return _relu_spec() if name == "relu" else ActivationSpec(name)


def activation_layer_spec(layer):
    """`ActivationSpec` of an activation layer or `keras.ops` activation, or None if it is not one we handle."""
    if not keras_internals.is_layer(layer):
        return operation_activation_spec(layer, _spec_of_name)
    if type(layer) is L.ReLU:
        return _relu_spec(layer.max_value, layer.negative_slope, layer.threshold)
    if type(layer) is L.LeakyReLU:
        return _relu_spec(negative_slope=layer.negative_slope)
    if type(layer) is L.Activation:
        spec = spec_of_function(layer.activation)
        return None if spec == LINEAR else spec
    return None


def fused_activation_spec(layer):
    """`ActivationSpec` of a Dense/Conv layer's own `activation`, or None if unsupported."""
    return spec_of_function(getattr(layer, "activation", None))

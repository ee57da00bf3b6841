"""PowerQuantActivation: an activation whose output is power-quantized."""

import keras
import tensorflow as tf

from keras_powerquant.quantization.activations import ActivationQuantizer


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantActivation(keras.layers.Layer):
    """Applies an activation, then power-quantizes its output.

    `y = decode(encode(f(x)))` with the quantizer of `ActivationQuantizer`
    (unsigned: `q = round(M (min(f(x), c) / c)^a)`, `y = c (q / M)^(1/a)`).
    No power is evaluated at run time: encoding is TensorFlow's `Bucketize`
    against the fixed thresholds `c ((k - 1/2) / M)^(1/a)` and decoding a
    gather from the table of levels. For an unsigned quantizer after
    `relu` (or `relu6` with `clip <= 6`) the activation itself is skipped:
    bucketizing already maps negatives to 0 and clips at `c`.

    Args:
        activation: a Keras activation name ("relu", "relu6", "sigmoid",
            "linear" for a plain input quantizer...).
        bits: bit width, 2 to 8.
        exponent: the power exponent `a`.
        clip: the clip value `c`.
        signed: unsigned (`[0, c]`) or signed symmetric (`[-c, c]`) codes.
        max_value, negative_slope, threshold: the arguments of
            `keras.layers.ReLU`, used when `activation="relu"`.

    Input shape:
        Arbitrary.

    Output shape:
        Same as the input.
    """

    def __init__(
        self,
        activation="relu",
        bits=4,
        exponent=1.0,
        clip=1.0,
        signed=False,
        max_value=None,
        negative_slope=0.0,
        threshold=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.quantizer = ActivationQuantizer(bits, exponent, clip, signed)
        if not isinstance(activation, str):
            raise ValueError(f"`activation` must be a Keras activation name; got {activation!r}.")
        self.activation = activation
        self.max_value = None if max_value is None else float(max_value)
        self.negative_slope = float(negative_slope)
        self.threshold = float(threshold)
        self._activation_fn = keras.activations.get(activation)
        self._thresholds = [float(t) for t in self.quantizer.thresholds()]
        self._levels = self.quantizer.levels()
        self.built = True

    @property
    def activation_absorbed(self):
        """Whether quantization alone already computes the activation."""
        if self.quantizer.signed:
            return False
        clip = self.quantizer.clip
        if self.activation == "relu":
            plain = self.negative_slope == 0.0 and self.threshold == 0.0
            return plain and (self.max_value is None or self.max_value >= clip)
        return self.activation == "relu6" and clip <= 6.0

    def apply_activation(self, inputs):
        """The float activation `f(x)`, before quantization."""
        if self.activation == "relu":
            return keras.activations.relu(
                inputs,
                negative_slope=self.negative_slope,
                max_value=self.max_value,
                threshold=self.threshold,
            )
        return self._activation_fn(inputs)

    def call(self, inputs):
        if not self.activation_absorbed:
            inputs = self.apply_activation(inputs)
        indices = tf.raw_ops.Bucketize(input=inputs, boundaries=self._thresholds)
        return tf.gather(self._levels, indices)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(self.quantizer.get_config())
        config.update(
            {
                "activation": self.activation,
                "max_value": self.max_value,
                "negative_slope": self.negative_slope,
                "threshold": self.threshold,
            }
        )
        return config

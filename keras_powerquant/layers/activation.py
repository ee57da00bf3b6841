"""PowerQuantActivation: an activation whose output is power-quantized."""

import keras
import tensorflow as tf

from keras_powerquant.quantization.activations import ActivationQuantizer

# Exponents 1/2, 1/4, 1/8 are computed with square roots and squares: two or
# more elementwise passes besides the FakeQuant, far cheaper than exp/log.
_MAX_ROOTS = 3


def _square_roots(exponent):
    """k when `exponent == 1 / 2**k` for 1 <= k <= 3, else None."""
    for roots in range(1, _MAX_ROOTS + 1):
        if exponent == 0.5**roots:
            return roots
    return None


def _uniform_magnitudes(values, top, levels):
    """Quantizes values in `[0, top]` to `levels + 1` uniform levels (ties up).

    One `FakeQuantWithMinMaxArgs` op when the level count is a power of two
    it supports; a short arithmetic chain otherwise.
    """
    count = levels + 1
    num_bits = count.bit_length() - 1
    if count == 2**num_bits and num_bits >= 2:
        return tf.quantization.fake_quant_with_min_max_args(values, min=0.0, max=top, num_bits=num_bits)
    step = top / levels
    return tf.floor(tf.minimum(values, top) * (1.0 / step) + 0.5) * step


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantActivation(keras.layers.Layer):
    """Applies an activation, then power-quantizes its output.

    `y = decode(encode(f(x)))` with the quantizer of `ActivationQuantizer`:
    unsigned, `q = round(M (min(f(x), c) / c)^a)` and `y = c (q / M)^(1/a)`
    with `M = 2^bits - 1`; signed, the same on `|f(x)|` with
    `m = 2^(bits-1) - 1` levels per side.

    Quantizing `x` with the power grid is quantizing `u = x^a` uniformly on
    `[0, c^a]`, so the layer computes `u = exp(a log x)`, applies
    TensorFlow's uniform `FakeQuantWithMinMaxArgs` (which clips and rounds
    ties up, like `ActivationQuantizer`) and maps back with
    `exp(log(u) / a)`. At `a = 1` it is one FakeQuant op, and at
    `a = 1/2, 1/4, 1/8` square roots and squares replace `exp`/`log`: at
    `a = 1/2` a square root, the FakeQuant and a square, the absorbed ReLU
    running inside the convolution before it once Grappler has fused it
    (the serving graph's cost is profiled in benchmarks/RESULTS.md,
    "Inference cost"). On CPU the `exp`/`log` form
    is 3 to 5 times faster than bucketizing against the thresholds and
    gathering the levels (see benchmarks/RESULTS.md), and every op has a GPU
    kernel. Outputs equal the numpy reference up to float32 rounding (a few
    ulps); an input within such a rounding error of a decision threshold can
    take the neighbouring code.

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
        self.built = True

    @property
    def activation_absorbed(self):
        """Whether quantization alone already computes the activation.

        An unsigned quantizer maps negatives to 0 and clips at `c`, which is
        `relu` (or `relu6` when `c <= 6`) followed by quantization.
        """
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
        quantizer = self.quantizer
        values = inputs if self.activation_absorbed else self.apply_activation(inputs)
        a, clip, levels = quantizer.exponent, quantizer.clip, quantizer.max_code
        if a == 1.0:
            if quantizer.signed:
                return tf.quantization.fake_quant_with_min_max_args(
                    values, min=-clip, max=clip, num_bits=quantizer.bits, narrow_range=True
                )
            return tf.quantization.fake_quant_with_min_max_args(
                values, min=0.0, max=clip, num_bits=quantizer.bits
            )
        sign = tf.sign(values) if quantizer.signed else None
        # The power needs x >= 0: magnitudes for signed codes, negatives to 0 otherwise.
        roots = _square_roots(a)
        if quantizer.signed:
            magnitudes = tf.abs(values)
        elif roots is None:
            # Not tf.nn.relu: Grappler composes Relu+Log after an Add into one
            # op and its remapper then fails with an error in the serving log.
            magnitudes = tf.maximum(values, 0.0)
        else:
            magnitudes = tf.nn.relu(values)
        if roots is None:
            powered = tf.exp(tf.math.log(magnitudes) * a)
        else:
            # In a graph, the first root as Pow(x, 1/2), which Grappler
            # rewrites to Sqrt only after its pass composing chains of unary
            # ops: the Relu is then fused into the convolution before it (a
            # free epilogue) rather than composed with a Sqrt into one more
            # pass over the tensor (benchmarks/RESULTS.md, op profile).
            # Eagerly (no Grappler) the same Sqrt directly.
            if quantizer.signed or tf.executing_eagerly():
                powered = tf.sqrt(magnitudes)
            else:
                powered = tf.pow(magnitudes, 0.5)
            for _ in range(roots - 1):
                powered = tf.sqrt(powered)
        decoded = _uniform_magnitudes(powered, float(clip**a), levels)
        if roots is None:
            decoded = tf.exp(tf.math.log(decoded) * (1.0 / a))
        else:
            for _ in range(roots):
                decoded = tf.square(decoded)
        return decoded * sign if quantizer.signed else decoded

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

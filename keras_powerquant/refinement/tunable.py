"""A fake-quantized copy of the converted model whose quantizer settings are variables.

Refinement evaluates the quantized network hundreds of times with different
clip values, exponents, bit widths and scale granularities. Rebuilding a
Keras model for each would cost seconds; instead `TunableBuilder` builds one
model, once, whose quantized layers compute their kernel from the float
kernel and whose activation quantizers read their clip and exponent from
`tf.Variable`s. Assigning new settings and running the model is all an
evaluation costs.

Kernel (per layer, scales `s = alpha * max|W|` per channel or per tensor):

    W_hat = sign(W) * s * (round(m * min(|W| / s, 1)^a) / m)^(1/a),   m = 2^(b-1) - 1

Activation (clip `c`, exponent `a`, `M` levels; on `|x|` with the sign kept
when signed):

    x_hat = c * (round(M * min(x / c, 1)^a) / M)^(1/a)

These equal the exported layers' quantizers (`WeightQuantizer`,
`ActivationQuantizer`) up to float32 rounding at decision thresholds.

For learned rounding (AdaRound, Nagel et al. 2020) a kernel's `round` can
be replaced by `floor(u) + h(V)`, with a per-weight variable `V` and the
rectified sigmoid `h(V) = clip(1.2 sigmoid(V) - 0.1, 0, 1)` (`SOFT`), or
by `floor(u) + [V >= 0]` once learned (`HARD`); `FLOAT` computes with the
float kernel and a disabled activation quantizer passes values through, so
the same model also gives the float network's intermediate values. In
`CODES` mode (second-order rounding) `V` holds the signed integer codes
themselves: `W_hat = sign(V) s (|V| / m)^(1/a)`.

Bias correction as conversion applies it after refinement (empirical:
each layer's output mean moved back to the float model's) is part of what
the model computes, so refinement minimises the loss of the corrected
network: a layer whose `correcting` variable is 1 subtracts from its
output, before bias and activation, `mean(y_hat) - mean(y)` per output
channel, the means over every axis but the channels of the batch being
evaluated, with `mean(y)` the float model's on the same batch
(`reference_mean`, recorded in a capturing pass of the float model).
"""

import numpy as np
import tensorflow as tf

from keras_powerquant.converter.builder import ModelBuilder
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.registry import quantized_classes
from keras_powerquant.layers import PowerQuantActivation
from keras_powerquant.quantization.weights import channel_scales

# Magnitudes below this are zero for the logarithm of the power-domain form.
_TINY = 1e-30


# Kernel rounding modes (the `rounding_mode` variable).
NEAREST, SOFT, HARD, FLOAT, CODES = 0, 1, 2, 3, 4
_STRETCH = (-0.1, 1.1)


def rectified_sigmoid(values):
    """AdaRound's `h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`."""
    low, high = _STRETCH
    return tf.clip_by_value(tf.sigmoid(values) * (high - low) + low, 0.0, 1.0)


def rounding_logits(fractions):
    """`V` with `h(V) = fractions` (fractions strictly inside (0, 1) stay exact)."""
    low, high = _STRETCH
    p = np.clip((np.asarray(fractions, np.float64) - low) / (high - low), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p)).astype(np.float32)


def _rounded(values):
    """Rounds half up, as the exported quantizers do (`tf.round` rounds half to even)."""
    return tf.floor(values + 0.5)


class TunableKernelMixin:
    """Turns a `QuantizedKernelLayer` class into one with variable quantizer settings.

    The layer keeps the float kernel and computes `dequantized_kernel()`
    from the variables `exponent`, `clip_fraction`, `max_code` (`2^(b-1) - 1`)
    and `per_channel` (1.0 or 0.0). Calls read it from `cached_kernel`,
    which `refresh_kernel()` recomputes when a setting changes (most
    evaluations change one layer's), unless `live` is set. When
    `corrects_mean` (set before the layer is built; channels-last layers
    only, as conversion's empirical bias correction), its output is
    mean-corrected as the module docstring says while `correcting` is 1,
    and a call made while `capturing` records
    the batch's per-channel output mean in `reference_mean` instead; the
    last shift subtracted is kept in `applied_shift`. While `shift_fixed` is
    1 the layer subtracts `fixed_shift` instead of the batch's shift, as
    the exported layer does with its corrected bias.
    """

    corrects_mean = False
    capturing = False
    # While True (a step training the layer's own variables), calls compute
    # the kernel from its settings; else they read `cached_kernel`.
    live = False

    def build(self, input_shape):
        super().build(input_shape)
        shape = self._kernel_shape
        channel_shape = shape[len(shape) - self.channel_ndim :]
        self.float_kernel = self.add_weight(
            name="float_kernel", shape=shape, initializer="zeros", trainable=False
        )
        self.channel_max = self.add_weight(
            name="channel_max", shape=channel_shape, initializer="zeros", trainable=False
        )
        self.tensor_max = self.add_weight(name="tensor_max", shape=(), initializer="zeros", trainable=False)
        self.exponent = self.add_weight(name="exponent", shape=(), initializer="ones", trainable=False)
        self.clip_fraction = self.add_weight(
            name="clip_fraction", shape=(), initializer="ones", trainable=False
        )
        self.max_code = self.add_weight(name="max_code", shape=(), initializer="ones", trainable=False)
        self.per_channel_flag = self.add_weight(
            name="per_channel", shape=(), initializer="ones", trainable=False
        )
        self.cached_kernel = self.add_weight(
            name="cached_kernel", shape=shape, initializer="zeros", trainable=False
        )
        self.rounding = self.add_weight(name="rounding", shape=shape, initializer="zeros", trainable=True)
        self.rounding_mode = self.add_weight(
            name="rounding_mode", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self.reference_mean = self.add_weight(
            name="reference_mean", shape=self.bias_shape(input_shape, shape), initializer="zeros", trainable=False
        )
        self.correcting = self.add_weight(name="correcting", shape=(), initializer="zeros", trainable=False)
        self.applied_shift = self.add_weight(
            name="applied_shift", shape=self.bias_shape(input_shape, shape), initializer="zeros", trainable=False
        )
        self.fixed_shift = self.add_weight(
            name="fixed_shift", shape=self.bias_shape(input_shape, shape), initializer="zeros", trainable=False
        )
        self.shift_fixed = self.add_weight(name="shift_fixed", shape=(), initializer="zeros", trainable=False)

    def _finish(self, outputs):
        channel_shape = tuple(self.reference_mean.shape)
        if self.corrects_mean and tuple(outputs.shape[len(outputs.shape) - len(channel_shape) :]) == channel_shape:
            mean = tf.reduce_mean(outputs, axis=list(range(len(outputs.shape) - len(channel_shape))))
            if self.capturing:
                self.reference_mean.assign(mean)
            else:
                batch_shift = mean - self.reference_mean
                fixed = self.shift_fixed
                shift = self.correcting * (fixed * self.fixed_shift + (1.0 - fixed) * batch_shift)
                self.applied_shift.assign(shift)
                outputs = outputs - shift
        return super()._finish(outputs)

    def call_kernel(self):
        return self.op_kernel(self.dequantized_kernel() if self.live else self.cached_kernel)

    def refresh_kernel(self):
        """Recomputes `cached_kernel` from the settings: after any of them changes."""
        self.cached_kernel.assign(self.dequantized_kernel())

    def set_float_weights(self, kernel, bias=None, clip_fraction=1.0, rounding_up=None, codes=None):
        # Learned rounding and explicit codes reach this model through `NetworkObjective.assign`.
        kernel = np.asarray(kernel, dtype=np.float32)
        self.float_kernel.assign(kernel)
        self.channel_max.assign(channel_scales(kernel, self.channel_ndim))
        self.tensor_max.assign(float(np.max(np.abs(kernel), initial=0.0)))
        self.clip_fraction.assign(clip_fraction)
        if self.use_bias:
            self.bias.assign(np.asarray(bias, dtype=np.float32))

    def scale(self):
        """The kernel scales `alpha * max|W|`, per channel or per tensor."""
        flag = self.per_channel_flag
        return (flag * self.channel_max + (1.0 - flag) * self.tensor_max) * self.clip_fraction

    def powered_codes(self):
        """`u = m min(|W| / s, 1)^a`, the codes before rounding."""
        scale = self.scale()
        safe = tf.where(scale > 0, scale, tf.ones_like(scale))
        normalized = tf.minimum(tf.abs(self.float_kernel) / safe, 1.0)
        # The floor keeps pow's gradient finite at 0.
        return self.max_code * tf.pow(tf.maximum(normalized, _TINY), self.exponent)

    def dequantized_kernel(self):
        kernel = self.float_kernel
        powered = self.powered_codes()
        top = self.max_code
        nearest = lambda: _rounded(powered)  # noqa: E731
        codes = tf.switch_case(
            tf.convert_to_tensor(self.rounding_mode),
            [
                nearest,
                lambda: tf.minimum(tf.floor(powered) + rectified_sigmoid(self.rounding), top),
                lambda: tf.minimum(tf.floor(powered) + tf.cast(self.rounding >= 0, tf.float32), top),
                nearest,  # FLOAT: unused
                lambda: tf.abs(self.rounding),
            ],
        )
        ratio = tf.maximum(codes / top, _TINY)
        magnitudes = tf.where(codes > 0, tf.pow(ratio, 1.0 / self.exponent), 0.0)
        # Explicit codes carry their own sign: a small weight's code may cross zero.
        sign = tf.where(tf.equal(self.rounding_mode, CODES), tf.sign(self.rounding), tf.sign(kernel))
        quantized = sign * magnitudes * self.scale()
        return tf.cond(tf.equal(self.rounding_mode, FLOAT), lambda: tf.identity(kernel), lambda: quantized)


class TunableActivation(PowerQuantActivation):
    """`PowerQuantActivation` whose clip and exponent are variables `clip`, `exponent`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clip = self.add_weight(name="clip", shape=(), initializer="ones", trainable=False)
        self.exponent = self.add_weight(name="exponent", shape=(), initializer="ones", trainable=False)
        self.enabled = self.add_weight(name="enabled", shape=(), initializer="ones", trainable=False)
        self.clip.assign(self.quantizer.clip)
        self.exponent.assign(self.quantizer.exponent)

    def call(self, inputs):
        values = self.apply_activation(inputs)
        return tf.cond(self.enabled > 0, lambda: self._quantized(values), lambda: tf.identity(values))

    def _quantized(self, values):
        signed = self.quantizer.signed
        magnitudes = tf.abs(values) if signed else tf.maximum(values, 0.0)
        # Uniform on u = x^a in [0, c^a]; at a = 1 a single FakeQuant op.
        decoded = tf.cond(
            tf.equal(self.exponent, 1.0),
            lambda: self._uniform(magnitudes, self.clip),
            lambda: self._power(magnitudes),
        )
        return decoded * tf.sign(values) if signed else decoded

    def _power(self, magnitudes):
        powered = tf.exp(tf.math.log(tf.maximum(magnitudes, _TINY)) * self.exponent)
        decoded = self._uniform(powered, tf.pow(self.clip, self.exponent))
        return tf.where(decoded > 0, tf.exp(tf.math.log(tf.maximum(decoded, _TINY)) / self.exponent), 0.0)

    def _uniform(self, magnitudes, top):
        """`max_code + 1` uniform levels on `[0, top]`, ties rounded up."""
        levels = self.quantizer.max_code
        num_bits = (levels + 1).bit_length() - 1
        if levels + 1 == 2**num_bits and num_bits >= 2:
            return tf.quantization.fake_quant_with_min_max_vars(magnitudes, 0.0, top, num_bits=num_bits)
        step = top / levels
        return _rounded(tf.minimum(magnitudes, top) / step) * step


_TUNABLE_CLASSES = {
    cls: type(f"Tunable{cls.__name__}", (TunableKernelMixin, cls), {}) for cls in quantized_classes()
}


class TunableBuilder(ModelBuilder):
    """Builds the fake-quantized evaluation model of a conversion plan.

    After `build()`, `kernel_layers` maps each quantized layer's original
    name to its tunable layer and `activation_layers` maps each quantizer
    key to its `TunableActivation`.
    """

    def __init__(self, graph, folds, plan, per_channel=True):
        super().__init__(graph, folds, plan, per_channel)
        self.kernel_layers = {}
        self.activation_layers = {}

    def _new_quantized_layer(self, plan, name, activation):
        layer = super()._new_quantized_layer(plan, name, activation)
        config = layer.get_config()
        tunable = _TUNABLE_CLASSES[type(layer)].from_config(config)
        tunable.corrects_mean = linear_type(plan.layer).channels_last(plan.layer)
        self.kernel_layers[plan.layer.name] = tunable
        return tunable

    def _new_activation_layer(self, quantizer, name):
        layer = super()._new_activation_layer(quantizer, name)
        tunable = TunableActivation(**layer.get_config())
        self.activation_layers[quantizer.key] = tunable
        return tunable

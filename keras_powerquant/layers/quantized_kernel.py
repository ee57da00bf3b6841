"""Base class of the layers whose kernel is stored as power-quantized integer codes."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant.layers.load_time_decoding import active_decoded_kernel
from keras_powerquant.quantization.packing import MAX_PACKED_BITS
from keras_powerquant.quantization.packing import nibble_pair_table
from keras_powerquant.quantization.packing import pack_nibbles
from keras_powerquant.quantization.weights import WeightQuantizer


class QuantizedKernelLayer(keras.layers.Layer):
    """A layer whose kernel is integer codes, per-channel scales and an exponent.

    Weights (all created in `build`, from the input shape):
    - `kernel_codes`: int8. At `weight_bits <= 4` two codes share a byte
      (shape `(ceil(n / 2),)` for a kernel of `n` values); otherwise one code
      per byte, in the kernel's shape.
    - `kernel_scale`: float32, `alpha max |W|` per output channel (shape of
      the kernel's trailing output-channel axes), or a scalar per tensor;
      `alpha` is the clip fraction given to `set_float_weights` (1 = no clip).
    - `bias`: float32 `(channels,)` (`bias_shape`), when `use_bias`.

    The stored kernel holds its output-channel axes last (the scales' axes).
    A layer whose op takes another layout (Conv2DTranspose's
    `(kh, kw, filters, in)`) overrides `op_kernel` to reorder the decoded
    kernel; load-time decoding stores the reordered kernel, so serving does
    not reorder it on each call.

    The kernel is decoded on each call with one gather from a table of the
    normalized levels `sign(q) (|q| / m)^(1/a)` (at `<= 4` bits, a table of
    both codes of every byte value, which unpacks and decodes at once), then
    scaled per channel; at `a = 1` above 4 bits the decode is a cast and a
    multiply. The layer then runs the standard float op. In a SavedModel
    exported with `decode_weights="load"` (the default), the kernel is
    decoded once when the SavedModel is loaded instead (see
    `load_time_decoding`). Subclasses set
    `channel_ndim` and implement `kernel_shape(input_shape)` and `call`.

    Args:
        weight_bits: bit width of the kernel codes, 2 to 8.
        weight_exponent: the power exponent `a` of the kernel quantizer.
        per_channel: one scale per output channel (default) or per tensor.
        activation: activation applied to the output (any Keras activation).
        use_bias: whether the layer adds a float32 bias.
    """

    channel_ndim = 1
    # Whether a SavedModel exported with `decode_weights="load"` decodes the
    # whole kernel once when loaded (False: every call decodes what it reads).
    decodes_at_load = True

    def __init__(
        self,
        weight_bits=4,
        weight_exponent=1.0,
        per_channel=True,
        activation=None,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.quantizer = WeightQuantizer(weight_bits, weight_exponent, per_channel)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias

    @property
    def weight_bits(self):
        return self.quantizer.bits

    @property
    def weight_exponent(self):
        return self.quantizer.exponent

    @property
    def packed(self):
        """Whether two codes share a byte (`weight_bits <= 4`)."""
        return self.weight_bits <= MAX_PACKED_BITS

    def kernel_shape(self, input_shape):
        raise NotImplementedError

    def output_channels(self, kernel_shape):
        return math.prod(kernel_shape[len(kernel_shape) - self.channel_ndim :])

    def bias_shape(self, input_shape, kernel_shape):
        """Shape of the bias: one value per output channel."""
        return (self.output_channels(kernel_shape),)

    def op_kernel(self, kernel):
        """The kernel in the layout the layer's op takes; the stored layout unless overridden."""
        return kernel

    def op_kernel_shape(self):
        """Shape of `op_kernel(dequantized_kernel())`."""
        return self._kernel_shape

    def build(self, input_shape):
        shape = tuple(int(d) for d in self.kernel_shape(input_shape))
        self._kernel_shape = shape
        self._kernel_size = math.prod(shape)
        codes_shape = ((self._kernel_size + 1) // 2,) if self.packed else shape
        scale_shape = shape[len(shape) - self.channel_ndim :] if self.quantizer.per_channel else ()
        self.kernel_codes = self.add_weight(
            name="kernel_codes", shape=codes_shape, dtype="int8", initializer="zeros", trainable=False
        )
        self.kernel_scale = self.add_weight(
            name="kernel_scale", shape=scale_shape, initializer="zeros", trainable=False
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=self.bias_shape(input_shape, shape), initializer="zeros", trainable=False
            )
        else:
            self.bias = None
        table = self.quantizer.decode_table()
        self._decode_table = nibble_pair_table(table) if self.packed else table

    def set_float_weights(self, kernel, bias=None, clip_fraction=1.0, rounding_up=None, codes=None):
        """Quantizes a float kernel into this (built) layer and sets the bias.

        Args:
            kernel: float array of the layer's kernel shape: the Keras
                layer's kernel, or for layers whose Keras kernel does not
                hold its output channels last (Conv2DTranspose,
                EinsumDense), that kernel with its axes reordered so it does.
            bias: float array of `bias_shape` (`(channels,)`); required iff `use_bias`.
            clip_fraction: weight clip fraction `alpha` in `(0, 1]`, a scalar
                or one per scale: the scales become `alpha max |W|` and larger
                magnitudes take the largest code.
            rounding_up: optional learned rounding, see `WeightQuantizer.encode`.
            codes: optional explicit integer codes of the kernel's shape
                (second-order rounding), see `WeightQuantizer.encode`.
        """
        kernel = np.asarray(kernel, dtype=np.float32)
        if kernel.shape != self._kernel_shape:
            raise ValueError(
                f"Layer '{self.name}' expects a kernel of shape {self._kernel_shape}; "
                f"got {kernel.shape}."
            )
        channel_ndim = self.channel_ndim if self.quantizer.per_channel else 0
        codes, scales = self.quantizer.encode(kernel, channel_ndim, clip_fraction, rounding_up, codes)
        self.kernel_codes.assign(pack_nibbles(codes) if self.packed else codes)
        self.kernel_scale.assign(scales)
        if self.use_bias:
            if bias is None:
                raise ValueError(f"Layer '{self.name}' uses a bias; none was given.")
            self.bias.assign(np.asarray(bias, dtype=np.float32))
        elif bias is not None:
            raise ValueError(f"Layer '{self.name}' has no bias; one was given.")

    def dequantized_kernel(self):
        """The float32 kernel the layer computes with, in its stored layout (`set_float_weights`')."""
        if not self.packed and self.weight_exponent == 1.0:
            scale = self.kernel_scale * (1.0 / self.quantizer.max_code)
            return tf.cast(self.kernel_codes, tf.float32) * scale
        indices = tf.cast(self.kernel_codes, tf.int32)
        if self.packed:
            # Row r of the pair table holds both codes of the byte r - 128.
            pairs = tf.gather(self._decode_table, indices + 128)
            if self._kernel_size % 2:
                pairs = tf.reshape(pairs, [-1])[: self._kernel_size]
            values = tf.reshape(pairs, self._kernel_shape)
        else:
            values = tf.gather(self._decode_table, indices + self.quantizer.max_code)
        return values * self.kernel_scale

    def call_kernel(self):
        """The kernel `call` computes with, in `op_kernel`'s layout.

        Decoded at load time in a SavedModel exported so, else now.
        """
        decoded = active_decoded_kernel(self)
        return decoded.read() if decoded is not None else self.op_kernel(self.dequantized_kernel())

    def _finish(self, outputs):
        if self.use_bias:
            outputs = self._add_bias(outputs)
        return self.activation(outputs) if self.activation is not None else outputs

    def _add_bias(self, outputs):
        return tf.nn.bias_add(outputs, self.bias, data_format=self._bias_data_format())

    def _bias_data_format(self):
        return "N...C"

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weight_bits": self.weight_bits,
                "weight_exponent": self.weight_exponent,
                "per_channel": self.quantizer.per_channel,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
            }
        )
        return config

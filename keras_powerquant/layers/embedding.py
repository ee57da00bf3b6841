"""PowerQuantEmbedding: `Embedding` with a power-quantized integer table, decoded per looked-up row."""

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant.layers.quantized_kernel import QuantizedKernelLayer
from keras_powerquant.quantization.packing import nibble_pair_table
from keras_powerquant.quantization.packing import pack_nibbles


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantEmbedding(QuantizedKernelLayer):
    """Embedding lookup whose table is stored as power-quantized codes, one scale per row.

    The table `E` of shape `(input_dim, output_dim)` is stored as int8 codes
    `q` and per-row scales `s` (`s[i] = alpha max_j |E[i, j]|`): row `i` of
    the table is `s[i] * sign(q[i]) (|q[i]| / m)^(1/a)`. A call gathers the
    codes and scales of the looked-up ids and decodes only those rows, so a
    lookup costs `O(ids * output_dim)`, whatever `input_dim`; the float table
    is never built (nor at SavedModel load time: `decodes_at_load` is False).

    Per-row scales, not per output column: a row is what one lookup reads,
    and rows differ in norm (frequent and rare tokens), so a row's scale
    fits its own range; per-column scales would let the largest rows set
    every column's step.

    Weights:
    - `kernel_codes`: int8 `(input_dim, ceil(output_dim / 2))` at
      `weight_bits <= 4` (two codes of a row per byte, a row of odd length
      padded with code 0), else `(input_dim, output_dim)`.
    - `kernel_scale`: float32 `(input_dim,)`, or a scalar per tensor.

    The input is integer ids: there is no activation quantizer and no bias.

    Args:
        input_dim: vocabulary size (ids are in `[0, input_dim)`).
        output_dim: embedding size.
        mask_zero: whether id 0 is padding and masked, as in `keras.layers.Embedding`.
        weight_bits, weight_exponent, per_channel: see `QuantizedKernelLayer`
            (`per_channel`: one scale per row).

    Input shape:
        integer tensor `(batch_size, ...)`.

    Output shape:
        `(batch_size, ..., output_dim)` float32.
    """

    decodes_at_load = False

    def __init__(self, input_dim, output_dim, mask_zero=False, weight_bits=4, weight_exponent=1.0,
                 per_channel=True, **kwargs):
        super().__init__(weight_bits, weight_exponent, per_channel, activation=None, use_bias=False, **kwargs)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero

    def kernel_shape(self, input_shape):
        return (self.input_dim, self.output_dim)

    def build(self, input_shape=None):
        self._kernel_shape = self.kernel_shape(input_shape)
        self._kernel_size = self.input_dim * self.output_dim
        row_bytes = (self.output_dim + 1) // 2 if self.packed else self.output_dim
        self.kernel_codes = self.add_weight(
            name="kernel_codes", shape=(self.input_dim, row_bytes), dtype="int8", initializer="zeros",
            trainable=False,
        )
        self.kernel_scale = self.add_weight(
            name="kernel_scale", shape=(self.input_dim,) if self.quantizer.per_channel else (),
            initializer="zeros", trainable=False,
        )
        self.bias = None
        table = self.quantizer.decode_table()
        self._decode_table = nibble_pair_table(table) if self.packed else table

    def set_float_weights(self, kernel, bias=None, clip_fraction=1.0):
        """Quantizes the float table `(input_dim, output_dim)` into this (built) layer.

        Args:
            kernel: the float table.
            bias: must be None (an embedding has none).
            clip_fraction: `alpha` in `(0, 1]`, a scalar or one per row.
        """
        table = np.asarray(kernel, dtype=np.float32)
        if table.shape != self._kernel_shape:
            raise ValueError(f"Layer '{self.name}' expects a table of shape {self._kernel_shape}; got {table.shape}.")
        if bias is not None:
            raise ValueError(f"Layer '{self.name}' has no bias; one was given.")
        # Rows as the trailing (channel) axis: one scale per row.
        codes, scales = self.quantizer.encode(table.T, 1 if self.quantizer.per_channel else 0, clip_fraction)
        codes = codes.T
        if self.packed:
            if self.output_dim % 2:
                codes = np.pad(codes, [(0, 0), (0, 1)])
            codes = pack_nibbles(codes).reshape(self.input_dim, -1)
        self.kernel_codes.assign(codes)
        self.kernel_scale.assign(scales)

    def decoded_rows(self, ids):
        """The decoded table rows of integer `ids` (any shape): float32 `ids.shape + (output_dim,)`."""
        ids = tf.cast(ids, "int32")
        codes = tf.gather(self.kernel_codes, ids)
        if self.packed:
            # Each byte's two codes decode at once (`nibble_pair_table`), then the pairs are laid flat.
            pairs = tf.gather(self._decode_table, tf.cast(codes, tf.int32) + 128)
            values = tf.reshape(pairs, tf.concat([tf.shape(ids), [-1]], axis=0))[..., : self.output_dim]
        elif self.weight_exponent == 1.0:
            values = tf.cast(codes, tf.float32) * (1.0 / self.quantizer.max_code)
        else:
            values = tf.gather(self._decode_table, tf.cast(codes, tf.int32) + self.quantizer.max_code)
        if not self.quantizer.per_channel:
            return values * self.kernel_scale
        return values * tf.gather(self.kernel_scale, ids)[..., None]

    def dequantized_kernel(self):
        """The whole float32 table `(input_dim, output_dim)` (for inspection; calls decode only their rows)."""
        return self.decoded_rows(tf.range(self.input_dim))

    def call(self, inputs):
        return self.decoded_rows(inputs)

    def compute_mask(self, inputs, mask=None):
        return keras.ops.not_equal(inputs, 0) if self.mask_zero else None

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        del config["activation"], config["use_bias"]
        config.update({"input_dim": self.input_dim, "output_dim": self.output_dim, "mask_zero": self.mask_zero})
        return config

"""PowerQuantConv2DTranspose: `Conv2DTranspose` with a power-quantized integer kernel."""

import keras
import tensorflow as tf

from keras_powerquant.layers.conv import _tuple
from keras_powerquant.layers.conv import PowerQuantBaseConv


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantConv2DTranspose(PowerQuantBaseConv):
    """Transposed 2-D convolution whose kernel is stored as power-quantized codes.

    Computes `activation(conv_transpose(x, W_hat) + bias)` as
    `keras.layers.Conv2DTranspose` does, one scale per filter.

    The kernel is stored as `(kh, kw, in_channels, filters)`, output channels
    last like every PowerQuant layer's (so per-channel scales, BatchNorm
    folding and the weight fits treat it as a Conv2D kernel);
    `set_float_weights` takes that layout, i.e. the Keras kernel
    `(kh, kw, filters, in_channels)` with its two last axes swapped, and the
    op receives the decoded kernel swapped back (`op_kernel`).

    Args:
        filters: number of output channels.
        kernel_size, strides, padding, output_padding, data_format,
            dilation_rate: as in `keras.layers.Conv2DTranspose`.
        weight_bits, weight_exponent, per_channel, activation, use_bias: see
            `QuantizedKernelLayer`.

    Input shape:
        4-D `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        4-D, with `filters` channels and the rows and columns that
        `keras.layers.Conv2DTranspose` gives.
    """

    def __init__(self, filters, kernel_size, output_padding=None, **kwargs):
        super().__init__(2, kernel_size, **kwargs)
        self.filters = int(filters)
        self.output_padding = None if output_padding is None else _tuple(output_padding, 2, "output_padding")
        if self.output_padding is not None and any(p >= s for p, s in zip(self.output_padding, self.strides)):
            raise ValueError(
                f"`output_padding` must be smaller than `strides` on each axis; got output_padding="
                f"{self.output_padding}, strides={self.strides}."
            )
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                f"`strides` > 1 and `dilation_rate` > 1 cannot be combined; got strides={self.strides}, "
                f"dilation_rate={self.dilation_rate}."
            )

    def kernel_shape(self, input_shape):
        return self.kernel_size + (self._input_channels(input_shape), self.filters)

    def op_kernel(self, kernel):
        return tf.transpose(kernel, (0, 1, 3, 2))

    def op_kernel_shape(self):
        kh, kw, channels, filters = self._kernel_shape
        return (kh, kw, filters, channels)

    def _convolve(self, inputs, kernel):
        # NHWC only (see `call`): TensorFlow's Conv2DBackpropInput has CPU
        # and GPU kernels for it, but without oneDNN none for dilation > 1.
        if max(self.dilation_rate) > 1:
            return self._dilated_as_convolution(inputs, kernel)
        return keras.ops.conv_transpose(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            output_padding=self.output_padding,
            data_format="channels_last",
            dilation_rate=self.dilation_rate,
        )

    def _dilated_as_convolution(self, inputs, kernel):
        """A dilated (so stride 1) transposed convolution, as the forward convolution it equals.

        With stride 1, `conv_transpose(x, W)` is the convolution of `x` with
        `W` flipped in space and its channel axes swapped, after padding each
        spatial axis with `t = d (k - 1)` zeros for "valid", or with the
        `(t - t // 2, t // 2)` that mirror the forward "same" convolution's
        `(t // 2, t - t // 2)`. Plain dilated convolutions run on every
        TensorFlow device, where Conv2DBackpropInput with dilation needs oneDNN.
        """
        forward_kernel = tf.transpose(tf.reverse(kernel, axis=(0, 1)), (0, 1, 3, 2))
        totals = [d * (k - 1) for d, k in zip(self.dilation_rate, self.kernel_size)]
        if self.padding == "valid":
            pads = [(t, t) for t in totals]
        else:
            pads = [(t - t // 2, t // 2) for t in totals]
        padded = tf.pad(inputs, [(0, 0), *pads, (0, 0)])
        return tf.nn.convolution(padded, forward_kernel, padding="VALID", dilations=self.dilation_rate)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "output_padding": self.output_padding}

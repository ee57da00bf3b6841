"""PowerQuantConv2D: `Conv2D` with a power-quantized integer kernel."""

import keras
import tensorflow as tf

from keras_powerquant.layers.quantized_kernel import QuantizedKernelLayer


def _pair(value, name):
    value = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"`{name}` must be an int or a pair of ints; got {value}.")
    return value


class _PowerQuantConv2DBase(QuantizedKernelLayer):
    """Shared arguments and shapes of the 2-D convolution layers."""

    def __init__(
        self,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.dilation_rate = _pair(dilation_rate, "dilation_rate")
        self.padding = padding.lower()
        self.data_format = data_format or keras.config.image_data_format()
        if self.data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"`data_format` must be channels_last or channels_first; got {data_format!r}.")

    def call(self, inputs):
        kernel = self.call_kernel()
        if self.data_format == "channels_last":
            return self._finish(self._convolve(inputs, kernel))
        # TensorFlow's plain CPU kernels (no oneDNN, e.g. CPUs without AVX-512)
        # convolve NHWC only, so channels_first runs as an NHWC convolution
        # between two transposes; on a GPU, Grappler's layout optimizer folds
        # them into its native NCHW convolution. Bias and activation apply in
        # the layer's own layout, as in `keras.layers.Conv2D`.
        outputs = self._convolve(tf.transpose(inputs, (0, 2, 3, 1)), kernel)
        return self._finish(tf.transpose(outputs, (0, 3, 1, 2)))

    def _input_channels(self, input_shape):
        return input_shape[-1] if self.data_format == "channels_last" else input_shape[1]

    def _bias_data_format(self):
        return "N...C" if self.data_format == "channels_last" else "NC..."

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantConv2D(_PowerQuantConv2DBase):
    """2-D convolution whose kernel is stored as power-quantized codes.

    Computes `activation(conv2d(x, W_hat) + bias)` with `W_hat` of shape
    `(kh, kw, in_channels, filters)` decoded from int8 codes (see
    `QuantizedKernelLayer`), one scale per filter. Arguments follow
    `keras.layers.Conv2D` (without groups).

    Args:
        filters: number of output channels.
        kernel_size, strides, padding, data_format, dilation_rate: as in
            `keras.layers.Conv2D`.
        weight_bits, weight_exponent, per_channel, activation, use_bias: see
            `QuantizedKernelLayer`.

    Input shape:
        4-D `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        4-D, with `filters` channels.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(kernel_size, **kwargs)
        self.filters = int(filters)

    def kernel_shape(self, input_shape):
        return self.kernel_size + (self._input_channels(input_shape), self.filters)

    def _convolve(self, inputs, kernel):
        return tf.nn.conv2d(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding.upper(),
            dilations=self.dilation_rate,
        )

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantDepthwiseConv2D(_PowerQuantConv2DBase):
    """Depthwise 2-D convolution whose kernel is stored as power-quantized codes.

    The kernel has shape `(kh, kw, in_channels, depth_multiplier)`; output
    channel `i * depth_multiplier + j` uses slice `[..., i, j]` and has its
    own scale. Arguments follow `keras.layers.DepthwiseConv2D`.

    Args:
        kernel_size, strides, padding, depth_multiplier, data_format,
            dilation_rate: as in `keras.layers.DepthwiseConv2D`.
        weight_bits, weight_exponent, per_channel, activation, use_bias: see
            `QuantizedKernelLayer`.

    Input shape:
        4-D `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        4-D, with `channels * depth_multiplier` channels.
    """

    channel_ndim = 2

    def __init__(self, kernel_size, depth_multiplier=1, **kwargs):
        super().__init__(kernel_size, **kwargs)
        self.depth_multiplier = int(depth_multiplier)

    def kernel_shape(self, input_shape):
        return self.kernel_size + (self._input_channels(input_shape), self.depth_multiplier)

    def _convolve(self, inputs, kernel):
        return tf.nn.depthwise_conv2d(
            inputs,
            kernel,
            strides=(1,) + self.strides + (1,),
            padding=self.padding.upper(),
            dilations=self.dilation_rate,
        )

    def get_config(self):
        return {**super().get_config(), "depth_multiplier": self.depth_multiplier}

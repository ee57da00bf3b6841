"""PowerQuant convolutions: `Conv1D`/`Conv2D`/`Conv3D` and `DepthwiseConv2D` with power-quantized integer kernels."""

import keras
import tensorflow as tf

from keras_powerquant.layers.quantized_kernel import QuantizedKernelLayer


def _tuple(value, rank, name):
    value = (value,) * rank if isinstance(value, int) else tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"`{name}` must be an int or a tuple of {rank} ints; got {value}.")
    return value


class PowerQuantBaseConv(QuantizedKernelLayer):
    """Arguments, layout handling and config shared by the N-D convolution layers.

    Subclasses implement `kernel_shape(input_shape)` and
    `_convolve(inputs, kernel)`, which convolves channels_last inputs with
    the decoded kernel (no bias, no activation).

    Args:
        rank: number of spatial dimensions (1, 2 or 3).
        kernel_size, strides, dilation_rate: an int or `rank` ints.
        padding: "valid", "same", or for `rank == 1` "causal" (left zero
            padding of `(kernel_size - 1) * dilation_rate`, then "valid").
        data_format: "channels_last" or "channels_first"; None takes
            `keras.config.image_data_format()`.
        **kwargs: see `QuantizedKernelLayer`.
    """

    def __init__(
        self,
        rank,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rank = rank
        self.kernel_size = _tuple(kernel_size, rank, "kernel_size")
        self.strides = _tuple(strides, rank, "strides")
        self.dilation_rate = _tuple(dilation_rate, rank, "dilation_rate")
        self.padding = padding.lower()
        allowed = ("valid", "same", "causal") if rank == 1 else ("valid", "same")
        if self.padding not in allowed:
            raise ValueError(f"`padding` must be one of {allowed}; got {padding!r}.")
        self.data_format = data_format or keras.config.image_data_format()
        if self.data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"`data_format` must be channels_last or channels_first; got {data_format!r}.")

    def call(self, inputs):
        kernel = self.call_kernel()
        channels_first = self.data_format == "channels_first"
        if channels_first:
            # TensorFlow's plain CPU kernels convolve channels_last only, so
            # channels_first runs as a channels_last convolution between two
            # transposes; on a GPU, Grappler's layout optimizer folds them
            # into its native NC... convolution. Bias and activation apply in
            # the layer's own layout, as in `keras.layers.Conv2D`.
            inputs = tf.transpose(inputs, (0,) + tuple(range(2, self.rank + 2)) + (1,))
        if self.padding == "causal":
            left = (self.kernel_size[0] - 1) * self.dilation_rate[0]
            inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
        outputs = self._convolve(inputs, kernel)
        if channels_first:
            outputs = tf.transpose(outputs, (0, self.rank + 1) + tuple(range(1, self.rank + 1)))
        return self._finish(outputs)

    def _tf_padding(self):
        return "VALID" if self.padding == "causal" else self.padding.upper()

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


class PowerQuantConv(PowerQuantBaseConv):
    """N-D convolution whose kernel is stored as power-quantized codes.

    Computes `activation(conv(x, W_hat) + bias)` with `W_hat` of shape
    `kernel_size + (in_channels // groups, filters)` decoded from int8 codes
    (see `QuantizedKernelLayer`), one scale per filter. With `groups > 1`
    the input channels and the filters are split into `groups` consecutive
    blocks, block `g` of the filters seeing only block `g` of the inputs,
    as in `keras.layers.Conv2D(groups=...)`.

    Args:
        rank: number of spatial dimensions (1, 2 or 3).
        filters: number of output channels (a multiple of `groups`).
        groups: number of channel groups; the input channels must be a
            multiple of it.
        kernel_size, strides, padding, data_format, dilation_rate: see
            `PowerQuantBaseConv`.
        **kwargs: see `QuantizedKernelLayer`.
    """

    def __init__(self, rank, filters, kernel_size, groups=1, **kwargs):
        super().__init__(rank, kernel_size, **kwargs)
        self.filters = int(filters)
        self.groups = int(groups)
        if self.groups < 1 or self.filters % self.groups:
            raise ValueError(f"`filters` ({self.filters}) must be a multiple of `groups` ({self.groups}) >= 1.")

    def kernel_shape(self, input_shape):
        channels = self._input_channels(input_shape)
        if channels % self.groups:
            raise ValueError(
                f"Layer '{self.name}': input channels ({channels}) must be a multiple of `groups` ({self.groups})."
            )
        return self.kernel_size + (channels // self.groups, self.filters)

    def _convolve(self, inputs, kernel):
        if self.groups == 1:
            return self._convolve_one(inputs, kernel)
        # Group by group, then concatenated: TensorFlow's own grouped
        # convolution has no CPU Conv3D kernel, and on CPUs without oneDNN
        # Grappler fuses a grouped Conv2D with its BiasAdd into an op that
        # refuses groups; plain convolutions run on every device.
        pairs = zip(tf.split(inputs, self.groups, axis=-1), tf.split(kernel, self.groups, axis=-1))
        return tf.concat([self._convolve_one(x, k) for x, k in pairs], axis=-1)

    def _convolve_one(self, inputs, kernel):
        return tf.nn.convolution(
            inputs, kernel, strides=self.strides, padding=self._tf_padding(), dilations=self.dilation_rate
        )

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "groups": self.groups})
        return config


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantConv1D(PowerQuantConv):
    """1-D convolution with a power-quantized kernel `(k, in_channels // groups, filters)`.

    Arguments follow `keras.layers.Conv1D` (padding "causal" included); see
    `PowerQuantConv`.

    Input shape:
        3-D `(batch, steps, channels)` (channels_last) or
        `(batch, channels, steps)` (channels_first).

    Output shape:
        3-D, with `filters` channels.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(1, filters, kernel_size, **kwargs)


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantConv2D(PowerQuantConv):
    """2-D convolution with a power-quantized kernel `(kh, kw, in_channels // groups, filters)`.

    Arguments follow `keras.layers.Conv2D`; see `PowerQuantConv`.

    Input shape:
        4-D `(batch, rows, cols, channels)` (channels_last) or
        `(batch, channels, rows, cols)` (channels_first).

    Output shape:
        4-D, with `filters` channels.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(2, filters, kernel_size, **kwargs)


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantConv3D(PowerQuantConv):
    """3-D convolution with a power-quantized kernel `(kd, kh, kw, in_channels // groups, filters)`.

    Arguments follow `keras.layers.Conv3D`; see `PowerQuantConv`.

    Input shape:
        5-D `(batch, depth, rows, cols, channels)` (channels_last) or
        `(batch, channels, depth, rows, cols)` (channels_first).

    Output shape:
        5-D, with `filters` channels.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(3, filters, kernel_size, **kwargs)


class PowerQuantBaseDepthwiseConv(PowerQuantBaseConv):
    """What the depthwise convolutions share: a `(*kernel_size, in, depth_multiplier)` kernel.

    Output channel `i * depth_multiplier + j` uses slice `[..., i, j]`, so
    the two trailing kernel axes are the output channels (`channel_ndim`).
    Subclasses set `spatial_rank` and implement `_convolve`.
    """

    channel_ndim = 2

    def __init__(self, kernel_size, depth_multiplier=1, **kwargs):
        super().__init__(self.spatial_rank, kernel_size, **kwargs)
        self.depth_multiplier = int(depth_multiplier)

    def kernel_shape(self, input_shape):
        return self.kernel_size + (self._input_channels(input_shape), self.depth_multiplier)

    def get_config(self):
        return {**super().get_config(), "depth_multiplier": self.depth_multiplier}


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantDepthwiseConv2D(PowerQuantBaseDepthwiseConv):
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

    spatial_rank = 2

    def _convolve(self, inputs, kernel):
        return tf.nn.depthwise_conv2d(
            inputs,
            kernel,
            strides=(1,) + self.strides + (1,),
            padding=self._tf_padding(),
            dilations=self.dilation_rate,
        )


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantDepthwiseConv1D(PowerQuantBaseDepthwiseConv):
    """Depthwise 1-D convolution whose kernel is stored as power-quantized codes.

    The kernel has shape `(k, in_channels, depth_multiplier)`; output
    channel `i * depth_multiplier + j` uses slice `[:, i, j]` and has its
    own scale. It runs as a depthwise 2-D convolution over a height of 1,
    its stride and dilation repeated on that height (TensorFlow's plain CPU
    kernel takes equal row and column strides; a kernel and input of height
    1 give an output of height 1 whatever the stride).
    Arguments follow `keras.layers.DepthwiseConv1D`.

    Args:
        kernel_size, strides, padding, depth_multiplier, data_format,
            dilation_rate: as in `keras.layers.DepthwiseConv1D`.
        weight_bits, weight_exponent, per_channel, activation, use_bias: see
            `QuantizedKernelLayer`.

    Input shape:
        3-D `(batch, steps, channels)` (channels_last) or
        `(batch, channels, steps)` (channels_first).

    Output shape:
        3-D, with `channels * depth_multiplier` channels.
    """

    spatial_rank = 1

    def _convolve(self, inputs, kernel):
        outputs = tf.nn.depthwise_conv2d(
            tf.expand_dims(inputs, 1),
            kernel[None],
            strides=(1,) + 2 * self.strides + (1,),
            padding=self._tf_padding(),
            dilations=2 * self.dilation_rate,
        )
        return tf.squeeze(outputs, 1)

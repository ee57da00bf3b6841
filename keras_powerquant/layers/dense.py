"""PowerQuantDense: `Dense` with a power-quantized integer kernel."""

import keras
import tensorflow as tf

from keras_powerquant.layers.quantized_kernel import QuantizedKernelLayer


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantDense(QuantizedKernelLayer):
    """Densely-connected layer whose kernel is stored as power-quantized codes.

    Computes `activation(x @ W_hat + bias)` with `W_hat` decoded from int8
    codes (see `QuantizedKernelLayer`), one scale per output unit.

    Args:
        units: dimensionality of the output space.
        weight_bits, weight_exponent, per_channel, activation, use_bias: see
            `QuantizedKernelLayer`.

    Input shape:
        N-D tensor `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor `(batch_size, ..., units)`.
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)

    def kernel_shape(self, input_shape):
        return (input_shape[-1], self.units)

    def call(self, inputs):
        kernel = self.call_kernel()
        if len(inputs.shape) == 2:
            outputs = tf.matmul(inputs, kernel)
        else:
            outputs = tf.tensordot(inputs, kernel, axes=[[-1], [0]])
        return self._finish(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units}

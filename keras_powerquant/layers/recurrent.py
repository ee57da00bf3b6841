"""PowerQuant recurrent layers: `SimpleRNN`, `LSTM` and `GRU` with power-quantized integer kernels.

Each layer is a `keras.layers.RNN` over a PowerQuant cell, so sequences,
masking, `return_sequences`, `return_state`, `go_backwards`, `stateful` and
`unroll` behave as in the Keras layer. A cell stores its input kernel `K`
`(input_dim, gates * units)` and recurrent kernel `R` `(units, gates * units)`
as one stacked kernel `W = [K; R]` of shape `(input_dim + units, gates * units)`:
int8 codes, one scale per column (gate unit) shared by its `K` and `R` rows,
one exponent (see `QuantizedKernelLayer`). Each step computes with the
decoded `K = W[:input_dim]` and `R = W[input_dim:]` as the Keras cell does;
the layer decodes `W` once per call (`sequence_kernels`), not once per step.

Weight-only: the step's inputs and states stay float (a quantizer inside
the recurrence would compound its error over the steps). The layers are
inference layers: a Keras cell's `dropout` and `recurrent_dropout` act only
in training and are not kept.
"""

import contextlib
import contextvars

import keras
import tensorflow as tf

from keras_powerquant.layers.quantized_kernel import QuantizedKernelLayer

# id(cell) -> its decoded kernel, while its `PowerQuantRNN` runs a sequence.
_SEQUENCE_KERNELS = contextvars.ContextVar("keras_powerquant_sequence_kernels", default=None)


@contextlib.contextmanager
def sequence_kernel(cell):
    """Decodes `cell`'s kernel once; its steps read that kernel while active."""
    token = _SEQUENCE_KERNELS.set({**(_SEQUENCE_KERNELS.get() or {}), id(cell): cell.call_kernel()})
    try:
        yield
    finally:
        _SEQUENCE_KERNELS.reset(token)


class PowerQuantRecurrentCell(QuantizedKernelLayer):
    """Base of the PowerQuant RNN cells: the stacked kernel `[K; R]`, its decoding and config.

    Subclasses set `gates` and implement `step(inputs, states, kernel, recurrent_kernel)`.

    Args:
        units: size of the state.
        activation: the cell's activation (`tanh` in Keras' cells).
        use_bias: whether the cell adds its float32 bias.
        weight_bits, weight_exponent, per_channel: see `QuantizedKernelLayer`.
    """

    gates = 1

    def __init__(self, units, activation="tanh", use_bias=True, **kwargs):
        super().__init__(activation=activation, use_bias=use_bias, **kwargs)
        self.units = int(units)

    def kernel_shape(self, input_shape):
        return (input_shape[-1] + self.units, self.gates * self.units)

    def bias_shape(self, input_shape, kernel_shape):
        return (self.gates * self.units,)

    def call(self, inputs, states, training=False):
        kernel = (_SEQUENCE_KERNELS.get() or {}).get(id(self))
        if kernel is None:  # a step called on its own, outside its layer's sequence
            kernel = self.call_kernel()
        input_dim = self._kernel_shape[0] - self.units
        return self.step(inputs, states, kernel[:input_dim], kernel[input_dim:])

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class PowerQuantGatedCell(PowerQuantRecurrentCell):
    """A cell with a `recurrent_activation` on its gates (LSTM, GRU)."""

    def __init__(self, units, recurrent_activation="sigmoid", **kwargs):
        super().__init__(units, **kwargs)
        self.recurrent_activation = keras.activations.get(recurrent_activation)

    def get_config(self):
        return {
            **super().get_config(),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
        }


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantSimpleRNNCell(PowerQuantRecurrentCell):
    """`h = activation(x K + b + h_prev R)`, as `keras.layers.SimpleRNNCell`."""

    gates = 1

    def __init__(self, units, **kwargs):
        super().__init__(units, **kwargs)
        self.state_size = self.units
        self.output_size = self.units

    def step(self, inputs, states, kernel, recurrent_kernel):
        previous = states[0] if isinstance(states, (list, tuple)) else states
        h = tf.matmul(inputs, kernel)
        if self.use_bias:
            h = h + self.bias
        output = self.activation(h + tf.matmul(previous, recurrent_kernel))
        return output, [output] if isinstance(states, (list, tuple)) else output


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantLSTMCell(PowerQuantGatedCell):
    """The LSTM step of `keras.layers.LSTMCell`, gates in its order (input, forget, cell, output).

    `z = x K + h R + b`, split in four: `i = ra(z0)`, `f = ra(z1)`,
    `c = f c_prev + i activation(z2)`, `o = ra(z3)`, `h = o activation(c)`
    (`ra`: `recurrent_activation`). States `[h, c]`, both `(batch, units)`.
    """

    gates = 4

    def __init__(self, units, **kwargs):
        super().__init__(units, **kwargs)
        self.state_size = [self.units, self.units]
        self.output_size = self.units

    def step(self, inputs, states, kernel, recurrent_kernel):
        h_previous, c_previous = states
        z = tf.matmul(inputs, kernel) + tf.matmul(h_previous, recurrent_kernel)
        if self.use_bias:
            z = z + self.bias
        z0, z1, z2, z3 = tf.split(z, 4, axis=-1)
        i = self.recurrent_activation(z0)
        f = self.recurrent_activation(z1)
        c = f * c_previous + i * self.activation(z2)
        o = self.recurrent_activation(z3)
        h = o * self.activation(c)
        return h, [h, c]


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantGRUCell(PowerQuantGatedCell):
    """The GRU step of `keras.layers.GRUCell`, gates in its order (update z, reset r, candidate).

    `x K + b_x` is split into `x_z, x_r, x_h`. With `reset_after` (the
    Keras default), `h R + b_h` into `r_z, r_r, r_h` and the candidate is
    `activation(x_h + r * r_h)`; without, `r_z, r_r` from `h R[:, :2u]` and
    the candidate `activation(x_h + (r * h) R[:, 2u:])`. Then
    `h = z h_prev + (1 - z) candidate`. The bias is `(2, 3 units)` (input,
    recurrent) with `reset_after`, else `(3 units,)`.
    """

    gates = 3

    def __init__(self, units, reset_after=True, **kwargs):
        super().__init__(units, **kwargs)
        self.reset_after = bool(reset_after)
        self.state_size = self.units
        self.output_size = self.units

    def bias_shape(self, input_shape, kernel_shape):
        return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

    def step(self, inputs, states, kernel, recurrent_kernel):
        previous = states[0] if isinstance(states, (list, tuple)) else states
        units = self.units
        matrix_x = tf.matmul(inputs, kernel)
        input_bias, recurrent_bias = (None, None)
        if self.use_bias:
            input_bias, recurrent_bias = (self.bias[0], self.bias[1]) if self.reset_after else (self.bias, None)
            matrix_x = matrix_x + input_bias
        x_z, x_r, x_h = tf.split(matrix_x, 3, axis=-1)
        if self.reset_after:
            matrix_inner = tf.matmul(previous, recurrent_kernel)
            if recurrent_bias is not None:
                matrix_inner = matrix_inner + recurrent_bias
        else:
            matrix_inner = tf.matmul(previous, recurrent_kernel[:, : 2 * units])
        z = self.recurrent_activation(x_z + matrix_inner[:, :units])
        r = self.recurrent_activation(x_r + matrix_inner[:, units : 2 * units])
        if self.reset_after:
            recurrent_h = r * matrix_inner[:, 2 * units :]
        else:
            recurrent_h = tf.matmul(r * previous, recurrent_kernel[:, 2 * units :])
        h = z * previous + (1 - z) * self.activation(x_h + recurrent_h)
        return h, [h] if isinstance(states, (list, tuple)) else h

    def get_config(self):
        return {**super().get_config(), "reset_after": self.reset_after}


# Arguments of `keras.layers.RNN` that a PowerQuant recurrent layer passes on as they are.
RNN_KEYS = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask")


class PowerQuantRNN(keras.layers.RNN):
    """A `keras.layers.RNN` over the PowerQuant cell `cell_class`, configured flat.

    Args:
        units, activation, use_bias, weight_bits, weight_exponent,
            per_channel, and the cell's own arguments: see the cell.
        return_sequences, return_state, go_backwards, stateful, unroll,
            zero_output_for_mask: as in `keras.layers.RNN`.

    Input shape:
        3-D `(batch, timesteps, features)`.

    Output shape:
        `(batch, timesteps, units)` with `return_sequences`, else
        `(batch, units)`; with `return_state`, the final states after it.
    """

    cell_class = None

    def __init__(self, units, **kwargs):
        rnn_options = {key: kwargs.pop(key) for key in RNN_KEYS if key in kwargs}
        base_keys = ("name", "dtype", "trainable")
        base = {key: kwargs.pop(key) for key in base_keys if key in kwargs}
        cell = self.cell_class(units, dtype=base.get("dtype"), name=f"{base.get('name') or 'rnn'}_cell", **kwargs)
        super().__init__(cell, **rnn_options, **base)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        with sequence_kernel(self.cell):
            return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def set_float_weights(self, kernel, bias=None, clip_fraction=1.0):
        """Quantizes the stacked float kernel `[K; R]` `(input_dim + units, gates * units)` into the built cell."""
        self.cell.set_float_weights(kernel, bias, clip_fraction)

    def get_config(self):
        config = super().get_config()
        cell = config.pop("cell")["config"]
        for key in ("name", "dtype", "trainable"):
            cell.pop(key, None)
        return {**config, **cell}

    @classmethod
    def from_config(cls, config):
        # Flat: the cell is rebuilt from its arguments (`keras.layers.RNN` deserializes a "cell" entry).
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantSimpleRNN(PowerQuantRNN):
    """`keras.layers.SimpleRNN` with a power-quantized kernel; see `PowerQuantRNN`, `PowerQuantSimpleRNNCell`."""

    cell_class = PowerQuantSimpleRNNCell


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantLSTM(PowerQuantRNN):
    """`keras.layers.LSTM` with a power-quantized kernel; see `PowerQuantRNN`, `PowerQuantLSTMCell`."""

    cell_class = PowerQuantLSTMCell


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantGRU(PowerQuantRNN):
    """`keras.layers.GRU` with a power-quantized kernel; see `PowerQuantRNN`, `PowerQuantGRUCell`."""

    cell_class = PowerQuantGRUCell

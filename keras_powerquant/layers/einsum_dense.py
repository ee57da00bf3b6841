"""PowerQuantEinsumDense: `EinsumDense` with a power-quantized integer kernel."""

import dataclasses
import re

import keras

from keras_powerquant.layers.quantized_kernel import QuantizedKernelLayer

_EQUATION = re.compile(r"(\.\.\.)?([a-zA-Z]+)(\.\.\.)?,([a-zA-Z]+)->(\.\.\.)?([a-zA-Z]+)(\.\.\.)?")


@dataclasses.dataclass(frozen=True)
class EinsumEquation:
    """The parts of an `EinsumDense` equation `input,kernel->output`.

    Keras accepts no ellipsis, or one on the left (or the right) of both
    the input and the output. Each kernel axis is an output axis (its letter
    is in the output) or an input axis (contracted).

    Attributes:
        inputs, kernel, outputs: the three specs, letters only.
        ellipsis: "left", "right" or None.
    """

    inputs: str
    kernel: str
    outputs: str
    ellipsis: str = None

    @classmethod
    def parse(cls, equation):
        match = _EQUATION.fullmatch(equation)
        if match is not None:
            in_left, inputs, in_right, kernel, out_left, outputs, out_right = match.groups()
            if not in_left and not in_right and not out_left and not out_right:
                return cls(inputs, kernel, outputs)
            if in_left and out_left and not in_right and not out_right:
                return cls(inputs, kernel, outputs, "left")
            if in_right and out_right and not in_left and not out_left and len(inputs) >= 2:
                return cls(inputs, kernel, outputs, "right")
        raise ValueError(
            f"Invalid EinsumDense equation {equation!r}: expected 'X,Y->Z', '...X,Y->...Z' or 'X...,Y->Z...'."
        )

    @property
    def output_axes(self):
        """Kernel letters that appear in the output, in kernel order."""
        return "".join(c for c in self.kernel if c in self.outputs)

    @property
    def channel_axes(self):
        """Kernel letters that appear in the output, in output order: the axes of a bias per output channel."""
        return "".join(c for c in self.outputs if c in self.kernel)

    @property
    def contracted_axes(self):
        """Kernel letters summed over, in kernel order."""
        return "".join(c for c in self.kernel if c not in self.outputs)

    @property
    def stored_kernel(self):
        """Kernel letters with the output axes last: the stored layout."""
        return self.contracted_axes + self.output_axes

    def storage_permutation(self):
        """Axes of the Keras kernel in stored order: `np.transpose(keras_kernel, this)`."""
        return tuple(self.kernel.index(c) for c in self.stored_kernel)

    def with_kernel(self, kernel):
        """The equation string with the kernel spec replaced."""
        left = "..." if self.ellipsis == "left" else ""
        right = "..." if self.ellipsis == "right" else ""
        return f"{left}{self.inputs}{right},{kernel}->{left}{self.outputs}{right}"

    def output_shape(self, input_shape, partial_output_shape):
        """The full output shape: batch, `partial_output_shape`, and any elided axes."""
        input_shape = tuple(input_shape)
        elided = len(input_shape) - len(self.inputs)
        if elided < 0 or (self.ellipsis is None and elided):
            raise ValueError(f"Input of rank {len(input_shape)} does not fit the input spec {self.inputs!r}.")
        shape = (input_shape[0],) + tuple(partial_output_shape)
        if self.ellipsis == "left":
            shape = input_shape[:elided] + tuple(partial_output_shape)
        elif self.ellipsis == "right":
            shape = shape + input_shape[len(input_shape) - elided :]
        return shape

    def _dimensions(self, input_shape, output_shape):
        """Size of each letter, from the output where it appears there, else from the input."""
        input_shape, output_shape = tuple(input_shape), tuple(output_shape)
        if self.ellipsis == "left":
            input_shape = input_shape[len(input_shape) - len(self.inputs) :]
            output_shape = output_shape[len(output_shape) - len(self.outputs) :]
        sizes = dict(zip(self.inputs, input_shape))
        sizes.update((c, d) for c, d in zip(self.outputs, output_shape) if d is not None or c not in sizes)
        return sizes

    def kernel_shape(self, input_shape, output_shape, letters):
        sizes = self._dimensions(input_shape, output_shape)
        missing = [c for c in letters if c not in sizes]
        if missing:
            raise ValueError(f"Kernel axes {''.join(missing)!r} appear in neither the input nor the output spec.")
        return tuple(sizes[c] for c in letters)

    def bias_shape(self, bias_axes, input_shape, output_shape):
        """Keras' bias shape: output axes from the first bias axis on, 1 where not a bias axis."""
        unknown = [c for c in bias_axes if c not in self.outputs]
        if unknown:
            raise ValueError(f"Bias axes {''.join(unknown)!r} are not in the output spec {self.outputs!r}.")
        sizes = self._dimensions(input_shape, output_shape)
        first = min(self.outputs.index(c) for c in bias_axes)
        shape = tuple(sizes[c] if c in bias_axes else 1 for c in self.outputs[first:])
        if self.ellipsis == "right":
            shape += (1,) * (len(input_shape) - len(self.inputs))
        return shape


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantEinsumDense(QuantizedKernelLayer):
    """`keras.layers.EinsumDense` whose kernel is stored as power-quantized codes.

    Computes `activation(einsum(equation, x, W_hat) + bias)`. Every kernel
    axis whose letter appears in the output indexes distinct outputs, so
    each slice along those axes gets its own scale ("per channel"); a
    kernel with no output axis (e.g. `"ab,b->a"`) has one scale for the
    whole tensor.

    The kernel is stored with its contracted axes first and its output
    axes last, each group in the equation's order (for `"abc,dc->abd"`:
    `(c, d)`), so the scales are its trailing axes like every PowerQuant
    layer's; `set_float_weights` takes that layout (the Keras kernel
    transposed by `equation_parts.storage_permutation()`), and the layer
    computes with the equation rewritten for it, without transposing.

    Args:
        equation: as in `keras.layers.EinsumDense`.
        output_shape: the output shape without the batch axis (and without
            elided axes), as in `keras.layers.EinsumDense`; an int for one axis.
        bias_axes: output letters that carry a bias, or None for no bias.
        use_bias: None (default) follows `bias_axes`; True with `bias_axes`
            None puts the bias on the kernel's output axes (one value per
            scale), which is how the converter adds a bias to hold a bias
            correction.
        weight_bits, weight_exponent, per_channel, activation: see
            `QuantizedKernelLayer`.

    Input shape:
        As the equation's input spec.

    Output shape:
        `(batch,) + output_shape`, elided axes kept.
    """

    def __init__(self, equation, output_shape, bias_axes=None, use_bias=None, **kwargs):
        parts = EinsumEquation.parse(equation)
        if use_bias and bias_axes is None:
            bias_axes = parts.channel_axes
            if not bias_axes:
                raise ValueError(f"`use_bias=True` needs an output axis in the kernel; {equation!r} has none.")
        elif use_bias is False and bias_axes is not None:
            raise ValueError(f"`use_bias=False` contradicts `bias_axes={bias_axes!r}`.")
        super().__init__(use_bias=bias_axes is not None, **kwargs)
        self.equation = equation
        self.equation_parts = parts
        self.partial_output_shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
        self.bias_axes = bias_axes
        self.channel_ndim = len(self.equation_parts.output_axes)
        self._stored_equation = self.equation_parts.with_kernel(self.equation_parts.stored_kernel)

    def kernel_shape(self, input_shape):
        output_shape = self.compute_output_shape(input_shape)
        return self.equation_parts.kernel_shape(input_shape, output_shape, self.equation_parts.stored_kernel)

    def bias_shape(self, input_shape, kernel_shape):
        """The bias' shape; without `bias_axes`, that of a bias on the kernel's output axes (`use_bias=True`)."""
        output_shape = self.compute_output_shape(input_shape)
        bias_axes = self.equation_parts.channel_axes if self.bias_axes is None else self.bias_axes
        return self.equation_parts.bias_shape(bias_axes, input_shape, output_shape)

    def call(self, inputs):
        return self._finish(keras.ops.einsum(self._stored_equation, inputs, self.call_kernel()))

    def _add_bias(self, outputs):
        return outputs + self.bias

    def compute_output_shape(self, input_shape):
        return self.equation_parts.output_shape(input_shape, self.partial_output_shape)

    def get_config(self):
        config = super().get_config()
        del config["use_bias"]
        config.update(
            {
                "equation": self.equation,
                "output_shape": self.partial_output_shape,
                "bias_axes": self.bias_axes,
            }
        )
        return config

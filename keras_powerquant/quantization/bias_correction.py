"""Bias correction (docs/method.md §7): the mean output shift of a quantized linear layer.

A Dense/Conv layer computes `y = W * x + b`. Quantizing its kernel (and its
input, and every layer before it) moves the mean of each output channel:

    shift = E[W_hat * x_hat] - E[W * x]

and subtracting `shift` from the bias puts the mean back. With per-channel
input means `mu` (averaged over batch and positions), the mean of a conv
output channel is `sum over taps t and input channels i of W[t, i, o] mu_i
c_t`, where `c_t` is the fraction of output positions at which tap `t` reads
the input rather than the zero padding (1 everywhere for "valid" padding and
for Dense). This treats the input mean as the same at every position: exact
for Dense and "valid" convolutions when it is, approximate where a channel's
mean varies across the image (near borders, typically).

A depthwise kernel `(kh, kw, in, multiplier)` maps input channel `i` to the
outputs `i * multiplier + j` only, so its shift involves `mu_i` alone; a
dense or conv kernel `(..., in, out)` mixes every input channel (of its
group, for a grouped conv; see `layouts`).
"""

import numpy as np

from keras_powerquant.quantization.layouts import check_layout
from keras_powerquant.quantization.layouts import input_channel_index
from keras_powerquant.quantization.layouts import to_outputs


def tap_coverage(input_size, kernel_size, stride=1, dilation=1, padding="valid"):
    """Fraction of output positions at which each tap of one spatial axis reads the input.

    Follows TensorFlow's padding: "same" pads `max((out - 1) stride +
    (k - 1) dilation + 1 - size, 0)` in total, the smaller half first;
    "causal" (Keras' Conv1D) pads `(k - 1) dilation` before the input.

    Args:
        input_size: the axis' input length, or None when unknown (coverage 1).
        kernel_size, stride, dilation: the convolution's values on this axis.
        padding: "valid", "same" or "causal".

    Returns:
        float64 array `(kernel_size,)` with values in `[0, 1]`.
    """
    if padding == "valid" or input_size is None:
        return np.ones(kernel_size)
    if padding not in ("same", "causal"):
        raise ValueError(f"`padding` must be 'valid', 'same' or 'causal'; got {padding!r}.")
    out_size = -(-input_size // stride)
    if padding == "causal":
        before = (kernel_size - 1) * dilation
    else:
        before = max((out_size - 1) * stride + (kernel_size - 1) * dilation + 1 - input_size, 0) // 2
    start = np.arange(out_size) * stride - before
    taps = start[None, :] + np.arange(kernel_size)[:, None] * dilation
    return np.mean((taps >= 0) & (taps < input_size), axis=1)


def effective_kernel(kernel, layout, coverage=None):
    """The kernel summed over its taps, each tap weighted by its coverage.

    Args:
        kernel: `(in, out)` ("dense"), `(..., in // groups, out)` ("conv") or
            `(..., in, multiplier)` ("depthwise").
        layout: one of `layouts.LAYOUTS`.
        coverage: per-axis coverage arrays from `tap_coverage` (one per
            spatial axis), or None for full coverage.

    Returns:
        float64, the kernel's two trailing axes.
    """
    check_layout(layout)
    kernel = np.asarray(kernel, dtype=np.float64)
    spatial = kernel.ndim - 2
    weights = np.ones(kernel.shape[:spatial])
    if coverage is not None:
        for axis, axis_coverage in enumerate(coverage):
            shape = [1] * spatial
            shape[axis] = -1
            weights = weights * np.asarray(axis_coverage, dtype=np.float64).reshape(shape)
    return np.tensordot(weights, kernel, axes=(tuple(range(spatial)), tuple(range(spatial))))


def mean_output(kernel_sum, input_mean, layout, groups=1):
    """Per-output-channel mean of `W * x` without bias, from `effective_kernel` and `E[x]`.

    Args:
        kernel_sum: `effective_kernel` of the layer.
        input_mean: `(in,)` per-channel input means.
        layout: one of `layouts.LAYOUTS`.
        groups: channel groups of a "conv" kernel.

    Returns:
        float64 `(out,)`; depthwise outputs are ordered `i * multiplier + j`.
    """
    input_mean = np.asarray(input_mean, dtype=np.float64)
    return to_outputs(input_mean[input_channel_index(kernel_sum.shape, layout, groups)] * kernel_sum, layout)


def bias_shift(kernel_sum, quantized_kernel_sum, input_mean, quantized_input_mean, layout, groups=1):
    """`E[W_hat x_hat] - E[W x]` per output channel: the amount to subtract from the bias.

    Analytic correction passes the same mean for both inputs (only the
    kernel's quantization moves the output); empirical correction passes
    the quantized model's input mean, so upstream shifts are corrected too.
    """
    return mean_output(quantized_kernel_sum, quantized_input_mean, layout, groups) - mean_output(
        kernel_sum, input_mean, layout, groups
    )

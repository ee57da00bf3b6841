"""BatchNorm folding into the linear layer before or after it (docs/method.md §5)."""

import numpy as np

from keras_powerquant.quantization.layouts import check_layout
from keras_powerquant.quantization.layouts import input_channel_index
from keras_powerquant.quantization.layouts import to_outputs


def fold_batch_norm(kernel, bias, gamma, beta, moving_mean, moving_variance, epsilon, layout):
    """Folds `y = BN(linear(x))` into a single linear layer.

    ```
    s  = gamma / sqrt(var + eps)
    W' = W * s          (per output channel)
    b' = (b - mu) * s + beta
    ```

    Args:
        kernel: `(in, out)` for "dense", `(..., in, out)` for "conv" (Conv1D,
            Conv2D, Conv3D), `(kh, kw, in, multiplier)` for "depthwise",
            whose output channel `i * multiplier + j` is kernel slice `[..., i, j]`.
        bias: `(out,)` array, or None for a layer without bias.
        gamma, beta, moving_mean, moving_variance: `(out,)` BatchNorm
            parameters; pass ones / zeros for `scale=False` / `center=False`.
        epsilon: the BatchNorm epsilon.
        layout: "dense", "conv" or "depthwise" (a grouped "conv" kernel folds
            the same way: its last axis is the output channels).

    Returns:
        `(kernel, bias)`, float32, with the kernel in its input layout.
    """
    check_layout(layout)
    kernel = np.asarray(kernel, dtype=np.float64)
    scale, shift = _affine(gamma, beta, moving_mean, moving_variance, epsilon)
    folded_kernel = kernel * scale.reshape(kernel.shape[-2:] if layout == "depthwise" else kernel.shape[-1:])
    bias = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
    return folded_kernel.astype(np.float32), (bias * scale + shift).astype(np.float32)


def fold_batch_norm_forward(kernel, bias, gamma, beta, moving_mean, moving_variance, epsilon, layout, groups=1):
    """Folds `y = linear(BN(x))` into a single linear layer.

    With `BN(x) = s x + t` per input channel (`s = gamma / sqrt(var + eps)`,
    `t = beta - mu s`):

    ```
    W'[..., c, o] = W[..., c, o] * s[i(c, o)]
    b'[o]         = b[o] + sum over taps and c of W[..., c, o] * t[i(c, o)]
    ```

    with `i(c, o)` the input channel of the entry (`layouts.input_channel_index`).
    Exact when every tap of every output reads the input (Dense; "valid"
    convolutions; 1x1 kernels): a tap that reads zero padding would add
    `W t` where the BatchNorm'd padding adds nothing.

    Args:
        kernel: the linear layer's kernel (see `layouts`).
        bias: `(out,)` array, or None for a layer without bias.
        gamma, beta, moving_mean, moving_variance: `(in,)` BatchNorm parameters.
        epsilon: the BatchNorm epsilon.
        layout: "dense", "conv" or "depthwise".
        groups: channel groups of a "conv" kernel.

    Returns:
        `(kernel, bias)`, float32.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    index = input_channel_index(kernel.shape, layout, groups)
    scale, shift = _affine(gamma, beta, moving_mean, moving_variance, epsilon)
    summed = kernel.sum(axis=tuple(range(kernel.ndim - 2)))
    added = to_outputs(summed * shift[index], layout)
    bias = added if bias is None else np.asarray(bias, np.float64) + added
    return (kernel * scale[index]).astype(np.float32), bias.astype(np.float32)


def _affine(gamma, beta, moving_mean, moving_variance, epsilon):
    """`(s, t)` with `BN(x) = s x + t`, float64."""
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(moving_variance, np.float64) + epsilon)
    return scale, np.asarray(beta, np.float64) - np.asarray(moving_mean, np.float64) * scale

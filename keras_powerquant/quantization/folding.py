"""BatchNorm folding into the preceding linear layer (docs/method.md §5)."""

import numpy as np


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
        layout: "dense", "conv" or "depthwise".

    Returns:
        `(kernel, bias)`, float32, with the kernel in its input layout.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(moving_variance, np.float64) + epsilon)
    if layout == "depthwise":
        folded_kernel = kernel * scale.reshape(kernel.shape[-2:])
    elif layout in ("dense", "conv"):
        folded_kernel = kernel * scale
    else:
        raise ValueError(f"Unknown layout {layout!r}.")
    bias = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
    folded_bias = (bias - np.asarray(moving_mean, np.float64)) * scale + np.asarray(beta, np.float64)
    return folded_kernel.astype(np.float32), folded_bias.astype(np.float32)

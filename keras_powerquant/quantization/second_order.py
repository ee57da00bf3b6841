"""Second-order rounding of a kernel on a power grid (GPTQ / OBQ; docs/method.md §10).

A linear layer computes `y = X W` with `W` of shape `(n, k)` (`n` inputs,
`k` outputs; a convolution over its im2col patches). For fixed scales,
exponent and bit width, choosing integer codes `Q` to minimise
`||X W - X W_hat(Q)||^2 = tr((W - W_hat)^T H (W - W_hat)) / 2`, with
`H = 2 X^T X / rows`, is done as GPTQ does (Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, after OBQ, Frantar & Alistarh 2022): the input
rows of `W` are quantized one at a time, each with the layer's own
quantizer, and each one's error is pushed onto the rows not yet quantized
through the upper Cholesky factor of `H^-1`; updates to the remaining rows
are applied lazily, a block of rows at a time.

Everything here is numpy: no Keras or TensorFlow. Kernels are batched as
`(G, n, k)` with one Hessian `(G, n, n)` per group: 1 for Dense and plain
convolutions, the channel groups of a grouped convolution, every channel of
a depthwise one.
"""

import numpy as np

from keras_powerquant.quantization.grid import magnitude_levels
from keras_powerquant.quantization.grid import magnitude_thresholds

# Damping added to the Hessian's diagonal, as a fraction of its mean (GPTQ's 1%).
DEFAULT_DAMPING = 0.01
# Rows of `W` whose remaining-row updates are applied together.
DEFAULT_BLOCK_SIZE = 128
# Damping is multiplied by this when the damped Hessian is not positive definite.
_DAMPING_GROWTH = 10.0
_DAMPING_TRIES = 6


class PowerGrid:
    """The signed power quantizer of docs/method.md §1 with fixed scales.

    Args:
        bits: weight bit width `b` (`m = 2^(b-1) - 1`).
        exponent: the power `a` (1 for uniform).
        scales: the scales `s = alpha max|W|`, broadcastable against the
            kernels' trailing (output) axis; zero scales give code 0.
    """

    def __init__(self, bits, exponent, scales):
        self.max_code = 2 ** (int(bits) - 1) - 1
        self.exponent = float(exponent)
        self.scales = np.asarray(scales, dtype=np.float64)
        self.thresholds = magnitude_thresholds(self.max_code, self.exponent)
        self.levels = magnitude_levels(self.max_code, self.exponent)

    def with_scales(self, scales):
        """The same grid with other scales."""
        return PowerGrid(self.max_code.bit_length() + 1, self.exponent, scales)

    def codes(self, values):
        """Nearest codes (ties up, magnitudes above the scale clipped to `m`), int64, as `WeightQuantizer`."""
        scales = np.broadcast_to(self.scales, np.shape(values))
        safe = np.where(scales > 0, scales, 1.0)
        magnitudes = np.searchsorted(self.thresholds, np.abs(values) / safe, side="right")
        magnitudes = np.where(scales > 0, magnitudes, 0)
        return np.where(values < 0, -magnitudes, magnitudes)

    def decode(self, codes):
        """`sign(q) s (|q| / m)^(1/a)`, float64."""
        codes = np.asarray(codes)
        return np.sign(codes) * self.levels[np.abs(codes)] * self.scales


class HessianAccumulator:
    """Streams `H = 2 X^T X / rows` per group from batches of input features.

    Args:
        groups, size: `G` Hessians of `size x size`.
    """

    def __init__(self, groups, size):
        self.total = np.zeros((groups, size, size), dtype=np.float64)
        self.rows = 0

    def add(self, features):
        """Adds feature rows of shape `(rows, G, n)` (float32 is fine; sums are float64)."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 3 or features.shape[1:] != self.total.shape[:1] + self.total.shape[2:]:
            groups, size = self.total.shape[:2]
            raise ValueError(f"Expected features of shape (rows, {groups}, {size}); got {features.shape}.")
        grouped = np.ascontiguousarray(np.transpose(features, (1, 0, 2)))
        self.total += np.matmul(np.transpose(grouped, (0, 2, 1)), grouped)
        self.rows += features.shape[0]

    def hessian(self):
        """`2 X^T X / rows` (zeros before any row)."""
        return 2.0 * self.total / max(self.rows, 1)


def output_error(kernels, decoded, hessians):
    """`tr((W - W_hat)^T H (W - W_hat))` summed over groups: the layer-output error GPTQ minimises, up to a factor."""
    error = np.asarray(kernels, np.float64) - np.asarray(decoded, np.float64)
    return float(np.sum(error * np.matmul(hessians, error)))


def _damped(hessians, damping):
    """The Hessians with dead inputs decoupled and `damping` times the mean live diagonal added; and the dead mask."""
    h = np.array(hessians, dtype=np.float64)
    groups, size, _ = h.shape
    index = np.arange(size)
    diagonal = h[:, index, index]
    # An input that is zero on every row (a dead channel, padding-only tap)
    # carries no information: decoupled with a unit diagonal, its row is
    # rounded to nearest and its error pushes nothing onto the others.
    scale = np.max(np.abs(diagonal), axis=1, keepdims=True)
    dead = ~(diagonal > 1e-12 * np.where(scale > 0, scale, 1.0)) | ~(diagonal > 0)
    h = np.where(dead[:, :, None] | dead[:, None, :], 0.0, h)
    live_diagonal = np.where(dead, 0.0, diagonal)
    live = np.maximum((~dead).sum(axis=1), 1)
    mean = live_diagonal.sum(axis=1) / live
    mean = np.where(mean > 0, mean, 1.0)
    h[:, index, index] = np.where(dead, 1.0, live_diagonal + damping * mean[:, None])
    return h, dead, mean


def _inverse_cholesky(hessians, damping, mean):
    """Upper Cholesky factors `U` of `H^-1` (`H^-1 = U^T U`), raising the damping where `H` is not definite."""
    size = hessians.shape[1]
    index = np.arange(size)
    extra = 0.0
    for _ in range(_DAMPING_TRIES):
        try:
            h = hessians.copy()
            h[:, index, index] += extra * mean[:, None]
            lower = np.linalg.cholesky(h)
            identity = np.broadcast_to(np.eye(size), h.shape)
            lower_inverse = np.linalg.solve(lower, identity)
            inverse = np.matmul(np.transpose(lower_inverse, (0, 2, 1)), lower_inverse)
            return np.transpose(np.linalg.cholesky(inverse), (0, 2, 1))
        except np.linalg.LinAlgError:
            extra = damping * _DAMPING_GROWTH if extra == 0.0 else extra * _DAMPING_GROWTH
    raise np.linalg.LinAlgError("The damped Hessian is not positive definite.")


def gptq_codes(kernels, hessians, grid, damping=DEFAULT_DAMPING, act_order=True, block_size=DEFAULT_BLOCK_SIZE):
    """Integer codes of `kernels` on `grid` by second-order rounding; deterministic.

    Args:
        kernels: `(G, n, k)` float kernels, inputs on axis 1, outputs last.
        hessians: `(G, n, n)` Hessians `2 X^T X / rows` of each group's inputs.
        grid: the `PowerGrid`, its scales broadcastable to `(G, k)`.
        damping: added to the diagonal as a fraction of its mean over live inputs.
        act_order: quantize inputs by decreasing `H_ii` (GPTQ's activation
            order): the rows that matter most are quantized while most
            rows are still free to absorb their error.
        block_size: rows per lazy batch update.

    Returns:
        int64 codes of the kernels' shape, each in `[-m, m]`.
    """
    weights = np.array(kernels, dtype=np.float64)
    if weights.ndim != 3:
        raise ValueError(f"Expected kernels of shape (groups, inputs, outputs); got {weights.shape}.")
    groups, size, outputs = weights.shape
    if np.shape(hessians) != (groups, size, size):
        raise ValueError(f"Expected Hessians of shape {(groups, size, size)}; got {np.shape(hessians)}.")
    row_grid = grid.with_scales(np.broadcast_to(grid.scales, (groups, outputs)))
    h, dead, mean = _damped(hessians, damping)
    if act_order:
        diagonal = np.where(dead, -np.inf, h[:, np.arange(size), np.arange(size)])
        order = np.argsort(-diagonal, axis=1, kind="stable")
    else:
        order = np.broadcast_to(np.arange(size), (groups, size))
    weights = np.take_along_axis(weights, order[:, :, None], axis=1)
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    upper = _inverse_cholesky(h, damping, mean)
    codes = np.zeros(weights.shape, dtype=np.int64)
    for start in range(0, size, block_size):
        stop = min(start + block_size, size)
        block = weights[:, start:stop, :].copy()
        errors = np.zeros_like(block)
        block_upper = upper[:, start:stop, start:stop]
        for i in range(stop - start):
            row = block[:, i, :]
            row_codes = row_grid.codes(row)
            codes[:, start + i, :] = row_codes
            error = (row - row_grid.decode(row_codes)) / block_upper[:, i, i][:, None]
            block[:, i:, :] -= block_upper[:, i, i:][:, :, None] * error[:, None, :]
            errors[:, i, :] = error
        if stop < size:
            weights[:, stop:, :] -= np.matmul(np.transpose(upper[:, start:stop, stop:], (0, 2, 1)), errors)
    inverse = np.argsort(order, axis=1)
    return np.take_along_axis(codes, inverse[:, :, None], axis=1)

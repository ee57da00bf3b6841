"""Tests of the Gaussian activation statistics and BatchNorm folding.

Propagation rules are checked against seeded Monte-Carlo estimates computed
with TensorFlow's own ops (so the dense / conv / depthwise layouts are
TensorFlow's), folding against a float64 numpy reference of BN(linear(x)).
"""

import zlib

import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view
from scipy import special
from scipy import stats

from keras_powerquant.quantization.folding import fold_batch_norm
from keras_powerquant.quantization.folding import fold_batch_norm_forward
from keras_powerquant.quantization.statistics import add_gaussians
from keras_powerquant.quantization.statistics import batchnorm_gaussians
from keras_powerquant.quantization.statistics import ChannelGaussians
from keras_powerquant.quantization.statistics import concatenate_gaussians
from keras_powerquant.quantization.statistics import DEFAULT_TOTAL_SAMPLES
from keras_powerquant.quantization.statistics import linear_gaussians

MC_SAMPLES = 20_000
# Input positions independent: the exact case of `linear_gaussians`.
INDEPENDENT = (0.0,)


def random_gaussians(channels, seed):
    rng = np.random.default_rng(seed)
    mean, var = rng.normal(0.5, 1.0, channels), rng.uniform(0.1, 2.0, channels)
    return ChannelGaussians(mean, var, "test")


def draw(gaussians, shape, rng):
    """Independent samples `shape + (channels,)` of the model."""
    z = rng.standard_normal(tuple(shape) + (gaussians.channels,))
    return (gaussians.mean + np.sqrt(gaussians.var) * z).astype(np.float32)


def assert_matches_monte_carlo(predicted, outputs):
    """`outputs`: `(N, channels)` samples; loose (about 5-sigma) tolerances."""
    outputs = np.asarray(outputs, np.float64)
    n = outputs.shape[0]
    mean, var = outputs.mean(axis=0), outputs.var(axis=0)
    assert predicted.channels == outputs.shape[1]
    np.testing.assert_array_less(np.abs(predicted.mean - mean), 5 * np.sqrt(var / n) + 1e-9)
    np.testing.assert_allclose(predicted.var, var, rtol=6 * np.sqrt(2.0 / n))


# ---------------------------------------------------------------------------
# ChannelGaussians.


@pytest.mark.parametrize(
    "channels, total", [(1, 4096), (5, DEFAULT_TOTAL_SAMPLES), (300, 10_000)]
)
def test_samples_are_deterministic_with_per_channel_moments(channels, total):
    gaussians = random_gaussians(channels, seed=channels)
    samples = gaussians.samples(total)
    n = max(64, total // channels)
    assert samples.shape == (channels, n)
    np.testing.assert_array_equal(samples, gaussians.samples(total))
    rebuilt = random_gaussians(channels, seed=channels)
    np.testing.assert_array_equal(samples, rebuilt.samples(total))
    # Symmetric normal quantiles: the mean is exact; the variance of n
    # quantiles falls short of 1 by O(log n / n).
    np.testing.assert_allclose(samples.mean(axis=1), gaussians.mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(samples.var(axis=1), gaussians.var, rtol=0.05 if n < 1000 else 0.005)
    # Each row is the sorted quantiles of its channel's normal distribution.
    assert np.all(np.diff(samples, axis=1) > 0)
    z = (samples - gaussians.mean[:, None]) / np.sqrt(gaussians.var)[:, None]
    levels = np.broadcast_to((np.arange(n) + 0.5) / n, z.shape)
    np.testing.assert_allclose(stats.norm.cdf(z), levels, atol=1e-9)


def test_zero_and_negative_variance():
    gaussians = ChannelGaussians([1.0, -2.0], [0.0, -1e-12], "test")
    np.testing.assert_array_equal(gaussians.var, [0.0, 0.0])
    samples = gaussians.samples(256)
    assert np.all(samples[0] == 1.0) and np.all(samples[1] == -2.0)
    assert np.all(np.isfinite(samples))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ChannelGaussians([0.0, 1.0], [1.0], "test")


def test_map_moment_matches_a_rectified_gaussian():
    mean, std = np.array([-1.0, 0.0, 0.7, 3.0]), np.array([0.5, 1.0, 2.0, 1.5])
    gaussians = ChannelGaussians(mean, std**2, "test")
    mapped, out = gaussians.map(lambda x: np.maximum(x, 0.0), "relu")
    assert mapped.shape == gaussians.samples().shape
    assert np.all(mapped >= 0)
    assert out.rule == "relu"
    # E[max(X, 0)] and E[max(X, 0)^2] for X ~ N(mu, s^2).
    t = mean / std
    first = mean * special.ndtr(t) + std * stats.norm.pdf(t)
    second = (mean**2 + std**2) * special.ndtr(t) + mean * std * stats.norm.pdf(t)
    np.testing.assert_allclose(out.mean, first, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(out.var, second - first**2, rtol=2e-3, atol=1e-6)


def test_batchnorm_gaussians():
    out = batchnorm_gaussians(np.array([2.0, -0.5]), np.array([0.1, 0.3]))
    np.testing.assert_array_equal(out.mean, [0.1, 0.3])
    np.testing.assert_array_equal(out.var, [4.0, 0.25])
    assert out.rule == "batchnorm"


def test_add_gaussians_matches_monte_carlo():
    inputs = [random_gaussians(6, seed) for seed in (1, 2, 3)]
    out = add_gaussians(inputs)
    np.testing.assert_allclose(out.mean, sum(g.mean for g in inputs))
    np.testing.assert_allclose(out.var, sum(g.var for g in inputs))
    assert out.rule == "propagated: add"
    rng = np.random.default_rng(0)
    total = sum(draw(g, (MC_SAMPLES,), rng).astype(np.float64) for g in inputs)
    assert_matches_monte_carlo(out, total)


def test_concatenate_gaussians():
    a, b = random_gaussians(3, 1), random_gaussians(5, 2)
    out = concatenate_gaussians([a, b], rule="concat")
    np.testing.assert_array_equal(out.mean, np.concatenate([a.mean, b.mean]))
    np.testing.assert_array_equal(out.var, np.concatenate([a.var, b.var]))
    assert out.channels == 8 and out.rule == "concat"


# ---------------------------------------------------------------------------
# linear_gaussians against Monte Carlo through TensorFlow's ops.


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_gaussians_dense(use_bias):
    rng = np.random.default_rng(10)
    gaussians = random_gaussians(7, seed=10)
    kernel = rng.standard_normal((7, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32) if use_bias else None
    out = linear_gaussians(gaussians, kernel, bias, "dense")
    x = draw(gaussians, (MC_SAMPLES,), rng)
    y = tf.matmul(x, kernel).numpy()
    if use_bias:
        y = y + bias
    assert_matches_monte_carlo(out, y)
    assert out.rule == "propagated: dense"


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (2, 5)])
def test_linear_gaussians_conv(kernel_size):
    rng = np.random.default_rng(11)
    gaussians = random_gaussians(4, seed=11)
    kernel = (0.3 * rng.standard_normal(kernel_size + (4, 6))).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    out = linear_gaussians(gaussians, kernel, bias, "conv", correlations=INDEPENDENT)
    # A VALID conv of an input the size of the kernel has one output pixel.
    x = draw(gaussians, (MC_SAMPLES,) + kernel_size, rng)
    y = tf.nn.conv2d(x, kernel, strides=1, padding="VALID").numpy()
    assert_matches_monte_carlo(out, y.reshape(MC_SAMPLES, 6) + bias)


@pytest.mark.parametrize("multiplier", [1, 3])
def test_linear_gaussians_depthwise(multiplier):
    rng = np.random.default_rng(12)
    gaussians = random_gaussians(5, seed=12)
    kernel = (0.4 * rng.standard_normal((3, 3, 5, multiplier))).astype(np.float32)
    bias = rng.standard_normal(5 * multiplier).astype(np.float32)
    out = linear_gaussians(gaussians, kernel, bias, "depthwise", correlations=INDEPENDENT)
    x = draw(gaussians, (MC_SAMPLES, 3, 3), rng)
    y = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID").numpy()
    assert_matches_monte_carlo(out, y.reshape(MC_SAMPLES, 5 * multiplier) + bias)


@pytest.mark.parametrize("groups", [2, 3])
def test_linear_gaussians_grouped_conv(groups):
    rng = np.random.default_rng(13 + groups)
    gaussians = random_gaussians(6, seed=13)
    kernel = (0.4 * rng.standard_normal((2, 2, 6 // groups, 3 * groups))).astype(np.float32)
    out = linear_gaussians(gaussians, kernel, None, "conv", groups, correlations=INDEPENDENT)
    x = draw(gaussians, (MC_SAMPLES, 2, 2), rng)
    y = tf.nn.conv2d(x, kernel, strides=1, padding="VALID").numpy()  # TensorFlow's grouped convolution
    assert_matches_monte_carlo(out, y.reshape(MC_SAMPLES, 3 * groups))


def test_linear_gaussians_unknown_layout():
    with pytest.raises(ValueError):
        linear_gaussians(random_gaussians(2, 0), np.ones((2, 2)), None, "conv3x3")


# ---------------------------------------------------------------------------
# BatchNorm folding against BN(linear(x)) in float64.


def batch_norm(y, gamma, beta, mean, var, eps):
    return (y - mean) / np.sqrt(var + eps) * gamma + beta


def dense_op(x, kernel):
    return x @ kernel


def conv_op(x, kernel):
    """VALID, stride-1 N-D convolution, kernel `(*spatial, in, out)`."""
    spatial = kernel.ndim - 2
    axes = tuple(range(1, 1 + spatial))
    windows = sliding_window_view(x, kernel.shape[:spatial], axis=axes)
    # windows: (N, *out_spatial, in, *kernel_spatial)
    letters = "abc"[:spatial]
    return np.einsum(f"n...i{letters},{letters}io->n...o", windows, kernel)


def depthwise_op(x, kernel):
    """VALID, stride-1 depthwise 2-D convolution; channel i * mult + j."""
    windows = sliding_window_view(x, kernel.shape[:2], axis=(1, 2))  # (N, H, W, in, kh, kw)
    y = np.einsum("nhwiab,abij->nhwij", windows, kernel)
    return y.reshape(y.shape[:3] + (-1,))


@pytest.mark.parametrize(
    "layout, kernel_shape, input_shape, op",
    [
        ("dense", (6, 4), (5, 6), dense_op),
        ("conv", (3, 5, 4), (2, 9, 5), conv_op),  # Conv1D
        ("conv", (3, 3, 3, 8), (2, 7, 6, 3), conv_op),  # Conv2D
        ("conv", (2, 2, 2, 2, 3), (2, 4, 5, 3, 2), conv_op),  # Conv3D
        ("depthwise", (3, 3, 4, 1), (2, 6, 6, 4), depthwise_op),
        ("depthwise", (3, 2, 3, 2), (2, 6, 5, 3), depthwise_op),
    ],
)
@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_batch_norm_equals_bn_after_linear(layout, kernel_shape, input_shape, op, use_bias):
    rng = np.random.default_rng(zlib.crc32(repr((layout, kernel_shape, use_bias)).encode()))
    kernel = rng.standard_normal(kernel_shape).astype(np.float32)
    channels = int(np.prod(kernel_shape[-2:])) if layout == "depthwise" else kernel_shape[-1]
    bias = rng.standard_normal(channels).astype(np.float32) if use_bias else None
    gamma = rng.uniform(-2.0, 2.0, channels)
    beta = rng.standard_normal(channels)
    mean = rng.standard_normal(channels)
    var = rng.uniform(0.0, 3.0, channels)
    var[0] = 0.0  # epsilon alone keeps it finite
    eps = 1e-3
    folded_kernel, folded_bias = fold_batch_norm(kernel, bias, gamma, beta, mean, var, eps, layout)
    assert folded_kernel.dtype == np.float32 and folded_bias.dtype == np.float32
    assert folded_kernel.shape == kernel.shape and folded_bias.shape == (channels,)
    x = rng.standard_normal(input_shape)
    linear = op(x, kernel.astype(np.float64))
    if use_bias:
        linear = linear + bias
    expected = batch_norm(linear, gamma, beta, mean, var, eps)
    actual = op(x, folded_kernel.astype(np.float64)) + folded_bias
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def grouped_conv_op(groups):
    def op(x, kernel):
        inputs = np.split(x, groups, axis=-1)
        kernels = np.split(kernel, groups, axis=-1)
        return np.concatenate([conv_op(a, k) for a, k in zip(inputs, kernels)], axis=-1)

    return op


@pytest.mark.parametrize(
    "layout, groups, kernel_shape, input_shape, op",
    [
        ("dense", 1, (6, 4), (5, 6), dense_op),
        ("dense", 1, (6, 4), (5, 3, 6), dense_op),  # Dense on a sequence
        ("conv", 1, (3, 5, 4), (2, 9, 5), conv_op),  # Conv1D
        ("conv", 1, (3, 3, 3, 8), (2, 7, 6, 3), conv_op),  # Conv2D
        ("conv", 2, (3, 2, 2, 6), (2, 7, 6, 4), grouped_conv_op(2)),  # Conv2D(groups=2)
        ("conv", 3, (2, 2, 2, 1, 3), (2, 4, 5, 3, 3), grouped_conv_op(3)),  # Conv3D(groups=3)
        ("depthwise", 1, (3, 2, 3, 2), (2, 6, 5, 3), depthwise_op),
    ],
)
def test_fold_batch_norm_forward_equals_linear_after_bn(layout, groups, kernel_shape, input_shape, op):
    rng = np.random.default_rng(zlib.crc32(repr((layout, kernel_shape)).encode()))
    kernel = rng.standard_normal(kernel_shape).astype(np.float32)
    channels_in = input_shape[-1]
    channels_out = int(np.prod(kernel_shape[-2:])) if layout == "depthwise" else kernel_shape[-1]
    bias = rng.standard_normal(channels_out).astype(np.float32)
    gamma = rng.uniform(-2.0, 2.0, channels_in)
    beta, mean = rng.standard_normal(channels_in), rng.standard_normal(channels_in)
    var = rng.uniform(0.0, 3.0, channels_in)
    eps = 1e-3
    folded_kernel, folded_bias = fold_batch_norm_forward(kernel, bias, gamma, beta, mean, var, eps, layout, groups)
    assert folded_kernel.shape == kernel.shape and folded_bias.shape == (channels_out,)
    x = rng.standard_normal(input_shape)
    expected = op(batch_norm(x, gamma, beta, mean, var, eps), kernel.astype(np.float64)) + bias
    actual = op(x, folded_kernel.astype(np.float64)) + folded_bias
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    # Without a bias, the fold creates one.
    _, created = fold_batch_norm_forward(kernel, None, gamma, beta, mean, var, eps, layout, groups)
    np.testing.assert_allclose(created, folded_bias - bias, rtol=1e-5, atol=1e-5)


def test_fold_batch_norm_identity_parameters_keep_the_layer():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    ones, zeros = np.ones(4), np.zeros(4)
    folded = fold_batch_norm(kernel, bias, ones, zeros, zeros, ones, 0.0, "conv")
    folded_kernel, folded_bias = folded
    np.testing.assert_array_equal(folded_kernel, kernel)
    np.testing.assert_array_equal(folded_bias, bias)


def test_fold_batch_norm_unknown_layout():
    with pytest.raises(ValueError):
        fold_batch_norm(
            np.ones((2, 2)), None, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), 1e-3, "sep"
        )

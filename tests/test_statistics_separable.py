"""Data-free statistics where no BatchNorm sits between layers (issue 20).

Numpy and TensorFlow Monte Carlo checks of the propagation through a
depthwise then a pointwise convolution of a spatially correlated input, and
through max pooling; then a Keras separable-convolution residual model whose
8-bit data-free activation clips must not cut into the range its tensors
really take.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_powerquant.converter import statistics as converter_statistics
from keras_powerquant.quantization.statistics import ChannelGaussians
from keras_powerquant.quantization.statistics import correlated_tap_energy
from keras_powerquant.quantization.statistics import linear_gaussians
from keras_powerquant.quantization.statistics import max_pool_gaussians
from keras_powerquant.quantization.statistics import spatial_correlation_matrix
from keras_powerquant.quantization.statistics import SPATIAL_CORRELATIONS

MC_SAMPLES = 40_000


def _gaussians(channels, seed):
    rng = np.random.default_rng(seed)
    return ChannelGaussians(rng.normal(0.5, 1.0, channels), rng.uniform(0.2, 2.0, channels), "test")


def _correlated_patches(gaussians, spatial, rho, rng, n=MC_SAMPLES):
    """`(n, *spatial, channels)` draws, channels independent, positions correlated as `R(rho)`."""
    chol = np.linalg.cholesky(spatial_correlation_matrix(spatial, rho) + 1e-12 * np.eye(int(np.prod(spatial))))
    z = rng.standard_normal((n, int(np.prod(spatial)), gaussians.channels))
    z = np.einsum("st,ntc->nsc", chol, z)
    x = gaussians.mean + np.sqrt(gaussians.var) * z
    return x.reshape((n,) + tuple(spatial) + (gaussians.channels,)).astype(np.float32)


def _assert_moments(predicted, outputs, rtol_var):
    outputs = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
    mean, var = outputs.mean(0), outputs.var(0)
    np.testing.assert_array_less(np.abs(predicted.mean - mean), 5 * np.sqrt(var / len(outputs)) + 1e-9)
    np.testing.assert_allclose(predicted.var, var, rtol=rtol_var)


def test_correlation_matrix_is_a_separable_exponential():
    r = spatial_correlation_matrix((2, 3), 0.5)
    assert r.shape == (6, 6)
    np.testing.assert_allclose(np.diag(r), 1.0)
    assert r[0, 5] == pytest.approx(0.5**3)  # taps (0, 0) and (1, 2)
    np.testing.assert_allclose(spatial_correlation_matrix((3, 3), 0.0), np.eye(9))
    assert np.all(np.linalg.eigvalsh(spatial_correlation_matrix((3, 3), 0.9)) > 0)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_depthwise_then_pointwise_matches_monte_carlo_of_a_correlated_input(rho):
    """At the true correlation the moments are exact; the default (worst of the grid) is never narrower."""
    rng = np.random.default_rng(20 + int(10 * rho))
    gaussians = _gaussians(4, seed=21)
    depthwise = (0.4 * rng.standard_normal((3, 3, 4, 1))).astype(np.float32)
    depthwise[..., 0, 0] = np.abs(depthwise[..., 0, 0])  # a smoothing kernel: grows with rho
    pointwise = (0.5 * rng.standard_normal((1, 1, 4, 3))).astype(np.float32)
    x = _correlated_patches(gaussians, (3, 3), rho, rng)
    mid = tf.nn.depthwise_conv2d(x, depthwise, strides=[1, 1, 1, 1], padding="VALID").numpy()
    out = tf.nn.conv2d(mid, pointwise, strides=1, padding="VALID").numpy()
    at_rho = linear_gaussians(gaussians, depthwise, None, "depthwise", correlations=(rho,))
    _assert_moments(at_rho, mid, rtol_var=0.05)
    _assert_moments(linear_gaussians(at_rho, pointwise, None, "conv"), out, rtol_var=0.05)
    worst = linear_gaussians(gaussians, depthwise, None, "depthwise")
    assert np.all(worst.var >= mid.reshape(MC_SAMPLES, -1).var(0) * 0.97)
    np.testing.assert_allclose(worst.mean, at_rho.mean)


def test_independent_estimate_misses_a_smoothing_depthwise_on_a_correlated_input():
    """The rule before issue 20 (positions independent) was 2x narrow here: the default is not."""
    rng = np.random.default_rng(3)
    gaussians = _gaussians(2, seed=3)
    kernel = np.full((3, 3, 2, 1), 1.0 / 9, np.float32)
    x = _correlated_patches(gaussians, (3, 3), 0.75, rng)
    real_std = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID").numpy().reshape(MC_SAMPLES, -1).std(0)
    independent = np.sqrt(linear_gaussians(gaussians, kernel, None, "depthwise", correlations=(0.0,)).var)
    default = np.sqrt(linear_gaussians(gaussians, kernel, None, "depthwise").var)
    assert np.all(real_std > 2.0 * independent)
    assert np.all(default >= 0.97 * real_std) and np.all(default <= 1.2 * real_std)


def test_correlated_tap_energy_is_the_worst_of_its_correlations():
    kernel = np.random.default_rng(0).standard_normal((3, 3, 2, 5))
    energy = correlated_tap_energy(kernel)
    for rho in SPATIAL_CORRELATIONS:
        assert np.all(energy >= correlated_tap_energy(kernel, (rho,)) - 1e-12)
    np.testing.assert_allclose(correlated_tap_energy(kernel, (0.0,)), np.square(kernel).sum((0, 1)))


@pytest.mark.parametrize("window, rho", [(4, 0.5), (9, 0.5), (9, 0.0)])
def test_max_pool_gaussians_matches_monte_carlo(window, rho):
    rng = np.random.default_rng(window)
    gaussians = _gaussians(3, seed=window)
    z0 = rng.standard_normal((MC_SAMPLES, 1, 3))
    z = np.sqrt(rho) * z0 + np.sqrt(1 - rho) * rng.standard_normal((MC_SAMPLES, window, 3))
    pooled = (gaussians.mean + np.sqrt(gaussians.var) * z).max(axis=1)
    _assert_moments(max_pool_gaussians(gaussians, window, rho), pooled, rtol_var=0.05)


def test_tail_model_depends_on_bit_width():
    g = _gaussians(8, seed=1)
    wide = converter_statistics.TensorStats.of_gaussians(g).sampler(8)
    narrow = converter_statistics.TensorStats.of_gaussians(g).sampler(4)
    assert converter_statistics.tail_dof(8) < converter_statistics.tail_dof(4)
    assert wide.max() > 1.3 * narrow.max()
    np.testing.assert_array_equal(narrow, converter_statistics.TensorStats.of_gaussians(g).sampler())


# ---------------------------------------------------------------------------
# A separable-convolution residual model: 8-bit data-free clips vs real ranges.

L = keras.layers


def _smooth_images(n, seed):
    """Spatially correlated inputs (box-blurred noise), like feature maps of natural images."""
    from scipy import ndimage

    x = np.random.default_rng(seed).standard_normal((n, 16, 16, 3))
    return ndimage.uniform_filter(x, size=(1, 3, 3, 1), mode="wrap").astype(np.float32) * 3.0


def _xception_like(x_fit):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((16, 16, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)))
    shortcut = L.BatchNormalization()(L.Conv2D(32, 1, strides=2, use_bias=False)(x))
    y = L.BatchNormalization()(L.SeparableConv2D(32, 3, padding="same", use_bias=False)(x))
    y = L.BatchNormalization()(L.SeparableConv2D(32, 3, padding="same", use_bias=False)(L.ReLU()(y)))
    x = L.Add()([L.MaxPooling2D(3, strides=2, padding="same")(y), shortcut])
    y = L.BatchNormalization()(L.SeparableConv2D(32, 3, padding="same", use_bias=False)(L.ReLU()(x)))
    x = L.ReLU()(L.Add()([x, y]))
    outputs = L.Dense(10)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(6)
    for layer in model.layers:  # each BatchNorm's moving statistics are those of its real input
        if isinstance(layer, L.BatchNormalization):
            seen = keras.Model(model.inputs, layer.input).predict(x_fit, verbose=0).reshape(-1, layer.input.shape[-1])
            layer.set_weights([rng.uniform(0.5, 1.5, seen.shape[1]), rng.normal(0.0, 0.5, seen.shape[1]),
                               seen.mean(0), seen.var(0)])
    return model


def _clip_over_real_range(model, x):
    """Per rule: the smallest 8-bit data-free clip over the 99.99th percentile of |values| on inputs `x`."""
    import keras_powerquant as kpq
    from keras_powerquant.converter.folding import plan_folds
    from keras_powerquant.converter.graph import FlatGraph
    from keras_powerquant.converter.plan import plan_conversion

    _, report = kpq.convert(model, 8, 8, "uniform")
    graph = FlatGraph(model)
    plan = plan_conversion(graph, plan_folds(graph)[0], 8, 8)
    _, kept = graph.evaluate([keras.ops.convert_to_tensor(x)], lambda op, a, k: op.layer(*a, **k),
                             keep=set(plan.quantizers))
    clips = {a.name: a for a in report.activations if a.status == "quantized"}
    checked = {}
    for key, quantizer in plan.quantizers.items():
        act = clips.get(quantizer.name)
        if act is None or not act.rule.startswith(("batchnorm", "propagated")):
            continue
        values = keras.ops.convert_to_numpy(kept[key])
        checked[act.rule] = min(checked.get(act.rule, np.inf), act.clip / np.percentile(np.abs(values), 99.99))
    return checked


def test_8_bit_data_free_clips_do_not_cut_into_the_real_range():
    model = _xception_like(_smooth_images(256, seed=1))
    checked = _clip_over_real_range(model, _smooth_images(128, seed=2))
    assert any("depthwise" in rule for rule in checked) and any("add" in rule for rule in checked)
    # Before issue 20 the depthwise outputs' clips were 0.67x of this range; now 1.7-2.3x for every rule.
    for rule, ratio in checked.items():
        assert 0.85 < ratio < 4.0, (rule, ratio, checked)


def test_8_bit_data_free_clips_of_the_real_resnet8_cover_real_activations(resnet8_model, shared_data):
    """Training images outside the 512 used for calibration elsewhere (the model saw them in training)."""
    x = np.load(shared_data / "cifar10" / "train_4660.npz")["x"][1024:1152].astype(np.float32)
    checked = _clip_over_real_range(resnet8_model, x)
    assert len(checked) >= 2
    # Before issue 20 the "batchnorm -> relu" clips were 0.80x of this range (10-dof tails); now about 1.5x.
    for rule, ratio in checked.items():
        assert 1.0 < ratio < 4.0, (rule, ratio, checked)


@pytest.mark.parametrize("rho", [0.0, 0.75])
def test_average_pool_gaussians_matches_monte_carlo(rho):
    rng = np.random.default_rng(7)
    gaussians = _gaussians(3, seed=7)
    x = _correlated_patches(gaussians, (4, 4), rho, rng)
    from keras_powerquant.quantization.statistics import average_pool_gaussians

    predicted = average_pool_gaussians(gaussians, (4, 4), rho)
    _assert_moments(predicted, x.mean(axis=(1, 2)), rtol_var=0.05)
    if rho == 0.0:
        np.testing.assert_allclose(predicted.var, gaussians.var / 16)

"""Tests of the exponent / clip search (docs/method.md §3).

The fast error evaluation is checked against a direct O(n) computation; the
fits against the quick facts of docs/method.md §3 (200k seeded samples, max-scaled, no
clipping) and against the quantizers themselves.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import special

from keras_powerquant.quantization import search
from keras_powerquant.quantization.activations import ActivationQuantizer
from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.quantization.search import fit_activation
from keras_powerquant.quantization.search import fit_activation_models
from keras_powerquant.quantization.search import fit_shared_weight_exponent
from keras_powerquant.quantization.search import fit_weight_exponent
from keras_powerquant.quantization.search import SortedMagnitudes
from keras_powerquant.quantization.search import WeightErrorModel
from keras_powerquant.quantization.weights import WeightQuantizer

SETTINGS = settings(max_examples=40, deadline=None)
SAMPLES = 200_000


def direct_error(values, thresholds, levels, weights=None, p=2.0):
    """`sum w |x - levels[k(x)]|^p`, `k(x)` = number of thresholds <= x, in O(n K)."""
    values = np.asarray(values, np.float64)
    k = (np.asarray(thresholds)[None, :] <= values[:, None]).sum(axis=1)
    errors = np.abs(values - np.asarray(levels, np.float64)[k]) ** p
    if weights is not None:
        errors = errors * weights
    return float(errors.sum())


def weight_error(weights, bits, exponent, channel_ndim=0):
    """`sum (W - W_hat)^2` with the real quantizer, float64."""
    quantized = WeightQuantizer(bits, exponent).quantize(weights, channel_ndim)
    return float(np.sum((weights.astype(np.float64) - quantized) ** 2))


def activation_error(samples, bits, exponent, clip, signed):
    quantized = ActivationQuantizer(bits, exponent, clip, signed).quantize(samples)
    return float(np.sum((np.asarray(samples, np.float64) - quantized) ** 2))


# ---------------------------------------------------------------------------
# SortedMagnitudes.error against a direct computation.


@st.composite
def error_problems(draw):
    n_thresholds = draw(st.integers(1, 20))
    thresholds = np.sort(
        draw(hnp.arrays(np.float64, n_thresholds, elements=st.floats(-10, 100)))
    )
    levels = draw(hnp.arrays(np.float64, n_thresholds + 1, elements=st.floats(-10, 100)))
    values = draw(hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-20, 120)))
    # Some values sit exactly on thresholds: they belong to the upper code.
    on_threshold = draw(st.lists(st.sampled_from(list(thresholds)), max_size=10))
    values = np.concatenate([values, on_threshold])
    weighted = draw(st.booleans())
    weights = (
        draw(hnp.arrays(np.float64, values.size, elements=st.floats(0, 50)))
        if weighted
        else None
    )
    return values, weights, thresholds, levels


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@SETTINGS
@given(error_problems())
def test_sorted_magnitudes_error_equals_direct_computation(p, problem):
    values, weights, thresholds, levels = problem
    fast = SortedMagnitudes(values, weights, p=p).error(thresholds, levels)
    expected = direct_error(values, thresholds, levels, weights, p)
    # The p = 2 path subtracts float64 prefix sums: allow cancellation of
    # the order of n * eps * (the summed magnitudes).
    w = np.ones_like(values) if weights is None else weights
    scale = np.sum(w * (values**2 + np.max(levels**2))) ** (p / 2.0) + 1.0
    assert fast == pytest.approx(expected, rel=1e-9, abs=1e-12 * values.size * scale)
    assert fast >= 0.0


def test_sorted_magnitudes_rejects_non_positive_p():
    with pytest.raises(ValueError):
        SortedMagnitudes([1.0, 2.0], p=0.0)


# ---------------------------------------------------------------------------
# fit_weight_exponent on synthetic distributions (docs/method.md §3 quick facts).


@pytest.fixture(scope="module")
def synthetic():
    # One seeded draw. The fitted a* depends on the largest sample (the
    # scale), so other seeds spread by a few hundredths around these facts.
    rng = np.random.default_rng(0)
    return {
        "gaussian": rng.standard_normal(SAMPLES).astype(np.float32),
        "laplace": rng.laplace(size=SAMPLES).astype(np.float32),
        "uniform": rng.uniform(-1.0, 1.0, SAMPLES).astype(np.float32),
    }


@pytest.mark.parametrize(
    "name, exponent_range, ratio_range",
    [
        ("gaussian", (0.58, 0.66), (0.61, 0.67)),
        ("laplace", (0.45, 0.53), (0.31, 0.39)),
        ("uniform", (0.95, 1.05), (0.95, 1.0)),
    ],
)
def test_fit_weight_exponent_quick_facts(synthetic, name, exponent_range, ratio_range):
    weights = synthetic[name]
    fit = fit_weight_exponent(weights, bits=4, channel_ndim=0)
    assert exponent_range[0] <= fit.exponent <= exponent_range[1]
    ratio = fit.error / fit.uniform_error
    assert ratio_range[0] <= ratio <= ratio_range[1]
    # The reported errors are the real quantizer's errors.
    assert fit.error == pytest.approx(weight_error(weights, 4, fit.exponent), rel=1e-5)
    assert fit.uniform_error == pytest.approx(weight_error(weights, 4, 1.0), rel=1e-5)


def test_fitted_exponent_is_near_the_best_of_a_fine_scan(synthetic):
    weights = synthetic["gaussian"]
    fit = fit_weight_exponent(weights, bits=4, channel_ndim=0)
    model = WeightErrorModel(weights, 4, channel_ndim=0)
    scan = min(model.error(a) for a in np.linspace(0.1, 2.0, 191))
    assert fit.error <= scan * (1 + 1e-3)


@st.composite
def weight_tensors(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    distribution = draw(st.sampled_from(["normal", "laplace", "uniform", "raw"]))
    if distribution == "raw":
        return draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if distribution == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if distribution == "laplace":
        return rng.laplace(size=shape).astype(np.float32)
    return rng.uniform(-3, 3, shape).astype(np.float32)


@SETTINGS
@given(weight_tensors(), st.integers(2, 8), st.sampled_from([1.0, 2.0, 3.0]), st.booleans())
def test_fitted_error_never_above_uniform(weights, bits, p, per_channel):
    channel_ndim = 1 if per_channel else 0
    fit = fit_weight_exponent(weights, bits, channel_ndim=channel_ndim, p=p)
    assert 0.1 <= fit.exponent <= 2.0
    assert np.isfinite(fit.error) and np.isfinite(fit.uniform_error)
    assert fit.error <= fit.uniform_error
    model = WeightErrorModel(weights, bits, channel_ndim, p)
    assert fit.error == model.error(fit.exponent)
    assert fit.uniform_error == model.error(1.0)
    if p == 2.0:
        quantized = WeightQuantizer(bits, fit.exponent, per_channel).quantize(weights)
        direct = float(np.sum((weights.astype(np.float64) - quantized) ** 2))
        scale = float(np.sum(weights.astype(np.float64) ** 2))
        assert fit.error == pytest.approx(direct, rel=1e-4, abs=1e-9 * scale)


def test_bounds_are_respected_and_validated(synthetic):
    weights = synthetic["gaussian"][:5000]
    fit = fit_weight_exponent(weights, 4, channel_ndim=0, bounds=(1.2, 1.8))
    assert 1.2 <= fit.exponent <= 1.8
    fit = fit_weight_exponent(weights, 4, channel_ndim=0, bounds=(0.2, 0.4))
    assert 0.2 <= fit.exponent <= 0.4
    for bad in [(0.0, 1.0), (1.0, 0.5), (-1.0, 2.0), (1.0, 1.0)]:
        with pytest.raises(ValueError):
            fit_weight_exponent(weights, 4, channel_ndim=0, bounds=bad)


def test_fit_weight_exponent_is_deterministic(synthetic):
    weights = synthetic["laplace"].reshape(-1, 8)
    first = fit_weight_exponent(weights, 5)
    second = fit_weight_exponent(weights.copy(), 5)
    assert first == second


@pytest.mark.parametrize("per_channel", [True, False])
def test_zero_weights_and_zero_channels_fit_without_nan(per_channel):
    channel_ndim = 1 if per_channel else 0
    zeros = np.zeros((4, 4, 3, 8), np.float32)
    fit = fit_weight_exponent(zeros, 4, channel_ndim)
    assert fit.error == 0.0 and fit.uniform_error == 0.0
    assert np.isfinite(fit.exponent)
    kernel = np.random.default_rng(5).standard_normal((4, 4, 3, 8)).astype(np.float32)
    kernel[..., 2] = 0.0
    fit = fit_weight_exponent(kernel, 4, channel_ndim)
    assert all(np.isfinite([fit.exponent, fit.error, fit.uniform_error]))
    assert fit.error <= fit.uniform_error
    constant = np.full((10, 3), 0.3, np.float32)
    fit = fit_weight_exponent(constant, 4, channel_ndim)
    assert fit.error == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 6, 8])
def test_weight_error_model_at_other_bits_equals_a_fresh_model(synthetic, bits):
    weights = synthetic["laplace"].reshape(-1, 8)
    shared = WeightErrorModel(weights, 4, channel_ndim=1).at_bits(bits)
    fresh = WeightErrorModel(weights, bits, channel_ndim=1)
    for exponent, clip in [(1.0, 1.0), (0.6, 1.0), (0.45, 0.7)]:
        assert shared.error(exponent, clip) == fresh.error(exponent, clip)
    assert WeightErrorModel(weights, 4).max_code == 7  # the original is left unchanged


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_weight_error_model_subsamples_only_off_the_quadratic_norm(p):
    weights = np.random.default_rng(2).laplace(size=(4096, 4)).astype(np.float32)
    full = WeightErrorModel(weights, 4, p=p)
    sampled = WeightErrorModel(weights, 4, p=p, max_samples=1024)
    assert sampled.magnitudes.size == 1024 and full.magnitudes.size == weights.size
    # Every 16th of i.i.d. weights carries about a 16th of the error.
    assert sampled.error(0.7) * 16 == pytest.approx(full.error(0.7), rel=0.1)
    assert WeightErrorModel(weights, 4, p=2.0, max_samples=1024).magnitudes.size == weights.size


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fit_weight_exponent_rejects_non_finite_weights(bad):
    weights = np.ones((5, 3), np.float32)
    weights[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_weight_exponent(weights, 4)


# ---------------------------------------------------------------------------
# Network scope.


def test_network_scope_shares_one_exponent_and_beats_uniform(synthetic):
    rng = np.random.default_rng(11)
    layers = [
        synthetic["gaussian"][:27000].reshape(3, 3, 30, 100),
        synthetic["laplace"][:6400].reshape(64, 100),
        synthetic["uniform"][:900].reshape(3, 3, 100, 1),
        rng.standard_t(4, size=(50, 10)).astype(np.float32),
    ]
    layouts = [1, 1, 2, 1]
    models = [WeightErrorModel(w, 4, n) for w, n in zip(layers, layouts)]
    fits = fit_shared_weight_exponent(models)
    assert len(fits) == len(layers)
    assert len({fit.exponent for fit in fits}) == 1
    exponent = fits[0].exponent
    for fit, model in zip(fits, models):
        assert fit.error == model.error(exponent)
        assert fit.uniform_error == model.error(1.0)
    assert sum(f.error for f in fits) <= sum(f.uniform_error for f in fits)
    # A shared exponent cannot beat each layer's own best.
    own = [fit_weight_exponent(w, 4, n) for w, n in zip(layers, layouts)]
    assert sum(f.error for f in own) <= sum(f.error for f in fits) * (1 + 1e-3)
    assert fit_shared_weight_exponent(models) == fits


# ---------------------------------------------------------------------------
# Activations.


def activation_samples(kind, n=20_000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    if kind == "relu":
        return np.maximum(z * 1.5 + 0.3, 0.0)
    if kind == "relu6":
        return np.clip(z * 3.0 + 1.0, 0.0, 6.0)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    return z * 2.0 - 0.5  # signed, Gaussian


@pytest.mark.parametrize(
    "kind, signed", [("relu", False), ("relu6", False), ("sigmoid", False), ("gaussian", True)]
)
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fit_activation_properties(kind, signed, bits):
    samples = activation_samples(kind)
    fit = fit_activation(samples, bits, signed)
    biggest = np.abs(samples).max() if signed else samples.max()
    assert 0 < fit.clip <= biggest
    assert 0 < fit.uniform_clip <= biggest
    assert 0.1 <= fit.exponent <= 2.0
    assert fit.error <= fit.uniform_error
    # The reported error is the real (float32-threshold) quantizer's.
    direct = activation_error(samples, bits, fit.exponent, fit.clip, signed)
    assert fit.error == pytest.approx(direct, rel=1e-3)
    direct = activation_error(samples, bits, 1.0, fit.uniform_clip, signed)
    assert fit.uniform_error == pytest.approx(direct, rel=1e-3)
    # Deterministic.
    assert fit_activation(samples.copy(), bits, signed) == fit


@pytest.mark.parametrize("signed", [False, True])
def test_fit_activation_with_fixed_exponent(signed):
    samples = activation_samples("relu" if not signed else "gaussian", seed=3)
    fit = fit_activation(samples, 4, signed, exponent=1.0)
    assert fit.exponent == 1.0
    assert fit.clip == fit.uniform_clip
    assert fit.error == fit.uniform_error
    fixed = fit_activation(samples, 4, signed, exponent=0.5)
    assert fixed.exponent == 0.5
    assert fixed.uniform_error == fit.uniform_error


@pytest.mark.parametrize("exponent", [0.5, 0.7, 1.0])
def test_fitted_clip_is_near_the_best_of_a_fine_scan(exponent):
    # Normal quantiles (as the data-free statistics use): a smooth error
    # curve. On random samples the sparse tail makes the curve bumpy and
    # the bracketed search may stop in a local minimum a little above.
    n = 20_000
    z = special.ndtri((np.arange(n) + 0.5) / n)
    samples = np.maximum(1.5 * z + 0.3, 0.0)
    fit = fit_activation(samples, 4, False, exponent=exponent)
    model = ActivationErrorModel(samples, 4, False)
    clips = np.linspace(0.01, samples.max(), 1000)
    scan = min(model.error(c, exponent) for c in clips)
    assert fit.error <= scan * (1 + 1e-3)


@pytest.mark.parametrize("signed", [False, True])
def test_fit_activation_of_subnormal_samples(signed):
    # max * 1e-3 underflows to 0: the clip search must not build an empty range.
    samples = np.array([5e-324, 0.0, -5e-324])
    fit = fit_activation(samples, 2, signed)
    assert fit.error <= fit.uniform_error
    assert 0 < fit.clip <= samples.max()


@SETTINGS
@given(
    hnp.arrays(np.float64, st.integers(1, 300), elements=st.floats(-50, 50)),
    st.integers(2, 8),
    st.booleans(),
)
def test_fit_activation_never_above_uniform(samples, bits, signed):
    fit = fit_activation(samples, bits, signed)
    values = np.abs(samples) if signed else samples
    assert fit.clip > 0 and np.isfinite(fit.clip)
    if values.max() > 0:
        assert fit.clip <= values.max()
    assert np.isfinite(fit.error)
    assert fit.error <= fit.uniform_error


@pytest.mark.parametrize("signed", [False, True])
def test_degenerate_activation_samples(signed):
    zeros = np.zeros(1000)
    fit = fit_activation(zeros, 4, signed)
    assert all(np.isfinite([fit.clip, fit.exponent, fit.error, fit.uniform_clip]))
    assert fit.error == 0.0 and fit.uniform_error == 0.0
    constant = np.full(1000, 2.5)
    fit = fit_activation(constant, 4, signed)
    assert all(np.isfinite([fit.clip, fit.exponent, fit.error]))
    assert fit.clip <= 2.5
    assert fit.error == pytest.approx(0.0, abs=1e-9)
    # Mostly zeros (a dead ReLU channel) with a few positive values.
    sparse = np.zeros(1000)
    sparse[:3] = [0.5, 1.0, 2.0]
    fit = fit_activation(sparse, 4, signed)
    assert all(np.isfinite([fit.clip, fit.exponent, fit.error]))
    assert fit.error <= fit.uniform_error


def test_negative_samples_of_an_unsigned_quantizer_cost_their_square():
    samples = -np.linspace(0.1, 2.0, 50)
    fit = fit_activation(samples, 4, signed=False)
    assert fit.error == pytest.approx(np.sum(samples**2), rel=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fit_activation_rejects_non_finite_samples(bad):
    with pytest.raises(ValueError):
        fit_activation(np.array([0.0, 1.0, bad]), 4, False)


def test_activation_network_scope_shares_one_exponent():
    models = [
        ActivationErrorModel(activation_samples(kind, seed=i), 4, kind == "gaussian")
        for i, kind in enumerate(["relu", "relu6", "sigmoid", "gaussian"])
    ]
    fits = fit_activation_models(models, shared=True)
    assert len({fit.exponent for fit in fits}) == 1
    assert sum(f.error for f in fits) <= sum(f.uniform_error for f in fits)
    for fit, model in zip(fits, models):
        assert fit.clip <= model.max_value
        assert fit.error == model.error(fit.clip, fit.exponent)


@pytest.mark.parametrize("bits", [1, 9, 4.0])
def test_search_rejects_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError):
        fit_weight_exponent(np.ones(10, np.float32), bits, channel_ndim=0)
    with pytest.raises(ValueError):
        fit_activation(np.ones(10), bits, signed=False)


def test_fit_with_choices_picks_the_best_listed_exponent():
    rng = np.random.default_rng(5)
    samples = np.maximum(rng.normal(0.2, 1.0, 20000), 0.0)
    model = search.ActivationErrorModel(samples, 4, signed=False)
    (fit,) = search.fit_activation_models([model], choices=search.FAST_ACTIVATION_EXPONENTS)
    assert fit.exponent in search.FAST_ACTIVATION_EXPONENTS
    errors = {a: model.best_clip(a)[1] for a in search.FAST_ACTIVATION_EXPONENTS}
    assert fit.error == pytest.approx(min(errors.values()))
    (free,) = search.fit_activation_models([model])
    assert free.error <= fit.error <= fit.uniform_error

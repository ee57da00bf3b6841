"""Weight clipping (docs/method.md §7) in the numpy core: the clip fraction `alpha` and its fit.

Expected values are computed here from docs/method.md's formulas (`s = alpha max|W|`,
`q = sign(W) round(m min(|W|/s, 1)^a)`), never taken from the code under test.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_powerquant.quantization.search import fit_shared_weight_exponent
from keras_powerquant.quantization.search import fit_weight_exponent
from keras_powerquant.quantization.search import fit_weight_model
from keras_powerquant.quantization.search import MIN_WEIGHT_CLIP
from keras_powerquant.quantization.search import WeightErrorModel
from keras_powerquant.quantization.weights import WeightQuantizer

SETTINGS = settings(max_examples=40, deadline=None)


def reference_codes(weights, bits, exponent, clip, channel_ndim):
    """Codes from docs/method.md's formula, ties rounded up, in float64."""
    m = 2 ** (bits - 1) - 1
    magnitudes = np.abs(weights.astype(np.float64))
    leading = tuple(range(weights.ndim - channel_ndim))
    scales = magnitudes.max(axis=leading) if leading else magnitudes
    scales = scales * clip
    normalized = np.minimum(magnitudes / np.where(scales > 0, scales, 1.0), 1.0)
    codes = np.floor(m * normalized**exponent + 0.5)
    return np.sign(weights) * codes


@st.composite
def weight_tensors(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "laplace", "student"]))
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(size=shape).astype(np.float32)
    return rng.standard_t(3, size=shape).astype(np.float32)


@SETTINGS
@given(weight_tensors(), st.integers(2, 8), st.booleans())
def test_exponent_one_clip_one_is_todays_quantizer(weights, bits, per_channel):
    channel_ndim = 1 if per_channel else 0
    quantizer = WeightQuantizer(bits, 1.0, per_channel)
    codes, scales = quantizer.encode(weights, channel_ndim, clip_fraction=1.0)
    default_codes, default_scales = quantizer.encode(weights, channel_ndim)
    np.testing.assert_array_equal(codes, default_codes)
    np.testing.assert_array_equal(scales, default_scales)
    leading = tuple(range(weights.ndim - channel_ndim))
    np.testing.assert_array_equal(scales, np.abs(weights).max(axis=leading) if leading else np.abs(weights))
    # Ties are measure-zero for random floats: compare with the float64 formula.
    np.testing.assert_array_equal(codes, reference_codes(weights, bits, 1.0, 1.0, channel_ndim))


@SETTINGS
@given(
    weight_tensors(),
    st.integers(2, 8),
    st.floats(0.3, 2.0),
    st.floats(0.05, 1.0),
)
def test_clipped_codes_follow_the_formula(weights, bits, exponent, clip):
    channel_ndim = 1
    quantizer = WeightQuantizer(bits, exponent)
    codes, scales = quantizer.encode(weights, channel_ndim, clip_fraction=clip)
    leading = tuple(range(weights.ndim - 1))
    maxima = np.abs(weights).max(axis=leading) if leading else np.abs(weights)
    np.testing.assert_allclose(scales, maxima * clip, rtol=1e-6)
    expected = reference_codes(weights, bits, exponent, clip, channel_ndim)
    # Values within float32 rounding of a decision threshold may go either way.
    assert np.mean(codes == expected) > 0.99
    m = 2 ** (bits - 1) - 1
    above = np.abs(weights) > scales * (1 + 1e-6)
    assert np.all(np.abs(codes[above]) == m)


def test_per_channel_clip_fractions():
    weights = np.random.default_rng(0).standard_normal((3, 3, 4, 5)).astype(np.float32)
    clip = np.array([1.0, 0.5, 0.8, 0.25, 0.9])
    quantizer = WeightQuantizer(4, 0.7)
    _, scales = quantizer.encode(weights, 1, clip_fraction=clip)
    np.testing.assert_allclose(scales, np.abs(weights).max(axis=(0, 1, 2)) * clip, rtol=1e-6)
    # The decoded kernel never exceeds the clipped scale of its channel.
    decoded = quantizer.quantize(weights, 1, clip_fraction=clip)
    assert np.all(np.abs(decoded) <= scales * (1 + 1e-6))


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5, np.nan, np.inf, [0.5, 0.0]])
def test_invalid_clip_fractions_are_rejected(bad):
    weights = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"clip fraction \(`clip_fraction`\) must be in \(0, 1\]"):
        WeightQuantizer(4).encode(weights, 1, clip_fraction=bad)


@SETTINGS
@given(weight_tensors(), st.integers(2, 8), st.sampled_from([2.0, 3.0]), st.booleans())
def test_fitted_clip_error_never_above_unclipped(weights, bits, p, per_channel):
    channel_ndim = 1 if per_channel else 0
    unclipped = fit_weight_exponent(weights, bits, channel_ndim, p)
    clipped = fit_weight_exponent(weights, bits, channel_ndim, p, clip=True)
    assert unclipped.clip == 1.0
    assert MIN_WEIGHT_CLIP <= clipped.clip <= 1.0
    assert clipped.error <= unclipped.error
    assert clipped.uniform_error == unclipped.uniform_error
    model = WeightErrorModel(weights, bits, channel_ndim, p)
    assert clipped.error == model.error(clipped.exponent, clipped.clip)
    uniform = fit_weight_model(model, exponent=1.0, clip=True)
    assert uniform.exponent == 1.0 and uniform.error <= uniform.uniform_error
    if p == 2.0:
        quantizer = WeightQuantizer(bits, clipped.exponent, per_channel)
        decoded = quantizer.quantize(weights, 1, clip_fraction=clipped.clip)
        direct = float(np.sum((weights.astype(np.float64) - decoded) ** 2))
        total = float(np.sum(weights.astype(np.float64) ** 2))
        assert clipped.error == pytest.approx(direct, rel=1e-4, abs=1e-9 * total)


def test_clipping_pays_off_on_heavy_tails_at_low_bits():
    weights = np.random.default_rng(3).standard_t(3, size=(3, 3, 64, 32)).astype(np.float32)
    model = WeightErrorModel(weights, 4)
    uniform = fit_weight_model(model, exponent=1.0, clip=True)
    assert uniform.clip < 0.8
    assert uniform.error < 0.8 * uniform.uniform_error
    # The power grid already spends its levels near zero: clipping still helps, less.
    unclipped = fit_weight_exponent(weights, 4, clip=False)
    clipped = fit_weight_exponent(weights, 4, clip=True)
    assert clipped.clip < 1.0
    assert clipped.error < unclipped.error
    # The fit is the minimum of a fine scan of (exponent, clip), to the scan's resolution.
    scan = min(model.error(a, c) for a in np.linspace(0.3, 2.0, 35) for c in np.linspace(0.05, 1.0, 96))
    assert clipped.error <= scan * (1 + 1e-2)


def test_network_scope_clips_each_layer_and_shares_the_exponent():
    rng = np.random.default_rng(1)
    models = [
        WeightErrorModel(rng.standard_t(3, size=(3, 3, 16, 8)).astype(np.float32), 4),
        WeightErrorModel(rng.standard_normal((32, 10)).astype(np.float32), 4),
    ]
    plain = fit_shared_weight_exponent(models)
    fits = fit_shared_weight_exponent(models, clip=True)
    assert len({f.exponent for f in fits}) == 1
    assert sum(f.error for f in fits) <= sum(f.error for f in plain)
    for fit, model in zip(fits, models):
        assert fit.error == model.error(fit.exponent, fit.clip)
        assert fit.error <= model.error(fit.exponent, 1.0)

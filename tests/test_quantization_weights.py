"""Tests of the numpy weight quantizer (docs/method.md §1).

Property tests run with hypothesis; every expected value is computed here
from the formulas of docs/method.md, never taken from the code under test.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_powerquant.quantization.weights import channel_scales
from keras_powerquant.quantization.weights import WeightQuantizer

SETTINGS = settings(max_examples=60, deadline=None)

bits_st = st.integers(min_value=2, max_value=8)
exponent_st = st.floats(min_value=0.1, max_value=4.0)
# Finite float32 weights over a wide range, subnormals included.
weight_st = st.floats(
    min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32
)


@st.composite
def kernels(draw, min_ndim=1, max_ndim=4):
    """`(weights, channel_ndim)`: a float32 tensor and its output-channel axes."""
    shape = draw(hnp.array_shapes(min_dims=min_ndim, max_dims=max_ndim, min_side=1, max_side=5))
    weights = draw(hnp.arrays(np.float32, shape, elements=weight_st))
    channel_ndim = draw(st.integers(min_value=0, max_value=min(2, len(shape))))
    return weights, channel_ndim


def reference_scales(weights, channel_ndim):
    """`max |W|` over the non-channel axes, float64."""
    magnitudes = np.abs(weights.astype(np.float64))
    leading = tuple(range(weights.ndim - channel_ndim))
    if not leading:
        return magnitudes
    return magnitudes.max(axis=leading)


# ---------------------------------------------------------------------------
# Codes, scales, ranges.


@SETTINGS
@given(kernels(), bits_st, exponent_st, st.booleans())
def test_codes_are_int8_in_range(kernel, bits, exponent, per_channel):
    weights, channel_ndim = kernel
    quantizer = WeightQuantizer(bits, exponent, per_channel)
    codes, scales = quantizer.encode(weights, channel_ndim)
    m = 2 ** (bits - 1) - 1
    assert codes.dtype == np.int8
    assert codes.shape == weights.shape
    assert codes.min() >= -m and codes.max() <= m
    # Signs are preserved; zeros give code 0.
    assert np.all(codes[weights == 0] == 0)
    assert np.all(codes[weights > 0] >= 0)
    assert np.all(codes[weights < 0] <= 0)
    assert scales.dtype == np.float32
    expected = reference_scales(weights, channel_ndim if per_channel else 0)
    np.testing.assert_array_equal(scales, expected.astype(np.float32))


@SETTINGS
@given(kernels(), bits_st, exponent_st)
def test_largest_magnitude_of_each_channel_gets_the_top_code(kernel, bits, exponent):
    weights, channel_ndim = kernel
    codes, scales = WeightQuantizer(bits, exponent).encode(weights, channel_ndim)
    m = 2 ** (bits - 1) - 1
    leading = tuple(range(weights.ndim - channel_ndim))
    top = np.abs(codes.astype(np.int64)).max(axis=leading, initial=0)
    np.testing.assert_array_equal(top, np.where(scales > 0, m, 0))


def test_scales_by_layout():
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_array_equal(channel_scales(dense, 1), np.abs(dense).max(axis=0))
    depthwise = rng.standard_normal((3, 3, 5, 2)).astype(np.float32)
    expected = np.abs(depthwise).max(axis=(0, 1))
    np.testing.assert_array_equal(channel_scales(depthwise, 2), expected)
    assert channel_scales(depthwise, 2).shape == (5, 2)
    per_tensor = WeightQuantizer(4, per_channel=False).scales(depthwise, 2)
    assert per_tensor.shape == ()
    assert per_tensor == np.abs(depthwise).max()


# ---------------------------------------------------------------------------
# a = 1 is symmetric uniform quantization.


@SETTINGS
@given(kernels(), bits_st, st.booleans())
def test_exponent_one_is_symmetric_uniform_rounding(kernel, bits, per_channel):
    weights, channel_ndim = kernel
    channel_ndim = channel_ndim if per_channel else 0
    codes, _ = WeightQuantizer(bits, 1.0, per_channel).encode(weights, channel_ndim)
    m = 2 ** (bits - 1) - 1
    scales = reference_scales(weights, channel_ndim)
    safe = np.where(scales > 0, scales, 1.0)
    ratio = m * np.abs(weights.astype(np.float64)) / safe
    expected = np.sign(weights) * np.floor(ratio + 0.5)
    # The quantizer divides in float32 (relative error <= 2^-24) before
    # comparing with the thresholds, so a ratio within float32 rounding of a
    # half-integer may round either way; everything else must match.
    tie = np.round(ratio - 0.5) + 0.5  # nearest half-integer
    ambiguous = np.abs(ratio - tie) <= 1e-6 * np.maximum(ratio, 1.0)
    np.testing.assert_array_equal(codes[~ambiguous], expected[~ambiguous])
    # Near-ties land on one of the two codes around the tie.
    near = np.abs(codes[ambiguous].astype(np.int64))
    tie = tie[ambiguous]
    assert np.all((near == tie - 0.5) | (near == tie + 0.5))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25])
def test_exact_ties_round_up(bits, scale):
    # m is odd, so |w| / s = 1/2 (exact in float32) puts m |w| / s = m / 2
    # exactly half-way between codes (m - 1) / 2 and (m + 1) / 2.
    m = 2 ** (bits - 1) - 1
    weights = np.array([scale, scale / 2, -scale / 2, 0.0], np.float32)
    codes, scales = WeightQuantizer(bits, 1.0, per_channel=False).encode(weights, 0)
    assert scales == scale
    half = (m + 1) // 2
    np.testing.assert_array_equal(codes, [m, half, -half, 0])


# ---------------------------------------------------------------------------
# Round trip, monotonicity, error bound.


@st.composite
def codes_and_scales(draw):
    """Codes `(rows, channels)` where every channel reaches +-m, and positive scales."""
    bits = draw(bits_st)
    m = 2 ** (bits - 1) - 1
    rows = draw(st.integers(min_value=1, max_value=6))
    channels = draw(st.integers(min_value=1, max_value=5))
    codes = draw(
        hnp.arrays(np.int8, (rows, channels), elements=st.integers(min_value=-m, max_value=m))
    )
    top_rows = draw(hnp.arrays(np.int64, (channels,), elements=st.integers(0, rows - 1)))
    top_signs = draw(hnp.arrays(np.int8, (channels,), elements=st.sampled_from([-1, 1])))
    codes[top_rows, np.arange(channels)] = top_signs * m
    scales = draw(
        hnp.arrays(
            np.float32,
            (channels,),
            elements=st.floats(min_value=2.0**-60, max_value=2.0**60, width=32),
        )
    )
    return bits, codes, scales


@SETTINGS
@given(codes_and_scales(), exponent_st)
def test_encode_decode_round_trip(data, exponent):
    bits, codes, scales = data
    quantizer = WeightQuantizer(bits, exponent)
    decoded = quantizer.decode(codes, scales)
    assert decoded.dtype == np.float32
    assert np.all(np.isfinite(decoded))
    again, again_scales = quantizer.encode(decoded, 1)
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_array_equal(again_scales, scales)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("exponent", [0.1, 0.25, 0.5, 0.62, 1.0, 1.5, 2.0, 4.0])
def test_every_code_round_trips_and_decode_is_increasing(bits, exponent):
    quantizer = WeightQuantizer(bits, exponent, per_channel=False)
    m = 2 ** (bits - 1) - 1
    all_codes = np.arange(-m, m + 1, dtype=np.int8)
    for scale in (np.float32(1.0), np.float32(0.037), np.float32(1234.5)):
        decoded = quantizer.decode(all_codes, scale)
        assert np.all(np.diff(decoded) > 0)
        codes, scales = quantizer.encode(decoded, 0)
        np.testing.assert_array_equal(codes, all_codes)
        assert scales == scale
    table = quantizer.decode_table()
    assert table.shape == (2 * m + 1,)
    assert table[0] == -1.0 and table[m] == 0.0 and table[-1] == 1.0
    np.testing.assert_array_equal(table, -table[::-1])
    # Levels are (k / m)^(1/a).
    expected = np.sign(all_codes) * (np.abs(all_codes) / m) ** (1.0 / exponent)
    np.testing.assert_allclose(table, expected, rtol=1e-6, atol=0)


@SETTINGS
@given(kernels(), bits_st, exponent_st, st.booleans())
def test_error_is_at_most_half_a_step_in_the_power_domain(kernel, bits, exponent, per_channel):
    weights, channel_ndim = kernel
    channel_ndim = channel_ndim if per_channel else 0
    quantizer = WeightQuantizer(bits, exponent, per_channel)
    codes, _ = quantizer.encode(weights, channel_ndim)
    m = 2 ** (bits - 1) - 1
    scales = reference_scales(weights, channel_ndim)
    safe = np.where(scales > 0, scales, 1.0)
    normalized = np.abs(weights.astype(np.float64)) / safe
    error = np.abs(normalized**exponent - np.abs(codes.astype(np.float64)) / m)
    assert np.all(error <= 1.0 / (2 * m) + 1e-6)


@SETTINGS
@given(kernels(), bits_st, exponent_st, st.booleans())
def test_quantize_is_decode_of_encode_and_bounded_by_scale(kernel, bits, exponent, per_channel):
    weights, channel_ndim = kernel
    quantizer = WeightQuantizer(bits, exponent, per_channel)
    codes, scales = quantizer.encode(weights, channel_ndim)
    quantized = quantizer.quantize(weights, channel_ndim)
    np.testing.assert_array_equal(quantized, quantizer.decode(codes, scales))
    assert quantized.dtype == np.float32
    assert np.all(np.isfinite(quantized))
    # |W_hat| never exceeds the channel maximum (scales broadcast on the
    # trailing channel axes).
    assert np.all(np.abs(quantized) <= scales)


def test_decode_formula_on_a_known_tensor():
    # Hand-checkable values: 4 bits (m = 7), a = 0.5, one channel with max 2.
    quantizer = WeightQuantizer(4, 0.5)
    codes = np.array([[7], [-7], [0], [3], [-1]], dtype=np.int8)
    scales = np.array([2.0], dtype=np.float32)
    expected = np.sign(codes) * 2.0 * (np.abs(codes) / 7.0) ** 2.0
    np.testing.assert_allclose(quantizer.decode(codes, scales), expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Degenerate tensors and invalid arguments.


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("exponent", [0.3, 1.0, 2.0])
def test_all_zero_and_constant_tensors_are_finite(per_channel, exponent):
    quantizer = WeightQuantizer(4, exponent, per_channel)
    zeros = np.zeros((3, 3, 2, 4), np.float32)
    codes, scales = quantizer.encode(zeros)
    assert np.all(codes == 0) and np.all(scales == 0)
    np.testing.assert_array_equal(quantizer.quantize(zeros), zeros)

    constant = np.full((3, 3, 2, 4), -0.75, np.float32)
    codes, scales = quantizer.encode(constant)
    assert np.all(codes == -7)
    np.testing.assert_array_equal(quantizer.quantize(constant), constant)


@pytest.mark.parametrize("per_channel", [True, False])
def test_zero_channel_among_nonzero_channels(per_channel):
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((5, 4)).astype(np.float32)
    kernel[:, 2] = 0.0
    quantizer = WeightQuantizer(4, 0.6, per_channel)
    codes, scales = quantizer.encode(kernel)
    quantized = quantizer.quantize(kernel)
    assert np.all(np.isfinite(quantized))
    assert np.all(codes[:, 2] == 0)
    assert np.all(quantized[:, 2] == 0)
    if per_channel:
        assert scales[2] == 0
        assert np.all(scales[[0, 1, 3]] > 0)
    # The non-zero channels are still quantized to within the scale.
    assert np.all(np.abs(quantized - kernel) <= np.abs(kernel).max(axis=0 if per_channel else None))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_raise(bad):
    kernel = np.ones((3, 2), np.float32)
    kernel[1, 1] = bad
    quantizer = WeightQuantizer(4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantizer.encode(kernel)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantizer.quantize(kernel)


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16, 4.0, True, "4", None])
def test_bits_outside_2_to_8_raise(bits):
    with pytest.raises(ValueError):
        WeightQuantizer(bits)


@pytest.mark.parametrize("exponent", [0.0, -0.5, -1.0, np.nan, np.inf])
def test_non_positive_or_non_finite_exponent_raises(exponent):
    with pytest.raises(ValueError):
        WeightQuantizer(4, exponent)


def test_numpy_integer_bits_accepted_and_config_round_trip():
    quantizer = WeightQuantizer(np.int64(5), 0.7, per_channel=False)
    assert quantizer.bits == 5 and isinstance(quantizer.bits, int)
    assert quantizer.max_code == 15
    clone = WeightQuantizer.from_config(quantizer.get_config())
    assert clone.get_config() == quantizer.get_config()
    np.testing.assert_array_equal(clone.decode_table(), quantizer.decode_table())

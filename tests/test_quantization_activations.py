"""Tests of the numpy activation quantizer (docs/method.md §2).

Expected values come from docs/method.md's formulas, computed here in float64.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_powerquant.quantization.activations import ActivationQuantizer

SETTINGS = settings(max_examples=60, deadline=None)

bits_st = st.integers(min_value=2, max_value=8)
exponent_st = st.floats(min_value=0.1, max_value=4.0)
clip_st = st.floats(min_value=1e-3, max_value=1e3)
value_st = st.floats(min_value=-1e4, max_value=1e4, width=32)


def max_code(bits, signed):
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


@st.composite
def inputs(draw, quantizer):
    """float32 values: random ones plus every threshold, its neighbours and +-clip."""
    random = draw(hnp.arrays(np.float32, st.integers(1, 50), elements=value_st))
    thresholds = quantizer.thresholds()
    near = np.concatenate(
        [
            thresholds,
            np.nextafter(thresholds, np.float32(-np.inf)),
            np.nextafter(thresholds, np.float32(np.inf)),
            quantizer.levels(),
        ]
    )
    clip = np.float32(quantizer.clip)
    return np.concatenate([random, near, [0.0, clip, -clip, 2 * clip]]).astype(np.float32)


@st.composite
def quantizers(draw, signed=None):
    signed = draw(st.booleans()) if signed is None else signed
    return ActivationQuantizer(draw(bits_st), draw(exponent_st), draw(clip_st), signed)


# ---------------------------------------------------------------------------
# Codes and tables.


@SETTINGS
@given(st.data())
def test_codes_in_range(data):
    quantizer = data.draw(quantizers())
    x = data.draw(inputs(quantizer))
    codes = quantizer.encode(x)
    big = max_code(quantizer.bits, quantizer.signed)
    assert quantizer.max_code == big
    assert quantizer.min_code == (-big if quantizer.signed else 0)
    assert codes.min() >= quantizer.min_code and codes.max() <= big
    if quantizer.signed:
        assert np.all(codes[x >= quantizer.clip] == big)
        assert np.all(codes[x <= -quantizer.clip] == -big)
    else:
        # Negatives and zero encode to 0, everything at or above c to M.
        assert np.all(codes[x <= 0] == 0)
        assert np.all(codes[x >= quantizer.clip] == big)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("exponent", [0.1, 0.3, 0.62, 1.0, 1.7, 4.0])
@pytest.mark.parametrize("clip", [0.01, 1.0, 6.0, 250.0])
def test_every_code_round_trips_and_decode_is_increasing(signed, bits, exponent, clip):
    quantizer = ActivationQuantizer(bits, exponent, clip, signed)
    codes = np.arange(quantizer.min_code, quantizer.max_code + 1)
    decoded = quantizer.decode(codes)
    assert decoded.dtype == np.float32
    assert np.all(np.diff(decoded) > 0)
    np.testing.assert_array_equal(quantizer.encode(decoded), codes)
    np.testing.assert_array_equal(quantizer.quantize(decoded), decoded)
    # The table is c (q / M)^(1/a), signed symmetric.
    big = quantizer.max_code
    expected = np.sign(codes) * clip * (np.abs(codes) / big) ** (1.0 / exponent)
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=0)
    assert decoded[-1] == np.float32(clip)
    # Thresholds: c ((k - 1/2) / M)^(1/a), one fewer than the levels.
    thresholds = quantizer.thresholds()
    assert thresholds.dtype == np.float32
    assert thresholds.shape == (decoded.size - 1,)
    k = np.arange(1, big + 1)
    positive = clip * ((k - 0.5) / big) ** (1.0 / exponent)
    expected_thresholds = np.concatenate([-positive[::-1], positive]) if signed else positive
    np.testing.assert_allclose(thresholds, expected_thresholds, rtol=1e-6, atol=0)
    # Each level lies strictly between its two thresholds.
    assert np.all(decoded[:-1] < thresholds) and np.all(thresholds < decoded[1:])


@SETTINGS
@given(st.data())
def test_encode_is_round_with_ties_up_against_float32_thresholds(data):
    quantizer = data.draw(quantizers())
    x = data.draw(inputs(quantizer))
    magnitude_thresholds = quantizer.magnitude_thresholds().astype(np.float32)
    # Code magnitude = number of thresholds at or below |x| (ties go up in
    # magnitude); negative inputs of an unsigned quantizer get code 0.
    counts = (magnitude_thresholds[None, :] <= np.abs(x)[:, None]).sum(axis=1)
    if quantizer.signed:
        expected = np.where(x < 0, -counts, counts)
    else:
        expected = np.where(x < 0, 0, counts)
    np.testing.assert_array_equal(quantizer.encode(x), expected)
    # A value exactly at a threshold takes the code further from zero.
    steps = np.arange(1, magnitude_thresholds.size + 1)
    np.testing.assert_array_equal(quantizer.encode(magnitude_thresholds), steps)
    if quantizer.signed:
        np.testing.assert_array_equal(quantizer.encode(-magnitude_thresholds), -steps)
    np.testing.assert_array_equal(quantizer.quantize(x), quantizer.decode(quantizer.encode(x)))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("clip", [1.0, 3.0])
def test_exponent_one_unsigned_is_uniform_rounding(bits, clip):
    quantizer = ActivationQuantizer(bits, 1.0, clip, signed=False)
    big = 2**bits - 1
    x = np.linspace(-0.5, 1.5 * clip, 20001, dtype=np.float32)
    ratio = big * np.clip(x.astype(np.float64), 0.0, clip) / clip
    expected = np.floor(ratio + 0.5)
    # Thresholds are rounded to float32: inputs within float32 rounding of a
    # half-integer ratio may go either way.
    tie = np.round(ratio - 0.5) + 0.5  # nearest half-integer
    ambiguous = np.abs(ratio - tie) <= 1e-6 * np.maximum(ratio, 1.0)
    codes = quantizer.encode(x)
    np.testing.assert_array_equal(codes[~ambiguous], expected[~ambiguous])
    # Near-ties land on one of the two codes around the tie.
    assert ambiguous.any()
    near, tie = codes[ambiguous], tie[ambiguous]
    assert np.all((near == tie - 0.5) | (near == tie + 0.5))


# ---------------------------------------------------------------------------
# Error bounds.


@SETTINGS
@given(st.data())
def test_unsigned_error_is_at_most_half_a_step_in_the_power_domain(data):
    quantizer = data.draw(quantizers(signed=False))
    x = data.draw(inputs(quantizer))
    clip = quantizer.clip
    x = x[(x >= 0) & (x <= np.float32(clip))]
    codes = quantizer.encode(x)
    big = quantizer.max_code
    power = (x.astype(np.float64) / clip) ** quantizer.exponent
    # Thresholds are float32: a float32-rounding slack on x becomes
    # a * 2^-24 relative in the power domain.
    assert np.all(np.abs(power - codes / big) <= 0.5 / big + 1e-6)


@SETTINGS
@given(st.data())
def test_signed_error_is_at_most_half_a_step_in_the_power_domain(data):
    quantizer = data.draw(quantizers(signed=True))
    x = data.draw(inputs(quantizer))
    clip = quantizer.clip
    x = x[np.abs(x) <= np.float32(clip)]
    codes = quantizer.encode(x)
    big = quantizer.max_code
    assert np.all(np.sign(codes) * np.sign(x) >= 0)
    power = (np.abs(x.astype(np.float64)) / clip) ** quantizer.exponent
    assert np.all(np.abs(power - np.abs(codes) / big) <= 0.5 / big + 1e-6)


@SETTINGS
@given(st.data())
def test_values_above_the_clip_saturate(data):
    quantizer = data.draw(quantizers())
    x = data.draw(inputs(quantizer))
    quantized = quantizer.quantize(x)
    assert np.all(np.isfinite(quantized))
    clip = np.float32(quantizer.clip)
    assert np.all(np.abs(quantized) <= clip)
    assert np.all(quantized[x >= clip] == clip)


# ---------------------------------------------------------------------------
# Degenerate inputs and invalid arguments.


@pytest.mark.parametrize("signed", [False, True])
def test_zero_and_constant_inputs(signed):
    quantizer = ActivationQuantizer(4, 0.5, 2.0, signed)
    zeros = np.zeros((4, 3), np.float32)
    np.testing.assert_array_equal(quantizer.quantize(zeros), zeros)
    np.testing.assert_array_equal(quantizer.encode(zeros), np.zeros((4, 3)))
    constant = np.full((4, 3), 7.0, np.float32)
    np.testing.assert_array_equal(quantizer.quantize(constant), np.full((4, 3), 2.0))


def test_infinities_saturate():
    x = np.array([-np.inf, np.inf], np.float32)
    np.testing.assert_array_equal(ActivationQuantizer(4, 0.5, 2.0).encode(x), [0, 15])
    np.testing.assert_array_equal(ActivationQuantizer(4, 0.5, 2.0, True).encode(x), [-7, 7])


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 32, 3.0, True, None])
def test_bits_outside_2_to_8_raise(bits):
    with pytest.raises(ValueError):
        ActivationQuantizer(bits)


@pytest.mark.parametrize("exponent", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_exponent_raises(exponent):
    with pytest.raises(ValueError):
        ActivationQuantizer(4, exponent)


@pytest.mark.parametrize("clip", [0.0, -1.0, np.nan, np.inf])
def test_non_positive_clip_raises(clip):
    with pytest.raises(ValueError):
        ActivationQuantizer(4, 1.0, clip)


def test_config_round_trip():
    quantizer = ActivationQuantizer(6, 0.45, 3.5, signed=True)
    clone = ActivationQuantizer.from_config(quantizer.get_config())
    assert clone.get_config() == quantizer.get_config()
    np.testing.assert_array_equal(clone.thresholds(), quantizer.thresholds())
    np.testing.assert_array_equal(clone.levels(), quantizer.levels())

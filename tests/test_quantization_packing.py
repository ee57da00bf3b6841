"""Tests of the two-codes-per-byte packing of <= 4-bit weight codes."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_powerquant.quantization.packing import nibble_pair_table
from keras_powerquant.quantization.packing import pack_nibbles
from keras_powerquant.quantization.packing import packed_size
from keras_powerquant.quantization.packing import unpack_nibbles
from keras_powerquant.quantization.weights import WeightQuantizer

SETTINGS = settings(max_examples=100, deadline=None)


@SETTINGS
@given(
    hnp.arrays(
        np.int8,
        hnp.array_shapes(min_dims=1, max_dims=4, max_side=7),
        elements=st.integers(-8, 7),
    )
)
def test_pack_unpack_round_trip(codes):
    packed = pack_nibbles(codes)
    assert packed.dtype == np.int8
    assert packed.shape == ((codes.size + 1) // 2,)
    assert packed_size(codes.size) == packed.size
    unpacked = unpack_nibbles(packed, codes.size)
    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, codes.ravel())


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 7, 8, 255, 256])
def test_odd_and_even_counts(count):
    codes = (np.arange(count) % 16 - 8).astype(np.int8)
    packed = pack_nibbles(codes)
    assert packed.size == (count + 1) // 2
    np.testing.assert_array_equal(unpack_nibbles(packed, count), codes)
    # Layout: code 2i in the low nibble, code 2i + 1 in the high nibble,
    # each stored as q + 8; an odd count is padded with code 0.
    padded = np.concatenate([codes, [0] * (count % 2)]).astype(np.int64) + 8
    expected = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    np.testing.assert_array_equal(packed.view(np.uint8), expected)
    if count % 2:
        assert unpack_nibbles(packed, count + 1)[-1] == 0


@pytest.mark.parametrize("bad", [8, -9, 15, 127, -128])
def test_out_of_range_codes_rejected(bad):
    with pytest.raises(ValueError):
        pack_nibbles(np.array([0, 1, bad, 2]))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("exponent", [0.3, 0.62, 1.0, 1.8])
def test_pair_table_decodes_what_decode_table_says(bits, exponent):
    quantizer = WeightQuantizer(bits, exponent)
    m = quantizer.max_code
    table = quantizer.decode_table()
    pairs = nibble_pair_table(table)
    assert pairs.shape == (256, 2) and pairs.dtype == np.float32
    valid = np.arange(-m, m + 1)
    first, second = np.meshgrid(valid, valid, indexing="ij")
    codes = np.stack([first.ravel(), second.ravel()], axis=-1).ravel()
    packed = pack_nibbles(codes)
    decoded = pairs[packed.astype(np.int64) + 128].ravel()
    np.testing.assert_array_equal(decoded, table[codes + m])
    # Equivalently: gather-by-byte equals decode of the unpacked codes.
    unpacked = unpack_nibbles(packed, codes.size)
    np.testing.assert_array_equal(decoded, quantizer.decode(unpacked, np.float32(1.0)))


@SETTINGS
@given(st.integers(2, 4), st.floats(0.1, 4.0), st.data())
def test_pair_table_gather_decodes_random_kernels(bits, exponent, data):
    quantizer = WeightQuantizer(bits, exponent)
    m = quantizer.max_code
    count = data.draw(st.integers(1, 60))
    codes = data.draw(hnp.arrays(np.int8, count, elements=st.integers(-m, m)))
    pairs = nibble_pair_table(quantizer.decode_table())
    decoded = pairs[pack_nibbles(codes).astype(np.int64) + 128].ravel()[:count]
    np.testing.assert_array_equal(decoded, quantizer.decode(codes, np.float32(1.0)))

"""Two 4-bit codes per byte, for weights at 4 bits or fewer.

Codes `q` in `[-8, 7]` are stored as nibbles `q + 8`: code `2i` in the low
nibble and code `2i + 1` in the high nibble of byte `i`, the byte viewed as
int8. An odd count is padded with code 0. Decoding needs no bit operations:
`nibble_pair_table` maps each of the 256 byte values (indexed by
`int8 value + 128`) to the decoded values of its two codes, so unpacking and
decoding are a single gather.
"""

import numpy as np

MAX_PACKED_BITS = 4
_NIBBLE_OFFSET = 8


def packed_size(count):
    """Bytes needed for `count` codes."""
    return (int(count) + 1) // 2


def pack_nibbles(codes):
    """Packs int codes in `[-8, 7]` into int8 bytes, shape `(ceil(n / 2),)`."""
    flat = np.asarray(codes, dtype=np.int16).ravel()
    if flat.size and (flat.min() < -_NIBBLE_OFFSET or flat.max() >= _NIBBLE_OFFSET):
        raise ValueError("Only codes in [-8, 7] fit in a nibble.")
    nibbles = np.zeros(2 * packed_size(flat.size), dtype=np.uint8)
    nibbles[: flat.size] = flat + _NIBBLE_OFFSET
    nibbles[flat.size :] = _NIBBLE_OFFSET  # padding decodes to code 0
    return (nibbles[0::2] | (nibbles[1::2] << 4)).view(np.int8)


def unpack_nibbles(packed, count):
    """Inverse of `pack_nibbles`: the first `count` codes, int8."""
    as_unsigned = np.asarray(packed, dtype=np.int8).view(np.uint8)
    nibbles = np.stack([as_unsigned & 0x0F, as_unsigned >> 4], axis=-1).ravel()
    return (nibbles[:count].astype(np.int16) - _NIBBLE_OFFSET).astype(np.int8)


def nibble_pair_table(decode_table):
    """Decoded values of both codes of every byte, `(256, 2)` float32.

    Args:
        decode_table: values of codes `-m..m` (`WeightQuantizer.decode_table()`),
            `m <= 7`. Row `r` is the byte whose int8 value is `r - 128`;
            nibbles outside `[-m, m]` (never written) decode to 0.
    """
    decode_table = np.asarray(decode_table, dtype=np.float32)
    max_code = (decode_table.size - 1) // 2
    by_code = np.zeros(2 * _NIBBLE_OFFSET, dtype=np.float32)
    by_code[_NIBBLE_OFFSET - max_code : _NIBBLE_OFFSET + max_code + 1] = decode_table
    unsigned = (np.arange(256) - 128) % 256
    return np.stack([by_code[unsigned & 0x0F], by_code[unsigned >> 4]], axis=-1)

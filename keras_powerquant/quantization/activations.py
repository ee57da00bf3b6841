"""Power quantization of activations (docs/method.md §2)."""

import numpy as np

from keras_powerquant.quantization.grid import magnitude_levels
from keras_powerquant.quantization.grid import magnitude_thresholds
from keras_powerquant.quantization.validation import check_bits
from keras_powerquant.quantization.validation import check_exponent
from keras_powerquant.quantization.validation import check_positive


class ActivationQuantizer:
    """Power quantizer for activations, unsigned (after ReLU) or signed.

    Unsigned, for `x >= 0`, clip value `c > 0`, bit width `b`:

    ```
    M     = 2^b - 1                                # 15 at 4 bits
    q     = round(M * (min(x, c) / c)^a)           # integer code in [0, M]
    x_hat = c * (q / M)^(1/a)
    ```

    Negative inputs get code 0. Signed inputs (the network input, an `Add`
    without a following ReLU, a tanh...) use the symmetric form of the
    weight quantizer with `m = 2^(b-1) - 1` levels per side and clip `c`.

    Because `x -> x^a` is monotone, encoding is comparing `|x|` with the
    fixed float32 thresholds `c * ((k - 1/2) / M)^(1/a)` and decoding is a
    lookup in the table `levels()`. Ties go up in magnitude: `|x|` equal to
    a threshold takes the larger code, as in `WeightQuantizer`. This is the
    reference the Keras layer `PowerQuantActivation` reproduces up to
    float32 rounding.

    Args:
        bits: bit width `b`, from 2 to 8.
        exponent: the power `a`, a positive float.
        clip: the clip value `c`, a positive float.
        signed: whether negative values are represented.
    """

    def __init__(self, bits, exponent=1.0, clip=1.0, signed=False):
        self.bits = check_bits(bits, "bits")
        self.exponent = check_exponent(exponent)
        self.clip = check_positive(clip, "clip")
        self.signed = bool(signed)

    @property
    def max_code(self):
        """Largest code magnitude: `2^b - 1` unsigned, `2^(b-1) - 1` signed."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def min_code(self):
        return -self.max_code if self.signed else 0

    def magnitude_thresholds(self):
        """float64 thresholds on `|x|` between codes `k - 1` and `k`, `k = 1..max_code`."""
        return magnitude_thresholds(self.max_code, self.exponent, self.clip)

    def magnitude_levels(self):
        """float64 values of code magnitudes `0..max_code`."""
        return magnitude_levels(self.max_code, self.exponent, self.clip)

    def thresholds(self):
        """Ascending float32 decision thresholds; `len(levels()) - 1` of them."""
        positive = self.magnitude_thresholds()
        if self.signed:
            positive = np.concatenate([-positive[::-1], positive])
        return positive.astype(np.float32)

    def levels(self):
        """float32 reconstruction values of codes `min_code..max_code`, ascending."""
        magnitudes = self.magnitude_levels()
        if self.signed:
            magnitudes = np.concatenate([-magnitudes[:0:-1], magnitudes])
        return magnitudes.astype(np.float32)

    def encode(self, x):
        """Integer codes in `[min_code, max_code]` (int64)."""
        x = np.asarray(x, dtype=np.float32)
        thresholds = self.magnitude_thresholds().astype(np.float32)
        if not self.signed:
            return np.searchsorted(thresholds, x, side="right")
        magnitudes = np.searchsorted(thresholds, np.abs(x), side="right")
        return np.where(x < 0, -magnitudes, magnitudes)

    def decode(self, codes):
        """float32 values of integer codes."""
        return self.levels()[np.asarray(codes, dtype=np.int64) - self.min_code]

    def quantize(self, x):
        """Quantize-dequantize: `decode(encode(x))`, float32."""
        return self.decode(self.encode(x))

    def get_config(self):
        return {
            "bits": self.bits,
            "exponent": self.exponent,
            "clip": self.clip,
            "signed": self.signed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"ActivationQuantizer(bits={self.bits}, exponent={self.exponent:.4g}, "
            f"clip={self.clip:.4g}, signed={self.signed})"
        )

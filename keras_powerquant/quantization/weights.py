"""Signed, symmetric power quantization of weight tensors (docs/method.md §1)."""

import numpy as np

from keras_powerquant.quantization.grid import magnitude_levels
from keras_powerquant.quantization.grid import magnitude_thresholds
from keras_powerquant.quantization.validation import check_bits
from keras_powerquant.quantization.validation import check_exponent


def check_clip(clip):
    """Returns `clip` as a float64 array (a scalar or per channel), or raises ValueError.

    A clip fraction `alpha` must be finite and in `(0, 1]`.
    """
    clip = np.asarray(clip, dtype=np.float64)
    if not np.all(np.isfinite(clip)) or np.any(clip <= 0) or np.any(clip > 1):
        raise ValueError(f"The weight clip fraction (`clip_fraction`) must be in (0, 1]; got {clip.tolist()}.")
    return clip


def channel_scales(weights, channel_ndim=1):
    """Maxima `s = max |W|` over everything but the output-channel axes.

    Args:
        weights: array whose last `channel_ndim` axes index the output
            channels: 1 for Dense and Conv kernels `(..., in, out)`, 2 for
            DepthwiseConv2D kernels `(kh, kw, in, multiplier)`, 0 for a
            single scale for the whole tensor.
        channel_ndim: number of trailing output-channel axes.

    Returns:
        float32 array of shape `weights.shape[weights.ndim - channel_ndim:]`.
    """
    magnitudes = np.abs(np.asarray(weights, dtype=np.float32))
    leading = tuple(range(magnitudes.ndim - channel_ndim))
    return np.asarray(magnitudes.max(axis=leading, initial=0.0), dtype=np.float32)


class WeightQuantizer:
    """Signed, symmetric power quantizer for weight tensors.

    For a tensor `W`, bit width `b` and exponent `a > 0`:

    ```
    m     = 2^(b-1) - 1                          # 7 at 4 bits
    s     = alpha * max |W|                      # per output channel or tensor
    q     = sign(W) * round(m * min(|W| / s, 1)^a)   # integer code in [-m, m]
    W_hat = sign(q) * s * (|q| / m)^(1/a)
    ```

    `s` is the paper's `lambda^(1/a)`: a layer only needs the codes, one
    float scale per output channel and the exponent. `a = 1` is plain
    symmetric uniform quantization. The clip fraction `alpha` in `(0, 1]`
    (docs/method.md §7; 1 by default, a scalar or one per channel) is an
    argument of `encode`, not of the quantizer: it only changes the stored
    scales, so clipped and unclipped kernels decode the same way.

    Rounding sends ties up: `|q| = k` exactly when `|W| / s` is at or above
    the decision threshold `((k - 1/2) / m)^(1/a)`. Codes are found by
    comparing against these `m` thresholds, so no power is evaluated per
    weight.

    Args:
        bits: bit width `b`, from 2 to 8 (codes fit in int8).
        exponent: the power `a`, a positive float.
        per_channel: one scale per output channel (default) or a single
            scale for the whole tensor.
    """

    def __init__(self, bits, exponent=1.0, per_channel=True):
        self.bits = check_bits(bits, "bits")
        self.exponent = check_exponent(exponent)
        self.per_channel = bool(per_channel)

    @property
    def max_code(self):
        """`m = 2^(b-1) - 1`, the largest code magnitude."""
        return 2 ** (self.bits - 1) - 1

    def magnitude_thresholds(self):
        """Decision thresholds on `|W| / s`, shape `(m,)`, ascending."""
        return magnitude_thresholds(self.max_code, self.exponent)

    def magnitude_levels(self):
        """Reconstruction levels of `|W| / s` for codes `0..m`, shape `(m + 1,)`."""
        return magnitude_levels(self.max_code, self.exponent)

    def decode_table(self):
        """Normalized values of codes `-m..m`, shape `(2m + 1,)`: `table[q + m]`."""
        levels = self.magnitude_levels()
        return np.concatenate([-levels[:0:-1], levels]).astype(np.float32)

    def scales(self, weights, channel_ndim=1, clip_fraction=1.0):
        """Scales `s = alpha * max |W|` per channel (or per tensor); see `channel_scales`.

        Args:
            weights: float array.
            channel_ndim: number of trailing output-channel axes.
            clip_fraction: the clip fraction `alpha` in `(0, 1]` (weight
                clipping, docs/method.md §7): a scalar, or an array
                broadcastable to the scales' shape.
        """
        maxima = channel_scales(weights, channel_ndim if self.per_channel else 0)
        clip_fraction = check_clip(clip_fraction)
        if clip_fraction.ndim == 0 and clip_fraction == 1.0:
            return maxima
        return np.asarray(maxima * clip_fraction, dtype=np.float32)

    def encode(self, weights, channel_ndim=1, clip_fraction=1.0, rounding_up=None, codes=None):
        """Quantizes `weights` to integer codes.

        Magnitudes above the scale `s` (with `alpha < 1`) get the largest
        code `m`.

        Args:
            weights: float array; see `scales` for `channel_ndim`.
            channel_ndim: number of trailing output-channel axes.
            clip_fraction: the clip fraction `alpha`; see `scales`.
            rounding_up: learned rounding (AdaRound): a boolean array of the
                shape of `weights`; each code magnitude is then
                `floor(m (|W| / s)^a)`, plus 1 where True (at most `m`),
                instead of the nearest.
            codes: explicit integer codes of the shape of `weights`, in
                `[-m, m]` (second-order rounding, docs/method.md §9): returned
                as they are (0 where a scale is 0), the scales computed from
                `weights` as always. Overrides `rounding_up`.

        Returns:
            `(codes, scales)`: int8 codes of the shape of `weights`, in
            `[-m, m]`, and the float32 scales returned by `scales`.
        """
        weights = np.asarray(weights, dtype=np.float32)
        if not np.all(np.isfinite(weights)):
            raise ValueError("Cannot quantize weights that contain NaN or Inf.")
        scales = self.scales(weights, channel_ndim, clip_fraction)
        # All-zero channels keep a zero scale; dividing by 1 gives code 0.
        if codes is not None:
            return self._explicit_codes(codes, weights.shape, scales), scales
        safe = np.where(scales > 0, scales, np.float32(1.0))
        normalized = np.abs(weights) / safe
        if rounding_up is None:
            magnitudes = np.searchsorted(self.magnitude_thresholds(), normalized, side="right")
        else:
            powered = self.max_code * np.minimum(normalized, np.float32(1.0)) ** np.float32(self.exponent)
            magnitudes = np.minimum(np.floor(powered) + np.asarray(rounding_up, dtype=bool), self.max_code)
        codes = np.where(weights < 0, -magnitudes, magnitudes)
        return codes.astype(np.int8), scales

    def _explicit_codes(self, codes, shape, scales):
        codes = np.asarray(codes)
        if codes.shape != shape:
            raise ValueError(f"Explicit codes have shape {codes.shape}; the weights have {shape}.")
        if not np.issubdtype(codes.dtype, np.integer) or np.any(np.abs(codes.astype(np.int64)) > self.max_code):
            raise ValueError(f"Explicit codes must be integers in [-{self.max_code}, {self.max_code}].")
        return np.where(np.broadcast_to(scales, shape) > 0, codes, 0).astype(np.int8)

    def decode(self, codes, scales):
        """Reconstructs float32 weights from codes and scales."""
        codes = np.asarray(codes)
        table = self.decode_table()
        return table[codes.astype(np.int64) + self.max_code] * np.asarray(scales, dtype=np.float32)

    def quantize(self, weights, channel_ndim=1, clip_fraction=1.0):
        """Quantize-dequantize: `decode(encode(weights, channel_ndim, clip_fraction))`, float32."""
        return self.decode(*self.encode(weights, channel_ndim, clip_fraction))

    def get_config(self):
        return {"bits": self.bits, "exponent": self.exponent, "per_channel": self.per_channel}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"WeightQuantizer(bits={self.bits}, exponent={self.exponent:.4g}, "
            f"per_channel={self.per_channel})"
        )

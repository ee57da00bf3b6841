"""The power grid shared by the weight and activation quantizers and the search."""

import numpy as np


def magnitude_thresholds(max_code, exponent, scale=1.0):
    """Thresholds `scale * ((k - 1/2) / max_code)^(1/a)`, `k = 1..max_code`, float64.

    A magnitude at or above the `k`-th threshold (and below the next) gets
    code `k`. Shared by the weight and activation quantizers and the search.
    """
    k = np.arange(1, max_code + 1, dtype=np.float64)
    return scale * ((k - 0.5) / max_code) ** (1.0 / exponent)


def magnitude_levels(max_code, exponent, scale=1.0):
    """Levels `scale * (k / max_code)^(1/a)`, `k = 0..max_code`, float64."""
    k = np.arange(max_code + 1, dtype=np.float64)
    return scale * (k / max_code) ** (1.0 / exponent)

"""Argument checks shared by the quantizers."""

import math
import numbers

from keras_powerquant.limits import MAX_BITS
from keras_powerquant.limits import MIN_BITS


def check_bits(bits, name="bits"):
    """Returns `bits` as an int, or raises ValueError outside 2..8."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer from {MIN_BITS} to {MAX_BITS}; got {bits!r}.")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`{name}` must be from {MIN_BITS} to {MAX_BITS}; got {bits}.")
    return int(bits)


def check_exponent(exponent):
    """Returns `exponent` as a float, or raises ValueError unless finite and > 0."""
    exponent = float(exponent)
    if not math.isfinite(exponent) or exponent <= 0:
        raise ValueError(f"The exponent must be a finite number > 0; got {exponent}.")
    return exponent


def check_positive(value, name):
    """Returns `value` as a float, or raises ValueError unless finite and > 0."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0; got {value}.")
    return value


def check_integer(value, name, minimum):
    """Returns `value` as an int, or raises ValueError unless an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)

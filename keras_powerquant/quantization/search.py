"""Exponent and clip search by minimising reconstruction error (docs/method.md §3).

The error of a power quantizer depends on a tensor only through the sorted
magnitudes of its values: each code collects a contiguous run of them. With
the magnitudes sorted once and float64 prefix sums of `w`, `w x` and `w x^2`
kept, the p = 2 error of any (clip, exponent) is

    sum over codes k of  S2_k - 2 l_k S1_k + l_k^2 S0_k

where `S*_k` are differences of prefix sums at the code boundaries (found by
binary search) and `l_k` is the code's level. One evaluation costs
O(codes * log n) instead of O(n), so fitting a 25M-parameter model costs
about one sort per layer. Other p fall back to an O(n) evaluation.
"""

import copy
import dataclasses

import numpy as np
from scipy import optimize

from keras_powerquant.quantization.grid import magnitude_levels
from keras_powerquant.quantization.grid import magnitude_thresholds
from keras_powerquant.quantization.validation import check_bits
from keras_powerquant.quantization.weights import channel_scales

DEFAULT_EXPONENT_BOUNDS = (0.1, 2.0)
# Activation exponents whose power and inverse are square roots and squares
# (cheap at inference, see PowerQuantActivation); `a = 1` is uniform.
FAST_ACTIVATION_EXPONENTS = (0.25, 0.5, 1.0)
# Coarse grid evaluated before the bracketing search, so that a step-like
# error curve (small tensors) cannot trap the search in a poor local minimum.
_GRID_POINTS = 17
# Clip candidates span this fraction of the largest magnitude up to all of it.
_MIN_CLIP_FRACTION = 1e-3
# Weight clip fractions searched: below this a 2-bit kernel of a trained
# layer loses more in its clipped tail than it gains in resolution.
MIN_WEIGHT_CLIP = 0.05


class SortedMagnitudes:
    """Weighted magnitudes, sorted, that evaluate quantization error fast.

    Args:
        values: 1-D array of magnitudes. Negative values are allowed: they
            fall in code 0 (level 0), as negative inputs of an unsigned
            quantizer do.
        weights: optional per-value weights (same shape), e.g. `s^p` to
            measure errors of normalized weights in original units.
        p: the error norm exponent, `sum w |x - x_hat|^p`.
    """

    def __init__(self, values, weights=None, p=2.0):
        values = np.asarray(values, dtype=np.float64).ravel()
        order = np.argsort(values, kind="stable")
        self.values = values[order]
        self.weights = None if weights is None else np.asarray(weights, np.float64).ravel()[order]
        self.p = float(p)
        if self.p <= 0:
            raise ValueError(f"The error norm p must be > 0; got {p}.")
        if self.p == 2.0:
            w = np.ones_like(self.values) if self.weights is None else self.weights
            self._prefix = [
                np.concatenate([[0.0], np.cumsum(term)])
                for term in (w, w * self.values, w * self.values**2)
            ]

    @property
    def size(self):
        return self.values.size

    @property
    def max_value(self):
        return float(self.values[-1]) if self.values.size else 0.0

    def error(self, thresholds, levels):
        """`sum w |x - levels[k(x)]|^p`, with `k(x)` = number of thresholds <= x.

        Args:
            thresholds: ascending array of `K` thresholds.
            levels: array of `K + 1` levels, one per code.
        """
        starts = np.searchsorted(self.values, thresholds, side="left")
        bounds = np.concatenate([[0], starts, [self.values.size]])
        levels = np.asarray(levels, dtype=np.float64)
        if self.p == 2.0:
            s0, s1, s2 = (np.diff(prefix[bounds]) for prefix in self._prefix)
            # Cancellation can leave a tiny negative number for a perfect fit.
            return max(float(np.sum(s2 - 2.0 * levels * s1 + levels**2 * s0)), 0.0)
        reconstruction = np.repeat(levels, np.diff(bounds))
        errors = np.abs(self.values - reconstruction) ** self.p
        if self.weights is not None:
            errors = errors * self.weights
        return float(np.sum(errors))


@dataclasses.dataclass(frozen=True)
class ExponentFit:
    """Result of a weight exponent (and clip) search.

    Attributes:
        exponent: the fitted exponent `a*`.
        error: reconstruction error `sum |W - W_hat|^p` at `(a*, clip)`.
        uniform_error: the same error at `a = 1`, clip 1 (uniform
            quantization with max scaling).
        clip: the fitted clip fraction `alpha*` of each channel's maximum
            magnitude (docs/method.md §7); 1 when clipping is off.
    """

    exponent: float
    error: float
    uniform_error: float
    clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class ActivationFit:
    """Result of an activation (clip, exponent) search.

    Attributes:
        clip: the fitted clip value `c*`.
        exponent: the fitted exponent `a*`.
        error: reconstruction error on the samples at `(c*, a*)`.
        uniform_clip: the best clip value for `a = 1`.
        uniform_error: the error at `(uniform_clip, 1)`.
    """

    clip: float
    exponent: float
    error: float
    uniform_clip: float
    uniform_error: float


class WeightErrorModel:
    """Reconstruction error of one weight tensor as a function of (exponent, clip).

    The clip fraction `alpha` scales every channel's scale `max |W|` alike
    (one fraction per layer): magnitudes above `alpha max |W|` take the
    largest level.

    Args:
        weights: the (BatchNorm-folded) weight tensor.
        bits: weight bit width.
        channel_ndim: trailing output-channel axes (see `channel_scales`);
            0 for one scale per tensor.
        p: the error norm exponent.
        max_samples: at `p != 2`, where each error costs O(n), measure it
            on an evenly spaced subsample of at most about this many
            weights (deterministic); None for all of them.
    """

    def __init__(self, weights, bits, channel_ndim=1, p=2.0, max_samples=None):
        self.max_code = 2 ** (check_bits(bits) - 1) - 1
        weights = np.asarray(weights, dtype=np.float32)
        if not np.all(np.isfinite(weights)):
            raise ValueError("Cannot fit an exponent to weights that contain NaN or Inf.")
        scales = channel_scales(weights, channel_ndim)
        safe = np.where(scales > 0, scales, np.float32(1.0))
        normalized = (np.abs(weights) / safe).ravel()
        # |W - W_hat|^p = s^p |x - x_hat|^p for normalized magnitudes x.
        unit_weights = np.broadcast_to(scales.astype(np.float64) ** p, weights.shape).ravel()
        if p != 2.0 and max_samples is not None and normalized.size > max_samples:
            step = normalized.size // max_samples
            normalized, unit_weights = normalized[::step], unit_weights[::step]
        self.magnitudes = SortedMagnitudes(normalized, unit_weights, p=p)

    def at_bits(self, bits):
        """The same weights' error model at another bit width (sharing the sorted magnitudes)."""
        model = copy.copy(self)
        model.max_code = 2 ** (check_bits(bits) - 1) - 1
        return model

    def error(self, exponent, clip=1.0):
        """`sum |W - W_hat|^p` at exponent `a` and clip fraction `alpha`."""
        return self.magnitudes.error(
            magnitude_thresholds(self.max_code, exponent, clip),
            magnitude_levels(self.max_code, exponent, clip),
        )

    def best_clip(self, exponent, low=MIN_WEIGHT_CLIP):
        """`(clip, error)` minimising the error for a fixed exponent; clip 1 on ties."""
        clip, error = minimize_bounded(lambda c: self.error(exponent, c), low, 1.0)
        unclipped = self.error(exponent, 1.0)
        return (1.0, unclipped) if unclipped <= error else (clip, error)


class ActivationErrorModel:
    """Reconstruction error of activation samples as a function of (clip, exponent).

    Args:
        samples: 1-D array of activation values.
        bits: activation bit width.
        signed: whether the quantizer is signed (symmetric) or unsigned.
        p: the error norm exponent.
    """

    def __init__(self, samples, bits, signed, p=2.0):
        bits = check_bits(bits)
        self.signed = bool(signed)
        self.max_code = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        samples = np.asarray(samples, dtype=np.float64).ravel()
        if not np.all(np.isfinite(samples)):
            raise ValueError("Activation samples contain NaN or Inf.")
        # The signed quantizer is symmetric: its error depends only on |x|.
        self.magnitudes = SortedMagnitudes(np.abs(samples) if signed else samples, p=p)

    @property
    def max_value(self):
        return self.magnitudes.max_value

    def error(self, clip, exponent):
        return self.magnitudes.error(
            magnitude_thresholds(self.max_code, exponent, clip),
            magnitude_levels(self.max_code, exponent, clip),
        )

    def best_clip(self, exponent):
        """`(clip, error)` minimising the error for a fixed exponent."""
        lowest_clip = self.max_value * _MIN_CLIP_FRACTION
        if not lowest_clip > 0:
            # Nothing positive to represent, or only subnormal values whose
            # clip range underflows: clip at the largest value (1 if none).
            clip = self.max_value if self.max_value > 0 else 1.0
            return clip, self.error(clip, exponent)
        return minimize_bounded(lambda clip: self.error(clip, exponent), lowest_clip, self.max_value)


def minimize_bounded(fn, low, high, xatol=1e-4):
    """Minimises a scalar function on `[low, high]`; returns `(x, fn(x))`.

    A geometric grid finds the best bracket, then scipy's bounded (Brent)
    search refines inside it. Deterministic.
    """
    grid = np.geomspace(low, high, _GRID_POINTS)
    values = [fn(x) for x in grid]
    best = int(np.argmin(values))
    bracket = grid[max(best - 1, 0)], grid[min(best + 1, _GRID_POINTS - 1)]
    result = optimize.minimize_scalar(
        fn, bounds=bracket, method="bounded", options={"xatol": xatol * bracket[1]}
    )
    if result.fun < values[best]:
        return float(result.x), float(result.fun)
    return float(grid[best]), float(values[best])


def _check_bounds(bounds):
    low, high = (float(b) for b in bounds)
    if not 0 < low < high:
        raise ValueError(f"Exponent bounds must satisfy 0 < low < high; got {bounds}.")
    return low, high


def minimize_exponent(error_fn, bounds=DEFAULT_EXPONENT_BOUNDS):
    """Exponent in `bounds` minimising `error_fn`; returns `(exponent, error)`.

    `a = 1` is also tried when inside the bounds, so the result is never
    worse than uniform quantization by the criterion being minimised.
    """
    low, high = _check_bounds(bounds)
    exponent, error = minimize_bounded(error_fn, low, high)
    if low <= 1.0 <= high:
        uniform_error = error_fn(1.0)
        if uniform_error <= error:
            return 1.0, uniform_error
    return exponent, error


def fit_weight_exponent(
    weights, bits, channel_ndim=1, p=2.0, bounds=DEFAULT_EXPONENT_BOUNDS, clip=False
):
    """Fits the exponent (and clip fraction) of one weight tensor (scope `layer`).

    Args:
        weights: the (BatchNorm-folded) weight tensor.
        bits: weight bit width.
        channel_ndim: trailing output-channel axes; 0 for a per-tensor scale.
        p: the error norm exponent.
        bounds: the search interval for the exponent.
        clip: also fit the clip fraction `alpha` jointly (docs/method.md §7).

    Returns:
        An `ExponentFit`.
    """
    return fit_weight_model(WeightErrorModel(weights, bits, channel_ndim, p), bounds, clip=clip)


def fit_weight_model(model, bounds=DEFAULT_EXPONENT_BOUNDS, exponent=None, clip=False):
    """Fits one `WeightErrorModel`: its exponent, and with `clip` its clip fraction.

    With `clip`, the exponent minimises the error at each exponent's best
    clip; the unclipped fit is kept when it is as good, so the fitted error
    is never above the unclipped one (nor, `a = 1` being tried, above
    uniform's).

    Args:
        model: a `WeightErrorModel`.
        bounds: the exponent search interval.
        exponent: fix the exponent (1.0 for uniform) instead of fitting it.
        clip: fit the clip fraction `alpha` in `[MIN_WEIGHT_CLIP, 1]` too.

    Returns:
        An `ExponentFit`.
    """
    uniform_error = model.error(1.0)
    if exponent is not None:
        best = (float(exponent), model.error(exponent), 1.0)
    else:
        best = (*minimize_exponent(model.error, bounds), 1.0)
    if clip:
        if exponent is not None:
            clipped_exponent = float(exponent)
        else:
            clipped_exponent, _ = minimize_exponent(lambda a: model.best_clip(a)[1], bounds)
        fraction, error = model.best_clip(clipped_exponent)
        if error < best[1]:
            best = (clipped_exponent, error, fraction)
    exponent, error, fraction = best
    return ExponentFit(exponent, error, uniform_error, fraction)


def fit_shared_weight_exponent(models, bounds=DEFAULT_EXPONENT_BOUNDS, clip=False):
    """Fits one exponent for several tensors on their summed error (scope `network`).

    Args:
        models: `WeightErrorModel`s, one per layer.
        bounds: the search interval for the exponent.
        clip: also fit each tensor's own clip fraction; the shared exponent
            then minimises the summed error at each tensor's best clip.

    Returns:
        A list of `ExponentFit`, one per model, sharing the same exponent.
    """
    exponent, _ = minimize_exponent(lambda a: sum(m.error(a) for m in models), bounds)
    if clip:
        clipped, _ = minimize_exponent(lambda a: sum(m.best_clip(a)[1] for m in models), bounds)
        if sum(m.best_clip(clipped)[1] for m in models) < sum(m.error(exponent) for m in models):
            exponent = clipped
    fits = []
    for m in models:
        fraction, error = m.best_clip(exponent) if clip else (1.0, m.error(exponent))
        fits.append(ExponentFit(exponent, error, m.error(1.0), fraction))
    return fits


def fit_activation(samples, bits, signed, p=2.0, bounds=DEFAULT_EXPONENT_BOUNDS, exponent=None):
    """Fits the clip value and exponent of an activation quantizer jointly.

    Args:
        samples: 1-D array of activation values (recorded or modelled).
        bits: activation bit width.
        signed: whether to use the signed (symmetric) quantizer.
        p: the error norm exponent.
        bounds: the search interval for the exponent.
        exponent: fix the exponent (e.g. 1.0 for uniform) and fit only the clip.

    Returns:
        An `ActivationFit`.
    """
    model = ActivationErrorModel(samples, bits, signed, p)
    return fit_activation_models([model], bounds, exponent, shared=False)[0]


def _best_choice(error_fn, choices):
    errors = [error_fn(a) for a in choices]
    return choices[int(np.argmin(errors))]


def fit_activation_models(
    models, bounds=DEFAULT_EXPONENT_BOUNDS, exponent=None, shared=False, choices=None, progress=None
):
    """Fits several activation quantizers; `shared` gives them one exponent.

    Each model keeps its own clip value. With `shared=True` (scope
    `network`) the exponent minimises the summed error of all models, each
    at its best clip.

    Args:
        models: `ActivationErrorModel`s.
        bounds: the exponent search interval.
        exponent: fix the exponent of every model (e.g. 1.0 for uniform).
        shared: one exponent for all models (scope `network`).
        choices: search only these exponents (e.g.
            `FAST_ACTIVATION_EXPONENTS`) instead of the interval.
        progress: optional `progress(done, total)`, called as each model's
            fit is complete.

    Returns:
        A list of `ActivationFit`, one per model.
    """

    def fit(error_fn):
        if choices is not None:
            return _best_choice(error_fn, tuple(float(c) for c in choices))
        return minimize_exponent(error_fn, bounds)[0]

    shared_exponent = None
    if exponent is not None:
        shared_exponent = float(exponent)
    elif shared:
        shared_exponent = fit(lambda a: sum(m.best_clip(a)[1] for m in models))
    fits = []
    for i, model in enumerate(models):
        a = shared_exponent if shared_exponent is not None else fit(lambda a, m=model: m.best_clip(a)[1])
        clip, error = model.best_clip(a)
        uniform_clip, uniform_error = (clip, error) if a == 1.0 else model.best_clip(1.0)
        fits.append(ActivationFit(clip, a, error, uniform_clip, uniform_error))
        if progress is not None:
            progress(i + 1, len(models))
    return fits

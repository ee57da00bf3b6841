"""Quantizer settings that refinement searches over, and their weight-error fits."""

import dataclasses

import numpy as np

from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.grid import magnitude_levels
from keras_powerquant.quantization.grid import magnitude_thresholds
from keras_powerquant.quantization.search import ExponentFit
from keras_powerquant.quantization.search import minimize_bounded
from keras_powerquant.quantization.search import minimize_exponent
from keras_powerquant.quantization.search import SortedMagnitudes
from keras_powerquant.quantization.weights import channel_scales

# Weight clip fractions searched by the per-layer fits (docs/method.md §7).
MIN_CLIP_FRACTION = 0.2
# Weights kept per layer for fits at p != 2, whose error costs O(n) per evaluation.
_MAX_FIT_WEIGHTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class KernelSetting:
    """How one layer's kernel is quantized.

    Attributes:
        bits: weight bit width.
        exponent: the power exponent `a`.
        clip_fraction: the scale as a fraction of `max |W|`, in (0, 1].
        per_channel: one scale per output channel, or one per tensor.
    """

    bits: int
    exponent: float
    clip_fraction: float
    per_channel: bool


@dataclasses.dataclass(frozen=True)
class ActivationSetting:
    """How one activation quantizer quantizes: clip value `c` and exponent `a`."""

    clip: float
    exponent: float


@dataclasses.dataclass
class Settings:
    """Every quantizer's setting.

    Attributes:
        kernels: `KernelSetting` by layer name.
        activations: `ActivationSetting` by tensor key.
        rounding: learned rounding by layer name: a boolean array of the
            kernel's shape, True where the code rounds up from
            `floor(m (|W| / s)^a)`; layers absent round to nearest.
    """

    kernels: dict
    activations: dict
    rounding: dict = dataclasses.field(default_factory=dict)

    def replace(self, kernels=None, activations=None, rounding=None):
        """A copy with some settings replaced (dicts of `kernels`, `activations`, `rounding`)."""
        return Settings(
            {**self.kernels, **(kernels or {})},
            {**self.activations, **(activations or {})},
            {**self.rounding, **(rounding or {})},
        )

    @classmethod
    def from_plan(cls, plan, per_channel):
        kernels = {
            p.layer.name: KernelSetting(
                p.weight_bits,
                p.fit.exponent,
                p.clip_fraction,
                per_channel if p.per_channel is None else p.per_channel,
            )
            for p in plan.layers.values()
        }
        activations = {
            key: ActivationSetting(q.fit.clip, q.fit.exponent) for key, q in plan.quantizers.items() if q.quantized
        }
        return cls(kernels, activations)


class KernelFitter:
    """Per-layer weight fits for any bit width, granularity, exponent and clip fraction.

    Keeps the sorted normalized magnitudes of each granularity, so a fit is
    a few scalar searches, and `error` is the weight error
    `sum |W - W_hat|^p` of a `KernelSetting`.

    Args:
        layer_plan: the layer's `LayerPlan`.
    """

    def __init__(self, layer_plan):
        self.kernel = np.asarray(layer_plan.kernel, dtype=np.float32)
        self.channel_ndim = linear_type(layer_plan.layer).channel_ndim
        self._magnitudes = {}

    def _sorted(self, per_channel, p):
        key = (bool(per_channel), float(p))
        if key not in self._magnitudes:
            scales = channel_scales(self.kernel, self.channel_ndim if per_channel else 0)
            safe = np.where(scales > 0, scales, np.float32(1.0))
            normalized = np.abs(self.kernel) / safe
            weights = np.broadcast_to(scales.astype(np.float64) ** p, self.kernel.shape)
            normalized, weights = normalized.ravel(), weights.ravel()
            if p != 2.0 and normalized.size > _MAX_FIT_WEIGHTS:
                # A fixed, evenly spaced subsample: deterministic, bounded cost.
                step = normalized.size // _MAX_FIT_WEIGHTS
                normalized, weights = normalized[::step], weights[::step]
            self._magnitudes[key] = SortedMagnitudes(normalized, weights, p=p)
        return self._magnitudes[key]

    def error(self, setting, p=2.0):
        """`sum |W - W_hat|^p` (on a subsample for large layers at p != 2)."""
        max_code = 2 ** (setting.bits - 1) - 1
        # The one place weight clipping enters the error: thresholds and
        # levels of the normalized magnitudes shrink by the clip fraction.
        return self._sorted(setting.per_channel, p).error(
            magnitude_thresholds(max_code, setting.exponent, setting.clip_fraction),
            magnitude_levels(max_code, setting.exponent, setting.clip_fraction),
        )

    def fit(self, setting, p=2.0, exponent_bounds=None, clip=True):
        """The setting with its exponent (if `exponent_bounds`) and clip fraction refitted at norm `p`.

        Exponent and clip fraction are fitted alternately (two rounds), each
        by a bounded scalar search.
        """
        for _ in range(2 if exponent_bounds is not None and clip else 1):
            if exponent_bounds is not None:
                exponent, _ = minimize_exponent(
                    lambda a: self.error(dataclasses.replace(setting, exponent=a), p), exponent_bounds
                )
                setting = dataclasses.replace(setting, exponent=exponent)
            if clip:
                fraction, error = minimize_bounded(
                    lambda f: self.error(dataclasses.replace(setting, clip_fraction=f), p), MIN_CLIP_FRACTION, 1.0
                )
                if self.error(dataclasses.replace(setting, clip_fraction=1.0), p) <= error:
                    fraction = 1.0
                setting = dataclasses.replace(setting, clip_fraction=fraction)
        return setting


def apply_settings(plan, settings, fitters, activation_models):
    """Writes `settings` into the plan's layer and quantizer fits, errors recomputed.

    Args:
        plan: the `ConversionPlan`, changed in place and returned.
        settings: the `Settings` to apply.
        fitters: `KernelFitter` by layer name.
        activation_models: `ActivationErrorModel` by quantizer key.
    """
    for layer_plan in plan.layers.values():
        setting = settings.kernels[layer_plan.layer.name]
        fitter = fitters[layer_plan.layer.name]
        uniform = dataclasses.replace(setting, exponent=1.0, clip_fraction=1.0)
        layer_plan.weight_bits = setting.bits
        layer_plan.clip_fraction = setting.clip_fraction
        layer_plan.per_channel = setting.per_channel
        layer_plan.rounding_up = settings.rounding.get(layer_plan.layer.name)
        layer_plan.fit = ExponentFit(setting.exponent, fitter.error(setting), fitter.error(uniform))
    for key, setting in settings.activations.items():
        quantizer = plan.quantizers[key]
        error = activation_models[key].error(setting.clip, setting.exponent)
        quantizer.fit = dataclasses.replace(quantizer.fit, clip=setting.clip, exponent=setting.exponent, error=error)
    return plan

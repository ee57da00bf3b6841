"""Quantizer settings that refinement searches over, and their weight-error fits."""

import dataclasses

import numpy as np

from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.search import ExponentFit
from keras_powerquant.quantization.search import minimize_exponent
from keras_powerquant.quantization.search import WeightErrorModel

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


@dataclasses.dataclass(frozen=True, eq=False)
class ExplicitCodes:
    """A layer's integer codes (int8, its PowerQuant kernel's shape) and the `KernelSetting` they are codes of."""

    setting: KernelSetting
    codes: np.ndarray


@dataclasses.dataclass
class Settings:
    """Every quantizer's setting.

    Attributes:
        kernels: `KernelSetting` by layer name.
        activations: `ActivationSetting` by tensor key.
        rounding: learned rounding by layer name: a boolean array of the
            kernel's shape, True where the code rounds up from
            `floor(m (|W| / s)^a)`; layers absent round to nearest.
        codes: explicit integer codes by layer name (second-order
            rounding), `ExplicitCodes`; they apply only while the layer's
            `KernelSetting` is the one they were found for (`codes_for`),
            and then override `rounding`.
    """

    kernels: dict
    activations: dict
    rounding: dict = dataclasses.field(default_factory=dict)
    codes: dict = dataclasses.field(default_factory=dict)

    def replace(self, kernels=None, activations=None, rounding=None, codes=None):
        """A copy with some settings replaced (dicts of `kernels`, `activations`, `rounding`, `codes`)."""
        return Settings(
            {**self.kernels, **(kernels or {})},
            {**self.activations, **(activations or {})},
            {**self.rounding, **(rounding or {})},
            {**self.codes, **(codes or {})},
        )

    def codes_for(self, name):
        """The layer's explicit codes, or None (none, or found for another kernel setting than its current one)."""
        explicit = self.codes.get(name)
        if explicit is None or explicit.setting != self.kernels[name]:
            return None
        return explicit.codes

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

    Keeps one `WeightErrorModel` per granularity and norm (the weights'
    sorted magnitudes), so a fit is a few scalar searches, and `error` is
    the weight error `sum |W - W_hat|^p` of a `KernelSetting`.

    Args:
        layer_plan: the layer's `LayerPlan`.
    """

    def __init__(self, layer_plan):
        self.kernel = np.asarray(layer_plan.kernel, dtype=np.float32)
        self.channel_ndim = linear_type(layer_plan.layer).channel_ndim
        self._models = {}

    def _model(self, setting, p):
        key = (bool(setting.per_channel), float(p))
        if key not in self._models:
            channel_ndim = self.channel_ndim if setting.per_channel else 0
            self._models[key] = WeightErrorModel(
                self.kernel, setting.bits, channel_ndim, p, max_samples=_MAX_FIT_WEIGHTS
            )
        return self._models[key].at_bits(setting.bits)

    def error(self, setting, p=2.0):
        """`sum |W - W_hat|^p` (on a subsample for large layers at p != 2)."""
        return self._model(setting, p).error(setting.exponent, setting.clip_fraction)

    def fit(self, setting, p=2.0, exponent_bounds=None, clip=True):
        """The setting with its exponent (if `exponent_bounds`) and clip fraction refitted at norm `p`.

        Exponent and clip fraction are fitted alternately (two rounds), each
        by a bounded scalar search; a clip fraction only replaces 1 when it
        lowers the error.
        """
        model = self._model(setting, p)
        exponent, fraction = setting.exponent, setting.clip_fraction
        for _ in range(2 if exponent_bounds is not None and clip else 1):
            if exponent_bounds is not None:
                exponent, _ = minimize_exponent(
                    lambda a, fraction=fraction: model.error(a, fraction), exponent_bounds
                )
            if clip:
                fraction, _ = model.best_clip(exponent, low=MIN_CLIP_FRACTION)
        return dataclasses.replace(setting, exponent=exponent, clip_fraction=fraction)


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
        layer_plan.codes = settings.codes_for(layer_plan.layer.name)
        layer_plan.rounding_up = None if layer_plan.codes is not None else settings.rounding.get(layer_plan.layer.name)
        layer_plan.fit = ExponentFit(setting.exponent, fitter.error(setting), fitter.error(uniform))
    for key, setting in settings.activations.items():
        quantizer = plan.quantizers[key]
        error = activation_models[key].error(setting.clip, setting.exponent)
        quantizer.fit = dataclasses.replace(quantizer.fit, clip=setting.clip, exponent=setting.exponent, error=error)
    return plan

"""`ConversionConfig`: every option of a conversion, validated once, serializable.

`convert`, the `kpq convert` command, the `PowerQuantExport` callback and the
conversion report all take their options from this one class, so an option
is declared, documented and checked here only (plus its command-line flag).

This module imports neither Keras nor TensorFlow.
"""

import dataclasses
import math
import numbers
from typing import Optional

from keras_powerquant.limits import DEFAULT_CALIBRATION_BATCH_SIZE
from keras_powerquant.limits import DEFAULT_REFINE_SAMPLES
from keras_powerquant.limits import ROUNDING_ITERATIONS
from keras_powerquant.quantization.search import DEFAULT_EXPONENT_BOUNDS
from keras_powerquant.quantization.validation import check_bits
from keras_powerquant.quantization.validation import check_integer

METHODS = ("powerquant", "uniform")
SCOPES = ("layer", "network")
# True picks "empirical" with calibration data, "analytic" without.
BIAS_CORRECTION_MODES = (True, False, "analytic", "empirical")
# What `refine=True` runs, in order: second-order rounding ("gptq") rather
# than learned rounding, which takes hours on a CPU for an ImageNet-size
# model (docs/method.md §10, benchmarks/second_order.json).
REFINEMENT_STEPS = ("grid", "granularity", "lapq", "gptq")
KNOWN_STEPS = REFINEMENT_STEPS + ("rounding",)


@dataclasses.dataclass(frozen=True, init=False)
class ConversionConfig:
    """The options of `keras_powerquant.convert`, checked when constructed.

    A config holds how to quantize, not what to calibrate on: the
    calibration data (real, `"synthetic"` or a `SyntheticData`), its labels
    and the progress callback are arguments of `convert`. The same config
    then serves real and synthetic data alike; `config.check_data` says
    whether it can use the data given (refinement needs some).

    `convert(model, 4, 4, "uniform", scope="network")` is
    `convert(model, config=ConversionConfig(4, 4, "uniform", scope="network"))`.
    A config is immutable: `dataclasses.replace(config, wbits=3)` makes a
    (validated) variant. `get_config()` is a JSON-safe dict and
    `ConversionConfig.from_config(d)` rebuilds the config; a conversion
    report's `options` hold the same keys, with the values conversion
    resolved (see `convert`).

    Args:
        wbits: weight bit width, 2 to 8.
        abits: activation bit width, 2 to 8, or None for weight-only
            quantization: weights become codes (BatchNorm folded) and
            activations stay float, with no quantizer in the graph.
        method: "powerquant" (fitted exponents) or "uniform" (`a = 1`
            everywhere: the baseline).
        scope: "layer" (one exponent per layer) or "network" (one weight
            exponent and one activation exponent shared by all layers).
        per_channel: one weight scale per output channel, or per tensor.
        p: the norm of the reconstruction error, `sum |x - x_hat|^p`
            (finite, > 0).
        exponent_bounds: the exponent search interval `(low, high)`,
            `0 < low < high < inf`.
        quantize_first_last: quantize the first and last quantized layers
            at `wbits`/`abits` rather than `first_last_bits`.
        first_last_bits: bit width of the first and last layers otherwise.
        fast_activations: True (default): choose each activation exponent
            among 1, 1/2 and 1/4. Those powers are square roots and
            squares: elementwise ops at inference (one FakeQuant per
            activation at `a = 1`, three to six ops at `1/2`); with bias
            correction it was within noise of the continuous fit or better (ResNet-8 W4/A4 +1.3 to +1.4
            points, p >= 0.085; benchmarks/RESULTS.md). False: fit it anywhere in
            `exponent_bounds`, at the cost of two exp/log pairs per
            activation at inference. Weight exponents are fitted on the
            whole interval either way (their decode costs nothing per call).
        weight_clipping: fit each layer's weight clip fraction `alpha` in
            `[0.05, 1]` jointly with its exponent (docs/method.md §7): the
            scales become `alpha max |W|` per channel, one `alpha` per layer.
        bias_correction: subtract each quantized layer's mean output shift
            from its bias (docs/method.md §7). True: "empirical" with
            real calibration data (measured on its first 64 samples),
            "analytic" without or with synthetic data for a model with
            BatchNorm (from BatchNorm statistics; "empirical" for one
            without); or one of those strings, or False.
        calibration_batch_size: batch size for in-memory calibration arrays
            (an integer >= 1).
        calibration_steps: use at most this many calibration batches (an
            integer >= 1, or None for all).
        refine: loss-aware refinement after the per-layer fit (needs
            calibration data): True runs the recommended steps ("grid",
            "granularity", "lapq", "gptq"), a list runs the steps
            named. "grid" picks `a*` or `a = 1` per layer and activation by
            the network loss (never worse than uniform on it),
            "granularity" per-tensor scales where they cost nothing, "lapq"
            LAPQ's joint Powell search over clips and exponents, "gptq"
            second-order rounding (GPTQ on the layer's own grid, see
            `keras_powerquant.refinement.second_order`), "rounding"
            learned rounding (AdaRound; gradient steps, slow on a CPU).
            See `keras_powerquant.refinement` and docs/method.md §8, §10.
            Stored as the tuple of step names.
        target_size: mixed precision: weight bits per layer (2..8) chosen
            by loss sensitivity per byte so that the converted model's
            weights take at most this many bytes (an int) or this fraction
            of the float model's (a float in (0, 1]). Needs calibration
            data; overrides `wbits` and `first_last_bits` for the layers'
            kernels.
        mean_bits: mixed precision with a budget of this many kernel bits
            per weight on average instead (a number in [2, 8]).
        refine_samples: calibration samples refinement evaluates on (a
            uniform random subsample, seed 0).
        refine_evaluations: None (default) to give the search steps
            ("grid", "granularity", "lapq") a budget of network evaluations
            scaled to the model's cost per evaluation
            (`keras_powerquant.refinement.budget`: every candidate on
            CIFAR-size models, a few dozen evaluations on a ResNet-50), or
            an integer: LAPQ's Powell budget, with every grid and
            granularity candidate tried whatever the model's size.
        rounding_iterations: gradient steps per layer of the "rounding"
            step (learned rounding, AdaRound-style).
        data_free_fallback: without calibration data, fit the activation
            quantizers whose data-free statistics are missing or more than
            this many steps (linear layers and merges) from a BatchNorm on
            a short synthetic run instead (`pipeline.statistics`,
            docs/method.md §4): an integer >= 0, or None (default) for
            data-free statistics alone. The model's inputs keep theirs.

    Raises:
        ValueError: an invalid option, named in the message.
    """

    wbits: int
    abits: Optional[int]
    method: str
    scope: str
    per_channel: bool
    p: float
    exponent_bounds: tuple
    quantize_first_last: bool
    first_last_bits: int
    fast_activations: bool
    weight_clipping: bool
    bias_correction: object
    calibration_batch_size: int
    calibration_steps: Optional[int]
    refine: tuple
    target_size: object
    mean_bits: Optional[float]
    refine_samples: int
    refine_evaluations: Optional[int]
    rounding_iterations: int
    data_free_fallback: Optional[int]

    def __init__(
        self,
        wbits=4,
        abits=4,
        method="powerquant",
        *,
        scope="layer",
        per_channel=True,
        p=2.0,
        exponent_bounds=DEFAULT_EXPONENT_BOUNDS,
        quantize_first_last=False,
        first_last_bits=8,
        fast_activations=True,
        weight_clipping=False,
        bias_correction=True,
        calibration_batch_size=DEFAULT_CALIBRATION_BATCH_SIZE,
        calibration_steps=None,
        refine=False,
        target_size=None,
        mean_bits=None,
        refine_samples=DEFAULT_REFINE_SAMPLES,
        refine_evaluations=None,
        rounding_iterations=ROUNDING_ITERATIONS,
        data_free_fallback=None,
    ):
        # Each value is stored as the plain Python type it is checked to be,
        # so `get_config()` is JSON-safe whatever numpy scalars came in.
        options = {
            "wbits": check_bits(wbits, "wbits"),
            "abits": None if abits is None else check_bits(abits, "abits"),
            "method": _check_choice(method, "method", METHODS),
            "scope": _check_choice(scope, "scope", SCOPES),
            "per_channel": _check_flag(per_channel, "per_channel"),
            "p": _check_norm(p),
            "exponent_bounds": _check_bounds(exponent_bounds),
            "quantize_first_last": _check_flag(quantize_first_last, "quantize_first_last"),
            "first_last_bits": check_bits(first_last_bits, "first_last_bits"),
            "fast_activations": _check_flag(fast_activations, "fast_activations"),
            "weight_clipping": _check_flag(weight_clipping, "weight_clipping"),
            "bias_correction": _check_bias_correction(bias_correction),
            "calibration_batch_size": check_integer(calibration_batch_size, "calibration_batch_size", 1),
            "calibration_steps": None
            if calibration_steps is None
            else check_integer(calibration_steps, "calibration_steps", 1),
            "refine": _check_refine(refine),
            "target_size": _check_target_size(target_size),
            "mean_bits": _check_mean_bits(mean_bits),
            "refine_samples": check_integer(refine_samples, "refine_samples", 1),
            "refine_evaluations": None
            if refine_evaluations is None
            else check_integer(refine_evaluations, "refine_evaluations", 0),
            "rounding_iterations": check_integer(rounding_iterations, "rounding_iterations", 0),
            "data_free_fallback": None
            if data_free_fallback is None
            else check_integer(data_free_fallback, "data_free_fallback", 0),
        }
        if target_size is not None and mean_bits is not None:
            raise ValueError("Give `target_size` or `mean_bits`, not both.")
        for name, value in options.items():
            object.__setattr__(self, name, value)

    @property
    def refining(self):
        """Whether conversion runs refinement (steps or a mixed-precision budget), which needs calibration data."""
        return bool(self.refine) or self.target_size is not None or self.mean_bits is not None

    def bias_correction_method(self, calibrated, synthetic_with_batch_norm=False):
        """The bias correction conversion runs: "analytic", "empirical" or None.

        `True` measures the shifts on real calibration data and computes
        them from BatchNorm statistics otherwise, synthetic data included
        where the model has BatchNorm: synthetic inputs match BatchNorm's
        statistics per batch, not real data's mean at each position, and
        shifts measured on them cost EfficientNet-Lite2 W4/A8 8 points of
        top-1 against the analytic ones (docs/method.md §7).

        Args:
            calibrated: whether calibration data (real or synthetic) is given.
            synthetic_with_batch_norm: whether that data is synthetic and
                the model has BatchNorm statistics to compute shifts from.
        """
        if self.bias_correction is True:
            return "empirical" if calibrated and not synthetic_with_batch_norm else "analytic"
        return self.bias_correction or None

    def check_data(self, calibrated, labelled=False):
        """Raises ValueError for options the data given to `convert` cannot serve.

        Args:
            calibrated: whether calibration data (real or synthetic) is given.
            labelled: whether calibration labels are given.
        """
        if self.data_free_fallback is not None and calibrated:
            raise ValueError(
                "`data_free_fallback` refits data-free statistics; with calibration data every quantizer is "
                "fitted on it: pass one or the other."
            )
        if self.bias_correction == "empirical" and not calibrated:
            raise ValueError("`bias_correction='empirical'` needs calibration data; none was given.")
        if self.refining and not calibrated:
            what = "refine" if self.refine else ("target_size" if self.target_size is not None else "mean_bits")
            raise ValueError(
                f"`{what}` measures the network loss on calibration data: pass `calibration_data` "
                "(model inputs, a few hundred samples)."
            )
        if labelled and not self.refining:
            raise ValueError("`calibration_labels` are only used by refinement: pass `refine` as well.")

    def get_config(self):
        """The options as a JSON-safe dict (tuples become lists); `from_config` inverts it."""
        return {
            field.name: list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)
            for value in (getattr(self, field.name),)
        }

    @classmethod
    def from_config(cls, config):
        """A `ConversionConfig` from a dict of options, such as `get_config()` returns.

        Raises:
            ValueError: unknown keys (typos are not silently ignored) or
                invalid values.
        """
        unknown = _unknown_options(config)
        if unknown:
            raise ValueError(unknown)
        return cls(**config)


def resolve_config(config, args=(), options=None):
    """The `ConversionConfig` of a call taking either `config=` or the options themselves.

    Args:
        config: a `ConversionConfig`, or None.
        args, options: the positional (`wbits`, `abits`, `method`) and
            keyword options of `ConversionConfig`, when `config` is None.

    Raises:
        TypeError: unknown options, or `config` together with options.
        ValueError: invalid options.
    """
    options = options or {}
    if config is None:
        unknown = _unknown_options(options)
        if unknown:
            raise TypeError(unknown)
        return ConversionConfig(*args, **options)
    if not isinstance(config, ConversionConfig):
        raise TypeError(f"`config` must be a ConversionConfig; got {type(config).__name__}.")
    if args or options:
        given = [repr(arg) for arg in args] + sorted(options)
        raise TypeError(f"Pass the options in `config` or as arguments, not both; got `config` and {given}.")
    return config


def _unknown_options(options):
    names = [field.name for field in dataclasses.fields(ConversionConfig)]
    unknown = sorted(set(options) - set(names))
    return f"Unknown conversion option(s) {unknown}; the options are {names}." if unknown else None


def _check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")
    return value


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")
    return value


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_norm(p):
    # An infinite norm keeps only the largest error: the fits then ignore almost every value.
    if not _is_number(p) or not 0 < p < math.inf:
        raise ValueError(f"`p` must be a finite number > 0; got {p!r}.")
    return float(p)


def _check_bounds(bounds):
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"`exponent_bounds` must be a pair (low, high); got {bounds!r}.") from None
    if not 0 < low < high < math.inf:
        raise ValueError(f"`exponent_bounds` must satisfy 0 < low < high < inf; got {bounds}.")
    return (low, high)


def _check_bias_correction(value):
    if not (isinstance(value, bool) or (isinstance(value, str) and value in BIAS_CORRECTION_MODES)):
        raise ValueError(f"`bias_correction` must be True, False, 'analytic' or 'empirical'; got {value!r}.")
    return value


def _check_refine(refine):
    """The step names `refine` asks for: `True` the recommended ones, a list (or one name) those named."""
    if refine is None or refine is False:
        return ()
    if refine is True:
        return REFINEMENT_STEPS
    if isinstance(refine, str):
        refine = [refine]
    try:
        names = [name if isinstance(name, str) else None for name in refine]
    except TypeError:
        names = [None]
    if None in names:
        raise ValueError(
            f"`refine` must be True, False or a list of step names {sorted(KNOWN_STEPS)}; got {refine!r}."
        )
    unknown = [name for name in names if name not in KNOWN_STEPS]
    if unknown:
        raise ValueError(f"Unknown refinement step(s) {unknown}; the steps are {sorted(KNOWN_STEPS)}.")
    return tuple(dict.fromkeys(names))


def _check_target_size(target_size):
    if target_size is None:
        return None
    if not _is_number(target_size) or not target_size > 0:
        raise ValueError(
            "`target_size` must be a positive number of bytes or a fraction of the float size; "
            f"got {target_size!r}."
        )
    if isinstance(target_size, numbers.Integral):
        return int(target_size)
    target_size = float(target_size)
    if not (target_size <= 1 or target_size.is_integer()):
        raise ValueError(f"`target_size` as a fraction of the float size must be in (0, 1]; got {target_size}.")
    return target_size


def _check_mean_bits(mean_bits):
    if mean_bits is None:
        return None
    if not _is_number(mean_bits) or not 2 <= mean_bits <= 8:
        raise ValueError(f"`mean_bits` must be a number in [2, 8]; got {mean_bits!r}.")
    return float(mean_bits)

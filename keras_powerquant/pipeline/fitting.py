"""Stage 4, fitting: each layer's weight exponent and each activation quantizer's clip and exponent.

Fills the analysed plan's `fit`s: the plan is what the later stages build.
"""

from keras_powerquant.converter import nested
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.quantization.search import FAST_ACTIVATION_EXPONENTS
from keras_powerquant.quantization.search import fit_activation_models
from keras_powerquant.quantization.search import fit_shared_weight_exponent
from keras_powerquant.quantization.search import fit_weight_model
from keras_powerquant.quantization.search import WeightErrorModel


def fit_weights(request, analysis):
    """Fits every planned layer's weight quantizer (exponent, clip) to its kernel."""
    config = request.config
    _fit_weights(
        analysis.plan, config.method, config.scope, config.per_channel, config.p, config.exponent_bounds,
        config.weight_clipping, request.reporter("weights"),
    )


def fit_activations(request, analysis, statistics):
    """Fits every activation quantizer, and the nested layers', to its statistics."""
    config, plan = request.config, analysis.plan
    _fit_activations(
        plan, statistics.samples, statistics.rules, config.method, config.scope, config.p,
        config.exponent_bounds, config.fast_activations, request.reporter("activations"),
    )
    nested.fit(
        analysis.nested_plan, statistics.nested_samplers, config.method, config.scope, config.per_channel,
        config.p, config.exponent_bounds, config.weight_clipping, config.fast_activations,
        next((layer_plan.fit.exponent for layer_plan in plan.layers.values()), None),
    )


def _fit_weights(plan, method, scope, per_channel, p, bounds, clip, step):
    layer_plans = list(plan.layers.values())
    models = []
    for i, layer_plan in enumerate(layer_plans):
        channel_ndim = linear_type(layer_plan.layer).channel_ndim if per_channel else 0
        models.append(WeightErrorModel(layer_plan.kernel, layer_plan.weight_bits, channel_ndim, p))
        step(i + 1, len(layer_plans))
    if method == "uniform":
        fits = [fit_weight_model(m, exponent=1.0, clip=clip) for m in models]
    elif scope == "network":
        fits = fit_shared_weight_exponent(models, bounds, clip=clip)
    else:
        fits = [fit_weight_model(m, bounds, clip=clip) for m in models]
    for layer_plan, fit in zip(layer_plans, fits):
        layer_plan.fit = fit
        layer_plan.clip_fraction = fit.clip


def _fit_activations(plan, samples, rules, method, scope, p, bounds, fast, step):
    fittable = []
    for quantizer in plan.quantizers.values():
        values = samples.get(quantizer.key)
        quantizer.rule = rules[quantizer.key]
        if values is None:
            quantizer.reason = f"no statistics ({quantizer.rule}); pass calibration data"
            continue
        # Unsigned only where the graph guarantees values >= 0: calibration
        # samples that happen to be >= 0 say nothing of the inputs served later.
        quantizer.signed = not (
            quantizer.nonnegative or (quantizer.kind != "input" and quantizer.spec.nonnegative)
        )
        fittable.append((quantizer, ActivationErrorModel(values, quantizer.bits, quantizer.signed, p)))
    exponent = 1.0 if method == "uniform" else None
    fits = fit_activation_models(
        [model for _, model in fittable],
        bounds,
        exponent=exponent,
        shared=scope == "network",
        choices=FAST_ACTIVATION_EXPONENTS if fast else None,
        progress=step,
    )
    for (quantizer, _), fit in zip(fittable, fits):
        quantizer.fit = fit

"""`convert`: a trained Keras model in, a PowerQuant Keras model and a report out."""

import dataclasses
import time

import keras
import numpy as np

from keras_powerquant import refinement
from keras_powerquant.converter.bias_correction import analytic_corrections
from keras_powerquant.converter.bias_correction import apply_corrections
from keras_powerquant.converter.bias_correction import check_bias_correction
from keras_powerquant.converter.bias_correction import empirical_corrections
from keras_powerquant.converter.bias_correction import resolve_bias_correction
from keras_powerquant.converter.builder import ModelBuilder
from keras_powerquant.converter.calibration import calibration_batches
from keras_powerquant.converter.calibration import DEFAULT_BATCH_SIZE
from keras_powerquant.converter.calibration import record_samples
from keras_powerquant.converter.folding import plan_folds
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.plan import plan_conversion
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.statistics import propagate_statistics
from keras_powerquant.errors import InvalidModelError
from keras_powerquant.loading import resolve_model
from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.quantization.search import DEFAULT_EXPONENT_BOUNDS
from keras_powerquant.quantization.search import FAST_ACTIVATION_EXPONENTS
from keras_powerquant.quantization.search import fit_activation_models
from keras_powerquant.quantization.search import fit_shared_weight_exponent
from keras_powerquant.quantization.search import fit_weight_model
from keras_powerquant.quantization.search import WeightErrorModel
from keras_powerquant.quantization.validation import check_bits
from keras_powerquant.report import ActivationReport
from keras_powerquant.report import ConversionReport
from keras_powerquant.report import LayerReport
from keras_powerquant.synthesis import SyntheticData

METHODS = ("powerquant", "uniform")
SCOPES = ("layer", "network")
# Calibration samples kept in memory for the empirical bias correction's
# layer-by-layer passes.
BIAS_CORRECTION_SAMPLES = 256


def _check_weights(model):
    """Raises InvalidModelError, naming the layer, for weights no model can compute with."""
    layers = model._flatten_layers(include_self=False, recursive=True)
    # Leaf layers first: a nested model's weights include its layers' weights,
    # and the message must name the layer that holds the bad weight.
    for layer in sorted(layers, key=lambda layer: isinstance(layer, keras.Model)):
        for weight in layer.weights:
            if not np.all(np.isfinite(keras.ops.convert_to_numpy(weight))):
                raise InvalidModelError(
                    f"Layer '{layer.name}' has NaN or Inf values in weight '{weight.name}': "
                    "the model cannot be quantized. Check the training run that produced it."
                )
        if isinstance(layer, keras.layers.BatchNormalization):
            variance = keras.ops.convert_to_numpy(layer.moving_variance)
            bad = variance + layer.epsilon <= 0
            if np.any(bad):
                raise InvalidModelError(
                    f"Layer '{layer.name}' has a negative moving variance in {int(np.sum(bad))} of "
                    f"{bad.size} channels (smallest {float(variance.min()):g}, epsilon {layer.epsilon:g}): "
                    "its outputs are NaN even in the float model. Check the training run that produced it."
                )


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def check_options(
    wbits,
    abits,
    method="powerquant",
    scope="layer",
    p=2.0,
    exponent_bounds=DEFAULT_EXPONENT_BOUNDS,
    first_last_bits=8,
    calibration_batch_size=DEFAULT_BATCH_SIZE,
    calibration_steps=None,
    weight_clipping=False,
    bias_correction=False,
):
    """Raises ValueError for `convert` options it would reject, before any work."""
    check_bits(wbits, "wbits")
    if abits is not None:
        check_bits(abits, "abits")
    check_bits(first_last_bits, "first_last_bits")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES}; got {scope!r}.")
    # An infinite norm keeps only the largest error: the fits then ignore almost every value.
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0 < p < np.inf:
        raise ValueError(f"`p` must be a finite number > 0; got {p!r}.")
    try:
        low, high = (float(b) for b in exponent_bounds)
    except (TypeError, ValueError):
        raise ValueError(f"`exponent_bounds` must be a pair (low, high); got {exponent_bounds!r}.") from None
    if not 0 < low < high < np.inf:
        raise ValueError(f"`exponent_bounds` must satisfy 0 < low < high < inf; got {exponent_bounds}.")
    _check_count(calibration_batch_size, "calibration_batch_size")
    if calibration_steps is not None:
        _check_count(calibration_steps, "calibration_steps")
    if not isinstance(weight_clipping, bool):
        raise ValueError(f"`weight_clipping` must be True or False; got {weight_clipping!r}.")
    check_bias_correction(bias_correction)


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


def _data_free_samples(plan, stats):
    samples, rules = {}, {}
    for key in plan.quantizers:
        tensor_stats = stats[key]
        rules[key] = tensor_stats.rule
        if tensor_stats.sampler is not None:
            samples[key] = tensor_stats.sampler()
    return samples, rules


def convert(
    model,
    wbits=4,
    abits=4,
    method="powerquant",
    *,
    calibration_data=None,
    scope="layer",
    per_channel=True,
    p=2.0,
    exponent_bounds=DEFAULT_EXPONENT_BOUNDS,
    quantize_first_last=False,
    first_last_bits=8,
    fast_activations=True,
    weight_clipping=False,
    bias_correction=True,
    calibration_batch_size=DEFAULT_BATCH_SIZE,
    calibration_steps=None,
    refine=False,
    calibration_labels=None,
    target_size=None,
    mean_bits=None,
    refine_samples=refinement.DEFAULT_REFINE_SAMPLES,
    refine_evaluations=refinement.DEFAULT_MAX_EVALUATIONS,
    rounding_iterations=refinement.ROUNDING_ITERATIONS,
    progress=None,
):
    """Converts a trained Keras model to PowerQuant.

    Folds BatchNorm into the preceding layers, fits each layer's weight
    exponent by minimising its reconstruction error, fits each activation
    quantizer's clip and exponent (data-free from BatchNorm statistics, or
    on calibration data), and rebuilds the model with `PowerQuantConv2D`,
    `PowerQuantDepthwiseConv2D`, `PowerQuantDense` and
    `PowerQuantActivation` layers. Layers it does not quantize stay float and
    are reported. The input model is not modified.

    Args:
        model: a Functional or Sequential `keras.Model`, or the path of a
            `.keras` or `.h5` file.
        wbits: weight bit width, 2 to 8.
        abits: activation bit width, 2 to 8, or None for weight-only
            quantization: weights become codes (BatchNorm folded) and
            activations stay float, with no quantizer in the graph.
        method: "powerquant" (fitted exponents) or "uniform" (`a = 1`
            everywhere: the baseline).
        calibration_data: optional model inputs to fit activation
            quantizers on instead of BatchNorm statistics, in the forms
            `Model.fit`/`predict` take: an array, `[x]`, a list/tuple or
            dict of arrays, `(x, y)` or `(x, y, sample_weight)` (`x` is
            used), a `tf.data.Dataset`, or an iterable of such batches.
            Lists follow `model.inputs` order (Keras sorts dict inputs by
            key); dicts are matched by input name. `"synthetic"`
            generates inputs from the model itself (`synthesize_inputs`
            with its defaults); a `SyntheticData(num_samples=...,
            input_range=...)` sets its options.
        scope: "layer" (one exponent per layer) or "network" (one weight
            exponent and one activation exponent shared by all layers).
        per_channel: one weight scale per output channel, or per tensor.
        p: the norm of the reconstruction error, `sum |x - x_hat|^p`
            (finite, > 0).
        exponent_bounds: the exponent search interval.
        quantize_first_last: quantize the first and last quantized layers
            at `wbits`/`abits` rather than `first_last_bits`.
        first_last_bits: bit width of the first and last layers otherwise.
        fast_activations: True (default): choose each activation exponent
            among 1, 1/2 and 1/4. Those powers are square roots and
            squares, so quantized activations cost about as much as uniform
            ones at inference; at 4-bit activations this gave up 0.1-1.6
            points of top-1 against the continuous fit (not significant at
            p < 0.05; benchmarks/RESULTS.md). False: fit it anywhere in
            `exponent_bounds`, at the cost of two exp/log pairs per
            activation at inference. Weight exponents are fitted on the
            whole interval either way (their decode costs nothing per call).
        weight_clipping: fit each layer's weight clip fraction `alpha` in
            `[0.05, 1]` jointly with its exponent (docs/method.md §7): the scales
            become `alpha max |W|` per channel, one `alpha` per layer.
        bias_correction: subtract each quantized layer's mean output shift
            from its bias (docs/method.md §7). True: "empirical" with calibration
            data, real or synthetic (measured layer by layer on up to 256 of
            its samples), "analytic" without (from BatchNorm statistics); or
            one of those strings, or False.
        calibration_batch_size: batch size for in-memory calibration arrays
            (an integer >= 1).
        calibration_steps: use at most this many calibration batches (an
            integer >= 1, or None for all).
        refine: loss-aware refinement after the per-layer fit (needs
            `calibration_data`): True runs the recommended steps
            ("grid", "granularity", "lapq", "rounding"), a list runs the
            steps named. "grid" picks `a*` or `a = 1` per layer and
            activation by the network loss (never worse than uniform on
            it), "granularity" per-tensor scales where they cost nothing,
            "lapq" LAPQ's joint Powell search over clips and exponents,
            "rounding" learned rounding (AdaRound). See
            `keras_powerquant.refinement` and docs/method.md §8.
        calibration_labels: integer class labels of the calibration
            samples, in their order: refinement then minimises the
            cross-entropy instead of the KL divergence to the float model.
        target_size: mixed precision: weight bits per layer (2..8) chosen
            by loss sensitivity per byte so that the converted model's
            weights take at most this many bytes (an int) or this fraction
            of the float model's (a float in (0, 1]). Needs
            `calibration_data`; overrides `wbits` and `first_last_bits`
            for the layers' kernels.
        mean_bits: mixed precision with a budget of this many kernel bits
            per weight on average instead.
        refine_samples: calibration samples refinement evaluates on (a
            uniform random subsample, seed 0).
        refine_evaluations: evaluation budget of LAPQ's Powell search.
        rounding_iterations: gradient steps per layer of the "rounding"
            step (learned rounding, AdaRound-style).
        progress: optional callback `progress(stage, done, total)`.

    Returns:
        `(quantized_model, report)`: the converted `keras.Model` and a
        `ConversionReport`.

    Raises:
        ModelLoadError: `model` is a path that cannot be loaded.
        UnsupportedModelError: a subclassed or unbuilt model.
        InvalidModelError: weights with NaN or Inf.
        CalibrationDataError: calibration data that does not fit the model.
        UnsupportedModelError: `"synthetic"` for a model with neither
            BatchNorm layers nor a classifier output.
        ValueError: invalid options.
    """
    check_options(
        wbits, abits, method, scope, p, exponent_bounds, first_last_bits, calibration_batch_size, calibration_steps,
        weight_clipping, bias_correction,
    )
    if isinstance(calibration_data, str):
        if calibration_data != "synthetic":
            raise ValueError(f'`calibration_data` as a string must be "synthetic"; got {calibration_data!r}.')
        calibration_data = SyntheticData()
    correction = resolve_bias_correction(bias_correction, calibration_data is not None)
    steps = refinement.check_refine_options(
        refine, calibration_data, calibration_labels, target_size, mean_bits, refine_samples
    )
    refining = bool(steps) or target_size is not None or mean_bits is not None
    seconds = {}
    started = time.perf_counter()

    def report_progress(stage):
        return lambda done, total: progress(stage, done, total) if progress else None

    model, notes = resolve_model(model)
    _check_weights(model)
    graph = FlatGraph(model)
    folds, unfolded = plan_folds(graph)
    plan = plan_conversion(graph, folds, wbits, abits, quantize_first_last, first_last_bits)
    if refining:
        budget = refinement.size_budget(plan, refinement.weight_bytes(model), target_size, mean_bits, per_channel)
        reservoir = refinement.InputReservoir(refine_samples)
    seconds["analysis"] = time.perf_counter() - started

    synthetic = calibration_data if isinstance(calibration_data, SyntheticData) else None
    if synthetic is not None:
        mark = time.perf_counter()
        synthesis = synthetic.generate(model, progress=progress)
        inputs = synthesis.inputs
        calibration_data, notes = (inputs[0] if len(inputs) == 1 else inputs), notes + synthesis.notes
        seconds["synthesis"] = time.perf_counter() - mark

    mark = time.perf_counter()
    stats = propagate_statistics(graph, folds) if calibration_data is None or correction == "analytic" else None
    kept_batches = []
    if calibration_data is None:
        samples, rules = _data_free_samples(plan, stats)
    else:
        batches = calibration_batches(
            calibration_data, graph.input_tensors, calibration_batch_size, calibration_steps
        )
        if correction == "empirical":
            batches = _keeping(batches, kept_batches, BIAS_CORRECTION_SAMPLES)
        if refining:
            batches = reservoir.watch(batches)
        calibrate = report_progress("calibration")
        samples = record_samples(
            graph, batches, list(plan.quantizers), progress=lambda done: calibrate(done, calibration_steps)
        )
        rules = {key: "calibration" for key in plan.quantizers}
    seconds["statistics"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _fit_weights(
        plan, method, scope, per_channel, p, exponent_bounds, weight_clipping, report_progress("weights")
    )
    seconds["weights"] = time.perf_counter() - mark
    mark = time.perf_counter()
    _fit_activations(
        plan, samples, rules, method, scope, p, exponent_bounds, fast_activations, report_progress("activations")
    )
    seconds["activations"] = time.perf_counter() - mark

    refinement_reports = []
    if refining:
        mark = time.perf_counter()
        labels = None if calibration_labels is None else refinement.subsample_labels(calibration_labels, reservoir)
        plan, refinement_reports = refinement.refine_plan(
            graph, folds, plan, steps=steps, inputs=reservoir.inputs, labels=labels, samples=samples,
            method=method, per_channel=per_channel, exponent_bounds=exponent_bounds,
            fast_activations=fast_activations, budget=budget, max_evaluations=refine_evaluations,
            rounding_iterations=rounding_iterations, progress=progress,
        )
        seconds["refinement"] = time.perf_counter() - mark

    mark = time.perf_counter()
    if correction is not None:
        _give_every_layer_a_bias(plan)
    builder = ModelBuilder(graph, folds, plan, per_channel)
    quantized_model = builder.build()
    seconds["build"] = time.perf_counter() - mark

    mark = time.perf_counter()
    corrections = {}
    if correction == "analytic":
        corrections = analytic_corrections(plan, stats, builder.quantized_layers)
        apply_corrections(builder.quantized_layers, corrections)
    elif correction == "empirical":
        corrections = empirical_corrections(
            graph, plan, quantized_model, builder.quantized_layers, kept_batches,
            progress=report_progress("bias correction"),
        )
    seconds["bias_correction"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started

    options = {
        "method": method,
        "wbits": wbits,
        "abits": abits,
        "scope": scope,
        "per_channel": per_channel,
        "p": p,
        "exponent_bounds": list(exponent_bounds),
        "quantize_first_last": quantize_first_last,
        "first_last_bits": first_last_bits,
        "fast_activations": fast_activations,
        "weight_clipping": weight_clipping,
        "bias_correction": correction,
        "calibrated": calibration_data is not None,
    }
    if refining:
        options.update(refine=list(steps), target_size=target_size, mean_bits=mean_bits,
                       refine_samples=refine_samples, labelled=calibration_labels is not None)
    if synthetic is not None:
        options["synthetic"] = dataclasses.asdict(synthetic)
    notes = notes + [f"layer '{name}' reused as is (its config does not round-trip)" for name in builder.reused]
    report = _report(graph, plan, folds, unfolded, options, notes, seconds, corrections)
    report.refinement = [dataclasses.asdict(step) for step in refinement_reports]
    return quantized_model, report


def _keeping(batches, kept, max_samples):
    """Yields `batches`, appending them to `kept` until it holds `max_samples` samples."""
    held = 0
    for batch in batches:
        if held < max_samples:
            kept.append(batch)
            held += len(batch[0])
        yield batch


def _give_every_layer_a_bias(plan):
    """A corrected layer needs a bias to hold the correction: zeros where it had none."""
    for layer_plan in plan.layers.values():
        if layer_plan.bias is None:
            channels = linear_type(layer_plan.layer).output_channels(layer_plan.kernel.shape)
            layer_plan.bias = np.zeros(channels, dtype=np.float32)


def _describe(correction):
    if correction is None:
        return None
    return correction.method if correction.reason is None else f"none: {correction.reason}"


def inspect_model(model, wbits=4, abits=4, quantize_first_last=False, first_last_bits=8):
    """Dry run of `convert`: what would be folded, quantized and kept float, and why.

    Nothing is fitted: layer exponents and activation clips are None in the
    returned `ConversionReport`, and activation statistics rules say where
    data-free statistics are available.

    Args:
        model: a Functional or Sequential `keras.Model`, or a model file path.
        wbits, abits, quantize_first_last, first_last_bits: as in `convert`.
    """
    check_options(wbits, abits, first_last_bits=first_last_bits)
    model, notes = resolve_model(model)
    graph = FlatGraph(model)
    folds, unfolded = plan_folds(graph)
    plan = plan_conversion(graph, folds, wbits, abits, quantize_first_last, first_last_bits)
    stats = propagate_statistics(graph, folds)
    for quantizer in plan.quantizers.values():
        quantizer.rule = stats[quantizer.key].rule
        if stats[quantizer.key].sampler is None:
            quantizer.reason = "no data-free statistics; needs calibration data"
    options = {
        "method": "inspect",
        "wbits": wbits,
        "abits": abits,
        "quantize_first_last": quantize_first_last,
        "fast_activations": True,  # what `convert` does by default
    }
    return _report(graph, plan, folds, unfolded, options, notes, {})


def fold_batch_norms(model):
    """The float model with every foldable BatchNorm folded into its linear layer.

    Args:
        model: a Functional or Sequential `keras.Model`, or a model file path.

    Returns:
        `(folded_model, report)`: the folded `keras.Model` and a
        `ConversionReport` listing folded and kept BatchNorms.
    """
    model, notes = resolve_model(model)
    _check_weights(model)
    graph = FlatGraph(model)
    folds, unfolded = plan_folds(graph)
    folded = ModelBuilder(graph, folds).build()
    report = ConversionReport(model.name, {"method": "fold"}, notes=notes)
    report.folded_batch_norms = [{"batch_norm": f.batch_norm.name, "into": f.linear.name} for f in folds.values()]
    report.unfolded_batch_norms = [{"batch_norm": bn.name, "reason": why} for bn, why in unfolded]
    return folded, report


def _report(graph, plan, folds, unfolded, options, notes, seconds, corrections=None):
    report = ConversionReport(graph.model.name, options, notes=notes, seconds=seconds)
    report.folded_batch_norms = [
        {"batch_norm": f.batch_norm.name, "into": f.linear.name} for f in folds.values()
    ]
    report.unfolded_batch_norms = [{"batch_norm": bn.name, "reason": why} for bn, why in unfolded]
    float_reasons = {id(layer): reason for layer, reason in plan.float_layers}
    for layer in graph.layers():
        layer_plan = plan.layers.get(id(layer))
        if layer_plan is not None:
            quantizer = layer_plan.input_quantizer
            correction = (corrections or {}).get(id(layer))
            input_quantized = quantizer is not None and quantizer.reason is None
            report.layers.append(
                LayerReport(
                    name=layer.name,
                    class_name=type(layer).__name__,
                    status="quantized",
                    params=int(layer_plan.kernel.size),
                    weight_bits=layer_plan.weight_bits,
                    position=layer_plan.position,
                    exponent=layer_plan.fit.exponent if layer_plan.fit else None,
                    error=layer_plan.fit.error if layer_plan.fit else None,
                    uniform_error=layer_plan.fit.uniform_error if layer_plan.fit else None,
                    weight_clip=layer_plan.clip_fraction if layer_plan.fit else None,
                    bias_correction=_describe(correction),
                    bias_shift=correction.norm if correction else None,
                    input_quantizer=quantizer.name if input_quantized else None,
                    input_bits=quantizer.bits if input_quantized else None,
                    folded_batch_norm=layer_plan.fold.batch_norm.name if layer_plan.fold else None,
                    clip_fraction=layer_plan.clip_fraction,
                    per_channel=layer_plan.per_channel,
                )
            )
        elif id(layer) in float_reasons:
            report.layers.append(
                LayerReport(
                    name=layer.name,
                    class_name=type(layer).__name__,
                    status="float",
                    reason=float_reasons[id(layer)],
                    params=int(sum(np.prod(w.shape) for w in layer.weights)),
                )
            )
    for quantizer in plan.quantizers.values():
        fit = quantizer.fit
        report.activations.append(
            ActivationReport(
                name=quantizer.name,
                kind=quantizer.kind,
                status="float" if quantizer.reason else "quantized",
                reason=quantizer.reason,
                activation=quantizer.spec.name,
                source=quantizer.source,
                consumers=list(quantizer.consumers),
                bits=quantizer.bits,
                signed=quantizer.signed,
                clip=fit.clip if fit else None,
                exponent=fit.exponent if fit else None,
                error=fit.error if fit else None,
                uniform_clip=fit.uniform_clip if fit else None,
                uniform_error=fit.uniform_error if fit else None,
                rule=quantizer.rule,
            )
        )
    return report

"""`convert`: a trained Keras model in, a PowerQuant Keras model and a report out."""

import dataclasses
import time

import keras
import numpy as np

from keras_powerquant import keras_internals
from keras_powerquant import refinement

# The module, not its names: synthesis imports the converter's graph, so
# importing keras_powerquant.synthesis first reaches here half-initialized.
from keras_powerquant import synthesis
from keras_powerquant.config import ConversionConfig
from keras_powerquant.config import resolve_config
from keras_powerquant.converter import nested
from keras_powerquant.converter.bias_correction import analytic_corrections
from keras_powerquant.converter.bias_correction import apply_corrections
from keras_powerquant.converter.bias_correction import correction_inputs
from keras_powerquant.converter.bias_correction import empirical_corrections
from keras_powerquant.converter.bias_correction import refined_corrections
from keras_powerquant.converter.builder import ModelBuilder
from keras_powerquant.converter.calibration import calibration_batches
from keras_powerquant.converter.calibration import ChannelMeans
from keras_powerquant.converter.calibration import count_batches
from keras_powerquant.converter.calibration import record_samples
from keras_powerquant.converter.folding import fold_records
from keras_powerquant.converter.folding import plan_folds
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.plan import plan_conversion
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.statistics import propagate_statistics
from keras_powerquant.errors import InvalidModelError
from keras_powerquant.loading import resolve_model
from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.quantization.search import FAST_ACTIVATION_EXPONENTS
from keras_powerquant.quantization.search import fit_activation_models
from keras_powerquant.quantization.search import fit_shared_weight_exponent
from keras_powerquant.quantization.search import fit_weight_model
from keras_powerquant.quantization.search import WeightErrorModel
from keras_powerquant.report import ActivationReport
from keras_powerquant.report import ConversionReport
from keras_powerquant.report import LayerReport

# Calibration samples kept in memory for the empirical bias correction's
# layer-by-layer passes.
BIAS_CORRECTION_SAMPLES = 256


def _check_weights(model):
    """Raises InvalidModelError, naming the layer, for weights no model can compute with."""
    layers = keras_internals.all_layers(model)
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


def check_inputs(config, calibration_data, calibration_labels=None):
    """Raises ValueError for data `convert` cannot use with `config`, before any work."""
    if isinstance(calibration_data, str) and calibration_data != "synthetic":
        raise ValueError(f'`calibration_data` as a string must be "synthetic"; got {calibration_data!r}.')
    config.check_data(calibration_data is not None, calibration_labels is not None)
    if calibration_labels is not None:
        refinement.check_calibration_labels(calibration_labels, calibration_data)


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
            samples[key] = tensor_stats.sampler(plan.quantizers[key].bits)
    return samples, rules


def convert(
    model,
    *args,
    config=None,
    calibration_data=None,
    calibration_labels=None,
    progress=None,
    **options,
):
    """Converts a trained Keras model to PowerQuant.

    Folds BatchNorm into the linear layers next to it, fits each layer's
    weight exponent by minimising its reconstruction error, fits each
    activation quantizer's clip and exponent (data-free from BatchNorm
    statistics, or on calibration data), and rebuilds the model with the
    PowerQuant layers of `converter.registry` (`PowerQuantConv1D/2D/3D`,
    `PowerQuantDepthwiseConv2D`, `PowerQuantDense`) and
    `PowerQuantActivation` layers. Kernel layers inside layers it cannot
    rewrite (a MultiHeadAttention's projections, a custom layer's Dense) are
    replaced in place, the outer `call` unchanged (`converter.nested`).
    Layers it does not quantize stay float and are reported. The input model
    is not modified.

    `convert(model, 4, 4, "uniform", scope="network")` and
    `convert(model, config=ConversionConfig(4, 4, "uniform", scope="network"))`
    are the same conversion.

    Args:
        model: a Functional or Sequential `keras.Model`, or the path of a
            `.keras` or `.h5` file.
        *args, **options: the options, as the arguments of
            `ConversionConfig`: `wbits` (default 4), `abits` (4; None for
            weight-only), `method` ("powerquant" or "uniform"), then keyword
            options (`scope`, `per_channel`, `bias_correction`, `refine`,
            `target_size`, ...; see `ConversionConfig`).
        config: a `ConversionConfig`, instead of `*args` and `**options`.
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
        calibration_labels: integer class labels of the calibration
            samples, in their order: refinement then minimises the
            cross-entropy instead of the KL divergence to the float model.
        progress: optional callback `progress(stage, done, total)`.

    Returns:
        `(quantized_model, report)`: the converted `keras.Model` and a
        `ConversionReport`, whose `options` are `config.get_config()` with
        the values conversion resolved (`bias_correction`: the method used,
        or False) and `calibrated`, `labelled` (and `synthetic`, the
        `SyntheticData` options, when used).

    Raises:
        ModelLoadError: `model` is a path that cannot be loaded.
        UnsupportedModelError: a subclassed or unbuilt model.
        InvalidModelError: weights with NaN or Inf.
        CalibrationDataError: calibration data that does not fit the model.
        UnsupportedModelError: `"synthetic"` for a model with neither
            BatchNorm layers nor a classifier output.
        ValueError: invalid options, or options the data cannot serve
            (refinement without calibration data...).
        TypeError: an unknown option, or `config` with other options.
    """
    config = resolve_config(config, args, options)
    check_inputs(config, calibration_data, calibration_labels)
    if isinstance(calibration_data, str):
        calibration_data = synthesis.SyntheticData()
    correction = config.bias_correction_method(calibration_data is not None)
    seconds = {}
    started = time.perf_counter()

    def report_progress(stage):
        return lambda done, total: progress(stage, done, total) if progress else None

    model, notes = resolve_model(model)
    _check_weights(model)
    graph = FlatGraph(model)
    folds, unfolded = plan_folds(graph)
    plan = plan_conversion(
        graph, folds, config.wbits, config.abits, config.quantize_first_last, config.first_last_bits
    )
    nested_plan = nested.plan_nested(plan, config.wbits, config.abits, graph, config.quantize_first_last)
    if config.refining:
        budget = refinement.size_budget(
            plan, refinement.weight_bytes(model), config.target_size, config.mean_bits, config.per_channel
        )
        reservoir = refinement.InputReservoir(config.refine_samples)
    seconds["analysis"] = time.perf_counter() - started

    synthetic = calibration_data if isinstance(calibration_data, synthesis.SyntheticData) else None
    if synthetic is not None:
        mark = time.perf_counter()
        generated = synthetic.generate(model, progress=progress)
        inputs = generated.inputs
        calibration_data, notes = (inputs[0] if len(inputs) == 1 else inputs), notes + generated.notes
        seconds["synthesis"] = time.perf_counter() - mark

    mark = time.perf_counter()
    stats = propagate_statistics(graph, folds) if calibration_data is None or correction == "analytic" else None
    kept_batches, float_means = [], None
    if calibration_data is None:
        samples, rules = _data_free_samples(plan, stats)
        nested_samplers = nested.data_free_samples(nested_plan, graph, stats)
    else:
        batches = calibration_batches(
            calibration_data, graph.input_tensors, config.calibration_batch_size, config.calibration_steps
        )
        if correction == "empirical":
            batches = _keeping(batches, kept_batches, BIAS_CORRECTION_SAMPLES)
            # The float means of the kept batches, measured in this pass.
            float_means = ChannelMeans(correction_inputs(plan), BIAS_CORRECTION_SAMPLES)
        if config.refining:
            batches = reservoir.watch(batches)
        calibrate = report_progress("calibration")
        total_batches = count_batches(
            calibration_data, graph.input_tensors, config.calibration_batch_size, config.calibration_steps
        )
        with nested.recording(nested_plan) as nested_samplers:
            samples = record_samples(
                graph, batches, list(plan.quantizers), progress=lambda done: calibrate(done, total_batches),
                channel_means=float_means,
            )
        for kernel in nested_plan.kernels:
            kernel.rule = "calibration"
        rules = {key: "calibration" for key in plan.quantizers}
    seconds["statistics"] = time.perf_counter() - mark

    mark = time.perf_counter()
    _fit_weights(
        plan, config.method, config.scope, config.per_channel, config.p, config.exponent_bounds,
        config.weight_clipping, report_progress("weights"),
    )
    seconds["weights"] = time.perf_counter() - mark
    mark = time.perf_counter()
    _fit_activations(
        plan, samples, rules, config.method, config.scope, config.p, config.exponent_bounds,
        config.fast_activations, report_progress("activations"),
    )
    nested.fit(
        nested_plan, nested_samplers, config.method, config.scope, config.per_channel, config.p,
        config.exponent_bounds, config.weight_clipping, config.fast_activations,
        next((layer_plan.fit.exponent for layer_plan in plan.layers.values()), None),
    )
    seconds["activations"] = time.perf_counter() - mark

    refined = None
    if config.refining:
        mark = time.perf_counter()
        labels = None if calibration_labels is None else refinement.subsample_labels(calibration_labels, reservoir)
        refined = refinement.refine_plan(
            graph, folds, plan, config, inputs=reservoir.inputs, labels=labels, samples=samples, budget=budget,
            progress=progress,
        )
        plan = refined.plan
        seconds["refinement"] = time.perf_counter() - mark

    mark = time.perf_counter()
    if correction is not None:
        _give_every_layer_a_bias(plan)
    builder = ModelBuilder(graph, folds, plan, config.per_channel, nested_plan)
    quantized_model = builder.build()
    seconds["build"] = time.perf_counter() - mark

    mark = time.perf_counter()
    corrections = {}
    if correction == "analytic":
        corrections = analytic_corrections(plan, stats, builder.quantized_layers)
        apply_corrections(builder.quantized_layers, corrections)
    elif correction == "empirical" and refined is not None:
        # The corrections refinement's loss applied: the exported model is the one it chose.
        corrections = refined_corrections(plan, refined.bias_shifts)
        apply_corrections(builder.quantized_layers, corrections)
    elif correction == "empirical":
        corrections = empirical_corrections(
            graph, plan, quantized_model, builder.quantized_layers, kept_batches,
            progress=report_progress("bias correction"), float_means=float_means.means(),
        )
    seconds["bias_correction"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started

    # What was asked, with what conversion resolved: the report's options rebuild the conversion.
    options = {
        **config.get_config(),
        "bias_correction": correction or False,
        "calibrated": calibration_data is not None,
        "labelled": calibration_labels is not None,
    }
    if synthetic is not None:
        options["synthetic"] = dataclasses.asdict(synthetic)
    notes = notes + [f"layer '{name}' reused as is (its config does not round-trip)" for name in builder.reused]
    report = _report(graph, plan, folds, unfolded, options, notes, seconds, corrections, nested_plan)
    report.refinement = [] if refined is None else [dataclasses.asdict(step) for step in refined.reports]
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
    config = ConversionConfig(wbits, abits, quantize_first_last=quantize_first_last, first_last_bits=first_last_bits)
    model, notes = resolve_model(model)
    graph = FlatGraph(model)
    folds, unfolded = plan_folds(graph)
    plan = plan_conversion(
        graph, folds, config.wbits, config.abits, config.quantize_first_last, config.first_last_bits
    )
    nested_plan = nested.plan_nested(plan, config.wbits, config.abits, graph, config.quantize_first_last)
    stats = propagate_statistics(graph, folds)
    for quantizer in plan.quantizers.values():
        quantizer.rule = stats[quantizer.key].rule
        if stats[quantizer.key].sampler is None:
            quantizer.reason = "no data-free statistics; needs calibration data"
    options = {
        "method": "inspect",
        "wbits": config.wbits,
        "abits": config.abits,
        "quantize_first_last": config.quantize_first_last,
        "fast_activations": config.fast_activations,  # what `convert` does by default
    }
    return _report(graph, plan, folds, unfolded, options, notes, {}, nested_plan=nested_plan)


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
    report.folded_batch_norms = fold_records(folds)
    report.unfolded_batch_norms = [{"batch_norm": bn.name, "reason": why} for bn, why in unfolded]
    return folded, report


def _report(graph, plan, folds, unfolded, options, notes, seconds, corrections=None, nested_plan=None):
    report = ConversionReport(graph.model.name, options, notes=notes, seconds=seconds)
    report.folded_batch_norms = fold_records(folds)
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
                    kernel_params=int(layer_plan.kernel.size),
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
                    folded_batch_norm=layer_plan.fold.batch_norm_names if layer_plan.fold else None,
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
                    kernel_params=nested.kernel_parameters(layer, own=nested_plan is not None
                                                          and bool(nested_plan.rows_of(layer))),
                )
            )
        if nested_plan is not None:
            report.layers += [_nested_report(layer, *row) for row in nested_plan.rows_of(layer)]
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


def _nested_report(owner, name, kernel, layer, reason):
    """The `LayerReport` of a kernel layer nested in another layer (`converter.nested`)."""
    if kernel is None:
        return LayerReport(
            name=name, class_name=type(layer).__name__, status="float", reason=reason,
            params=int(sum(np.prod(w.shape) for w in layer.weights)), kernel_params=nested.kernel_parameters(layer),
            nested_in=owner.name,
        )
    fit, input_fit = kernel.fit, kernel.input_fit
    return LayerReport(
        name=name,
        class_name=type(layer).__name__,
        status="quantized",
        params=int(kernel.kernel.size),
        kernel_params=int(kernel.kernel.size),
        weight_bits=kernel.weight_bits,
        exponent=fit.exponent if fit else None,
        error=fit.error if fit else None,
        uniform_error=fit.uniform_error if fit else None,
        weight_clip=kernel.clip_fraction if fit else None,
        input_quantizer=f"{name}_input_quantizer" if input_fit else None,
        input_bits=kernel.input_bits if input_fit else None,
        input_reason=kernel.reason,
        clip_fraction=kernel.clip_fraction,
        nested_in=owner.name,
        input_exponent=input_fit.exponent if input_fit else None,
        input_clip=input_fit.clip if input_fit else None,
        rule=kernel.rule,
    )

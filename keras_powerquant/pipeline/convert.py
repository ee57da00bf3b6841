"""The pipeline: `convert` composes the stages, one module each, in the order they run.

    request     = make_request(...)                 request.py: inputs checked once
    analysis    = analyse(request)                  analysis.py: graph, folds, plan
    inputs      = calibration_inputs(request)       inputs.py: synthetic inputs generated
    statistics  = gather_statistics(...)            statistics.py: data-free or one pass
    fit_weights / fit_activations                   fitting.py: exponents and clips
    refined     = refine(...)                       refining.py: network-loss refinement
    built       = build(...)                        building.py: the PowerQuant model
    corrections = correct_bias(...)                 correction.py: bias correction
    report      = conversion_report(...)            reporting.py

Each stage takes the results of the stages before it and returns its own;
the stages use `converter/` (graph, registry, builder), `refinement/`,
`synthesis` and `quantization/` below them, and nothing imports the pipeline
but the public API, the callback and the CLI.
"""

import dataclasses
import time

from keras_powerquant.config import ConversionConfig
from keras_powerquant.converter.builder import ModelBuilder
from keras_powerquant.converter.folding import fold_records
from keras_powerquant.converter.folding import plan_folds
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.statistics import propagate_statistics
from keras_powerquant.loading import resolve_model
from keras_powerquant.pipeline.analysis import analyse
from keras_powerquant.pipeline.building import build
from keras_powerquant.pipeline.correction import correct_bias
from keras_powerquant.pipeline.fitting import fit_activations
from keras_powerquant.pipeline.fitting import fit_weights
from keras_powerquant.pipeline.inputs import calibration_inputs
from keras_powerquant.pipeline.refining import refine
from keras_powerquant.pipeline.reporting import conversion_report
from keras_powerquant.pipeline.request import check_weights
from keras_powerquant.pipeline.request import make_request
from keras_powerquant.pipeline.statistics import gather_statistics
from keras_powerquant.report import ConversionReport


class _Stopwatch:
    """Seconds per stage: each `lap(stage)` counts the time since the previous lap."""

    def __init__(self):
        self.started = self._mark = time.perf_counter()
        self.seconds = {}

    def lap(self, stage):
        now = time.perf_counter()
        self.seconds[stage] = now - self._mark
        self._mark = now

    def total(self):
        self.seconds["total"] = time.perf_counter() - self.started
        return self.seconds


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
    clock = _Stopwatch()
    request = make_request(model, args, config, options, calibration_data, calibration_labels, progress)
    config = request.config
    analysis = analyse(request.model, config, refining=config.refining)
    clock.lap("analysis")
    inputs = calibration_inputs(request)
    if request.synthetic is not None:
        clock.lap("synthesis")
    statistics = gather_statistics(request, analysis, inputs)
    clock.lap("statistics")
    fit_weights(request, analysis)
    clock.lap("weights")
    fit_activations(request, analysis, statistics)
    clock.lap("activations")
    refined = None
    if config.refining:
        refined = refine(request, analysis, statistics)
        clock.lap("refinement")
    plan = analysis.plan if refined is None else refined.plan
    built = build(request, analysis, plan)
    clock.lap("build")
    corrections = correct_bias(request, analysis, plan, statistics, built, refined)
    clock.lap("bias_correction")

    # What was asked, with what conversion resolved: the report's options rebuild the conversion.
    resolved = {
        **config.get_config(),
        "bias_correction": request.bias_correction or False,
        "calibrated": request.calibrated,
        "labelled": request.labels is not None,
    }
    if request.synthetic is not None:
        resolved["synthetic"] = dataclasses.asdict(request.synthetic)
    notes = [*request.notes, *inputs.notes, *statistics.notes]
    notes += [f"layer '{name}' reused as is (its config does not round-trip)" for name in built.reused]
    report = conversion_report(
        analysis.graph, plan, analysis.folds, analysis.unfolded, resolved, notes, clock.total(), corrections,
        analysis.nested_plan,
    )
    report.refinement = [] if refined is None else [dataclasses.asdict(step) for step in refined.reports]
    return built.model, report
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
    analysis = analyse(model, config)
    graph, folds, plan = analysis.graph, analysis.folds, analysis.plan
    stats = propagate_statistics(graph, folds)
    for quantizer in plan.quantizers.values():
        quantizer.rule = stats[quantizer.key].description
        if stats[quantizer.key].sampler is None:
            quantizer.reason = "no data-free statistics; needs calibration data"
    options = {
        "method": "inspect",
        "wbits": config.wbits,
        "abits": config.abits,
        "quantize_first_last": config.quantize_first_last,
        "fast_activations": config.fast_activations,  # what `convert` does by default
    }
    return conversion_report(
        graph, plan, folds, analysis.unfolded, options, notes, {}, nested_plan=analysis.nested_plan
    )


def fold_batch_norms(model):
    """The float model with every foldable BatchNorm folded into its linear layer.

    Args:
        model: a Functional or Sequential `keras.Model`, or a model file path.

    Returns:
        `(folded_model, report)`: the folded `keras.Model` and a
        `ConversionReport` listing folded and kept BatchNorms.
    """
    model, notes = resolve_model(model)
    check_weights(model)
    graph = FlatGraph(model)
    folds, unfolded = plan_folds(graph)
    folded = ModelBuilder(graph, folds).build()
    report = ConversionReport(model.name, {"method": "fold"}, notes=notes)
    report.folded_batch_norms = fold_records(folds)
    report.unfolded_batch_norms = [{"batch_norm": bn.name, "reason": why} for bn, why in unfolded]
    return folded, report


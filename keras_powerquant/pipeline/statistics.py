"""Stage 3, statistics: what each quantizer is fitted on, data-free or from one calibration pass."""

import dataclasses
from typing import Any
from typing import Optional

from keras_powerquant.converter import nested
from keras_powerquant.converter.bias_correction import correction_inputs
from keras_powerquant.converter.calibration import calibration_batches
from keras_powerquant.converter.calibration import count_batches
from keras_powerquant.converter.calibration import InputMeans
from keras_powerquant.converter.calibration import record_samples
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.statistics import propagate_statistics
from keras_powerquant.errors import UnsupportedModelError
from keras_powerquant.refinement import InputReservoir
from keras_powerquant.synthesis import SyntheticData

# Calibration samples kept in memory for the empirical bias correction's pass.
# A shift measured on n samples adds 1/n of the output error's variance back
# (1.6% at 64); the pass holds every sample's tensors at each point of the
# graph, so its time and memory grow with n: EfficientNet-Lite2 W4/A8, 256
# images, 15 s at 256 and 6 s at 64, top-1 on 394 test images 81.73 and
# 82.23 (runs side by side on 2 cores; benchmarks/calibration_time.json
# records the conversion at 64).
BIAS_CORRECTION_SAMPLES = 64
# The short synthetic run of `data_free_fallback`: few samples (each gives
# every spatial position of every tensor), few Adam steps, and a bound on
# its time; `synthesize_inputs`' defaults (32 x 50) took 339 s on
# EfficientNet-Lite2 on 2 cores, this 8 x 10 about a twentieth of that.
FALLBACK_SYNTHESIS = SyntheticData(num_samples=8, steps=10, batch_size=8, time_limit=30.0)


@dataclasses.dataclass(frozen=True)
class Statistics:
    """The statistics the fitting, refinement and bias-correction stages use.

    Attributes:
        samples: tensor key -> 1-D float32 values sampled for its quantizer
            (a key without statistics is absent).
        rules: tensor key -> how its values were obtained ("calibration",
            or the data-free propagation rule).
        nested_samplers: the samples of nested kernel layers' inputs.
        propagated: the data-free `TensorStats` by key, when data-free or
            for analytic bias correction; else None.
        kept_batches: the calibration batches empirical bias correction
            runs on (at most `BIAS_CORRECTION_SAMPLES` samples).
        float_means: the float model's per-position means of the corrected
            layers' inputs on `kept_batches` (`InputMeans`), or None.
        reservoir: refinement's subsample of the calibration inputs, or None.
        notes: what the data-free fallback did, for the report.
    """

    samples: dict
    rules: dict
    nested_samplers: Any
    propagated: Optional[dict] = None
    kept_batches: list = dataclasses.field(default_factory=list)
    float_means: Optional[InputMeans] = None
    reservoir: Optional[InputReservoir] = None
    notes: tuple = ()


def gather_statistics(request, analysis, inputs):
    """The `Statistics` of the analysed model on `inputs` (a `CalibrationInputs`)."""
    config, graph, plan = request.config, analysis.graph, analysis.plan
    correction = request.bias_correction
    propagated = None
    if inputs.data is None or correction == "analytic":
        propagated = propagate_statistics(graph, analysis.folds)
    if inputs.data is None:
        samples, rules = {}, {}
        for key in plan.quantizers:
            rules[key] = propagated[key].description
            if propagated[key].sampler is not None:
                samples[key] = propagated[key].sampler(plan.quantizers[key].bits)
        nested_samplers = nested.data_free_samples(analysis.nested_plan, graph, propagated)
        notes = ()
        if config.data_free_fallback is not None:
            notes = _fall_back(request, analysis, propagated, samples, rules)
        return Statistics(samples, rules, nested_samplers, propagated, notes=notes)

    batches = calibration_batches(
        inputs.data, graph.input_tensors, config.calibration_batch_size, config.calibration_steps
    )
    kept_batches, float_means, reservoir = [], None, None
    if correction == "empirical":
        batches = _keeping(batches, kept_batches, BIAS_CORRECTION_SAMPLES)
        # The float means of the kept batches, measured in this pass.
        float_means = InputMeans(correction_inputs(plan), BIAS_CORRECTION_SAMPLES)
    if config.refining:
        reservoir = InputReservoir(config.refine_samples)
        batches = reservoir.watch(batches)
    report = request.reporter("calibration")
    total = count_batches(inputs.data, graph.input_tensors, config.calibration_batch_size, config.calibration_steps)
    with nested.recording(analysis.nested_plan) as nested_samplers:
        samples = record_samples(
            graph, batches, list(plan.quantizers), progress=lambda done: report(done, total),
            input_means=float_means, eager_layers=analysis.nested_plan.owners,
        )
    for kernel in analysis.nested_plan.kernels:
        kernel.rule = "calibration"
    rules = {key: "calibration" for key in plan.quantizers}
    return Statistics(samples, rules, nested_samplers, propagated, kept_batches, float_means, reservoir)


def _keeping(batches, kept, max_samples):
    """Yields `batches`, appending them to `kept` until it holds `max_samples` samples."""
    held = 0
    for batch in batches:
        if held < max_samples:
            kept.append(batch)
            held += len(batch[0])
        yield batch


def _weakness(stats, most_steps):
    """Why `stats` are too weak to fit a quantizer on (more than `most_steps` from a BatchNorm), or None."""
    if stats.sampler is None:
        return f"no statistics ({stats.rule})"
    if stats.steps is None:
        return "statistics not from a normalization"
    if stats.steps > most_steps:
        return f"statistics {stats.steps} steps from a normalization"
    return None


def _model_inputs(graph):
    """The keys of the model's inputs and of what they become through one-input ops that are not
    linear layers (padding, rescaling, reshaping: the first layer's input)."""
    keys = set(graph.input_keys)
    for op in graph.ops:
        if len(op.input_keys) == 1 and op.input_keys[0] in keys and not (op.is_layer and linear_type(op.layer)):
            keys.update(op.output_keys)
    return keys


def _fall_back(request, analysis, propagated, samples, rules):
    """Refits the quantizers with weak data-free statistics on `FALLBACK_SYNTHESIS` inputs.

    Updates `samples` and `rules` in place for those quantizers alone; the
    model's inputs (`_model_inputs`) keep their statistics (synthetic inputs
    do not know the range real ones have). Returns the notes for the report.
    """
    graph, plan = analysis.graph, analysis.plan
    inputs = _model_inputs(graph)
    weak = {}
    for key in plan.quantizers:
        why = None if key in inputs else _weakness(propagated[key], request.config.data_free_fallback)
        if why is not None:
            weak[key] = why
    if not weak:
        return ("data-free fallback: every quantizer's statistics are close enough to a BatchNorm",)
    try:
        synthesis = FALLBACK_SYNTHESIS.generate(request.model, progress=request.progress)
    except UnsupportedModelError as error:
        return (f"data-free fallback not run, {len(weak)} quantizer(s) keep their statistics: {error}",)
    batches = calibration_batches(synthesis.inputs, graph.input_tensors, FALLBACK_SYNTHESIS.batch_size)
    recorded = record_samples(graph, batches, list(weak))
    for key, why in weak.items():
        samples[key] = recorded[key]
        rules[key] = f"synthetic ({why})"
    return (
        *synthesis.notes,
        f"data-free fallback: {len(weak)} activation quantizer(s) fitted on {FALLBACK_SYNTHESIS.num_samples} "
        f"synthetic samples ({synthesis.seconds:.1f} s), the others on their data-free statistics",
    )

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
from keras_powerquant.converter.statistics import propagate_statistics
from keras_powerquant.refinement import InputReservoir

# Calibration samples kept in memory for the empirical bias correction's pass.
BIAS_CORRECTION_SAMPLES = 256


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
    """

    samples: dict
    rules: dict
    nested_samplers: Any
    propagated: Optional[dict] = None
    kept_batches: list = dataclasses.field(default_factory=list)
    float_means: Optional[InputMeans] = None
    reservoir: Optional[InputReservoir] = None


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
            rules[key] = propagated[key].rule
            if propagated[key].sampler is not None:
                samples[key] = propagated[key].sampler(plan.quantizers[key].bits)
        nested_samplers = nested.data_free_samples(analysis.nested_plan, graph, propagated)
        return Statistics(samples, rules, nested_samplers, propagated)

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
            input_means=float_means,
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

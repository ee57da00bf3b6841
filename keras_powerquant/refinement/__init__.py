"""Loss-aware refinement of a conversion plan on calibration data (docs/method.md §8).

`convert(..., calibration_data=..., refine=...)` fits every layer alone
first (PowerQuant's per-layer fit), then runs the refinement steps of
`keras_powerquant.refinement.steps` on the network loss of a calibration
subsample: cross-entropy with `calibration_labels`, else the KL divergence
between the float and the quantized model's outputs.
"""

import dataclasses
import time

import numpy as np

from keras_powerquant.limits import HOLDOUT_EVERY
from keras_powerquant.limits import MIN_HOLDOUT
from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.refinement.budget import multiply_accumulates
from keras_powerquant.refinement.budget import sample_values
from keras_powerquant.refinement.budget import search_budget
from keras_powerquant.refinement.data import check_labels
from keras_powerquant.refinement.data import in_memory_size
from keras_powerquant.refinement.data import InputReservoir
from keras_powerquant.refinement.objective import NetworkObjective
from keras_powerquant.refinement.second_order import gptq_step
from keras_powerquant.refinement.second_order import LayerFeatures
from keras_powerquant.refinement.settings import apply_settings
from keras_powerquant.refinement.settings import KernelFitter
from keras_powerquant.refinement.settings import Settings
from keras_powerquant.refinement.steps import bits_step
from keras_powerquant.refinement.steps import granularity_step
from keras_powerquant.refinement.steps import grid_step
from keras_powerquant.refinement.steps import kernel_bytes
from keras_powerquant.refinement.steps import lapq_step
from keras_powerquant.refinement.steps import RefinementContext
from keras_powerquant.refinement.steps import rounding_step

# The step functions, by the names `ConversionConfig(refine=...)` accepts.
STEPS = {
    "grid": grid_step,
    "granularity": granularity_step,
    "lapq": lapq_step,
    "gptq": gptq_step,
    "rounding": rounding_step,
}
# The steps that search on the network loss and share the `SearchBudget`.
SEARCH_STEPS = ("grid", "granularity", "lapq")

__all__ = ["InputReservoir", "Refinement", "refine_plan", "size_budget", "weight_bytes"]


def size_budget(plan, float_bytes, target_size, mean_bits, per_channel, nested_kernels=()):
    """The mixed-precision budget, `("bytes", limit)` or `("bits", limit)`, or None.

    `target_size` counts the converted model's weight bytes (codes, scales,
    biases and the weights of layers that stay float): an int is bytes, a
    float in (0, 1] a fraction of `float_bytes`. It is turned into a limit
    on the quantized layers' bytes. The `nested_kernels` (the
    `NestedKernel`s of `converter.nested`: weight-only layers, kernel layers
    inside other layers) keep their bit width and count at their quantized size.

    Raises:
        ValueError: a budget below what 2-bit weights reach.
    """
    layer_plans = list(plan.layers.values())
    if mean_bits is not None:
        total = sum(int(p.kernel.size) for p in layer_plans)
        return ("bits", float(mean_bits) * total)
    if target_size is None:
        return None
    limit = float(target_size) * float_bytes if float(target_size) <= 1 else float(target_size)
    # What the quantized layers and their folded BatchNorms weigh in the float model.
    replaced = [p.layer for p in layer_plans] + [p.fold.batch_norm for p in layer_plans if p.fold]
    fixed = float_bytes - sum(weight_bytes(layer) for layer in replaced)
    fixed += sum(
        kernel_bytes(kernel, kernel.weight_bits, per_channel) - weight_bytes(kernel.layer) for kernel in nested_kernels
    )
    smallest = fixed + sum(
        kernel_bytes(p, 2, per_channel if p.per_channel is None else p.per_channel) for p in layer_plans
    )
    if limit < smallest:
        raise ValueError(
            f"`target_size` of {int(limit)} bytes is below the smallest size 2-bit weights reach "
            f"({int(smallest)} bytes, {smallest / float_bytes:.3f} of the float model's {int(float_bytes)})."
        )
    return ("bytes", limit - fixed)


def weight_bytes(layer):
    """Bytes of a layer's (or model's) weights."""
    return sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in layer.weights)


@dataclasses.dataclass
class Refinement:
    """What `refine_plan` returns.

    Attributes:
        plan: the refined `ConversionPlan`.
        reports: a `StepReport` per step run.
        bias_shifts: with empirical bias correction, the shift to subtract
            from each layer's bias (by layer name), measured on the
            refinement subsample exactly as the steps' loss applied it;
            layers absent (channels-first) are not corrected. Empty without
            bias correction.
    """

    plan: object
    reports: list
    bias_shifts: dict


def refine_plan(
    graph, folds, plan, config, *, inputs, labels, samples, budget=None, progress=None, bias_correction=None
):
    """Runs the refinement steps of `config.refine` on a fitted plan; returns a `Refinement`.

    With empirical bias correction (`bias_correction`), the
    loss the steps minimise is that of the bias-corrected network (see
    `tunable`), and the returned shifts are the corrections that loss
    applied, so the exported model is the one refinement chose.

    Args:
        graph, folds, plan: the conversion's `FlatGraph`, folds and fitted
            `ConversionPlan` (changed in place).
        config: the conversion's `ConversionConfig` (its steps, method,
            `per_channel`, exponent bounds, `fast_activations`, LAPQ's
            evaluation budget and learned rounding's iterations).
        inputs: the calibration subsample, flat list of arrays.
        labels: integer labels of the subsample, or None (KL to float).
        samples: recorded activation samples by quantizer key.
        budget: mixed-precision budget from `size_budget`, or None.
        progress: `progress(stage, done, total)` or None.
        bias_correction: the correction conversion runs after refinement
            ("empirical", "analytic" or None: the request's).

    Returns:
        A `Refinement`.
    """
    correct_bias = bias_correction == "empirical"
    fit, holdout = holdout_split(inputs[0].shape[0])
    objective = NetworkObjective(
        graph,
        folds,
        plan,
        config.per_channel,
        [a[fit] for a in inputs],
        None if labels is None else labels[fit],
        correct_bias=correct_bias,
        holdout_inputs=None if holdout is None else [a[holdout] for a in inputs],
        holdout_labels=None if labels is None or holdout is None else labels[holdout],
    )
    fitters = {p.layer.name: KernelFitter(p) for p in plan.layers.values()}
    models_by_norm = {}

    def activation_models(p):
        if p not in models_by_norm:
            models_by_norm[p] = {
                key: ActivationErrorModel(samples[key], q.bits, q.signed, p)
                for key, q in plan.quantizers.items()
                if q.quantized
            }
        return models_by_norm[p]

    settings = Settings.from_plan(plan, config.per_channel)
    search = _search_budget(objective, plan, settings, config)
    context = RefinementContext(
        objective, plan, fitters, activation_models, config.method, config.exponent_bounds, config.fast_activations,
        search, progress,
    )
    reports = []
    run = [("bits", lambda c, s: bits_step(c, s, budget))] if budget is not None else []
    run += [
        (name, (lambda c, s: rounding_step(c, s, config.rounding_iterations)) if name == "rounding" else STEPS[name])
        for name in config.refine
    ]
    # The held-out loss of the settings standing, carried from one step's check to the next.
    holdout_current = None
    for name, step in run:
        started, evaluations = time.perf_counter(), objective.evaluations
        holdout_before = objective.holdout_loss(settings) if holdout_current is None else holdout_current
        refined, report = step(context, settings)
        report.seconds = time.perf_counter() - started
        report.evaluations = objective.evaluations - evaluations
        if name in SEARCH_STEPS:
            report.notes.append(search.describe())
        # `bits` trades loss for size by design: its result stands.
        if holdout_before is not None and name != "bits":
            report.holdout_loss_before = holdout_before
            report.holdout_loss_after = objective.holdout_loss(refined)
            if report.holdout_loss_after > holdout_before:
                report.kept = False
                report.notes.append(
                    f"the held-out loss rose ({holdout_before:.6g} to {report.holdout_loss_after:.6g}): "
                    "the step's result is discarded"
                )
                refined = settings
            holdout_current = report.holdout_loss_after if report.kept else holdout_before
        else:
            holdout_current = None
        settings = refined
        reports.append(report)
    apply_settings(plan, settings, fitters, activation_models(2.0))
    return Refinement(plan, reports, objective.bias_shifts(settings))


def _search_budget(objective, plan, settings, config):
    """The `SearchBudget` of the search steps, from the cost of one evaluation of `objective`."""
    layer_plans = {p.layer.name: p for p in plan.layers.values()}
    total = 0
    for name, layer in objective.kernel_layers.items():
        features = LayerFeatures(layer_plans[name].layer, layer.float_kernel.shape)
        tensor = layer.input if features.reason is not None else layer.output
        total += multiply_accumulates(features, tensor.shape)
    values = sum(
        sample_values(layer.output.shape)
        for key, layer in objective.activation_layers.items()
        if plan.quantizers[key].quantized
    )
    power = config.method == "powerquant"
    needs = {
        "grid": power * (
            sum(s.exponent != 1.0 for s in settings.kernels.values())
            + sum(s.exponent != 1.0 for s in settings.activations.values())
        ),
        "granularity": sum(bool(s.per_channel) for s in settings.kernels.values()),
    }
    return search_budget(total, objective.size, needs, config.refine_evaluations, values)


def holdout_split(count):
    """`(fit, holdout)` index arrays of a refinement subsample: every `HOLDOUT_EVERY`-th sample is held out.

    The steps fit on the rest and a step's result is kept only if it does
    not raise the loss on the held-out samples: with a few hundred samples
    and dozens of clip values, a step can lower its loss on the samples it
    fits while raising it on others. Subsamples too small to spare
    `MIN_HOLDOUT` samples are not split (`holdout` None).
    """
    positions = np.arange(count)
    held = positions % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if held.sum() < MIN_HOLDOUT:
        return positions, None
    return positions[~held], positions[held]


def subsample_labels(labels, reservoir):
    """The labels of the reservoir's kept samples; checks their count against the stream."""
    labels = check_labels(labels)
    if labels.shape[0] < reservoir.seen:
        raise ValueError(
            f"`calibration_labels` has {labels.shape[0]} labels for {reservoir.seen} calibration samples."
        )
    return np.asarray(labels[reservoir.positions])


__all__ += ["holdout_split", "subsample_labels"]

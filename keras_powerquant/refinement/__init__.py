"""Loss-aware refinement of a conversion plan on calibration data (docs/method.md §8).

`convert(..., calibration_data=..., refine=...)` fits every layer alone
first (PowerQuant's per-layer fit), then runs the refinement steps of
`keras_powerquant.refinement.steps` on the network loss of a calibration
subsample: cross-entropy with `calibration_labels`, else the KL divergence
between the float and the quantized model's outputs.
"""

import numbers
import time

import numpy as np

from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.refinement.data import check_labels
from keras_powerquant.refinement.data import DEFAULT_REFINE_SAMPLES
from keras_powerquant.refinement.data import in_memory_size
from keras_powerquant.refinement.data import InputReservoir
from keras_powerquant.refinement.objective import NetworkObjective
from keras_powerquant.refinement.settings import apply_settings
from keras_powerquant.refinement.settings import KernelFitter
from keras_powerquant.refinement.settings import Settings
from keras_powerquant.refinement.steps import bits_step
from keras_powerquant.refinement.steps import granularity_step
from keras_powerquant.refinement.steps import grid_step
from keras_powerquant.refinement.steps import kernel_bytes
from keras_powerquant.refinement.steps import lapq_step
from keras_powerquant.refinement.steps import RefinementContext
from keras_powerquant.refinement.steps import ROUNDING_ITERATIONS
from keras_powerquant.refinement.steps import rounding_step

STEPS = {"grid": grid_step, "granularity": granularity_step, "lapq": lapq_step, "rounding": rounding_step}
# What `refine=True` runs, in this order.
RECOMMENDED_STEPS = ("grid", "granularity", "lapq", "rounding")
DEFAULT_MAX_EVALUATIONS = 400

__all__ = ["check_refine_options", "InputReservoir", "refine_plan", "resolve_steps", "size_budget", "weight_bytes"]


def resolve_steps(refine):
    """The step names `refine` asks for: `True` the recommended ones, a list those named.

    Raises:
        ValueError: unknown step names, or a `refine` that is neither a
            bool nor a list of names.
    """
    if refine is None or refine is False:
        return ()
    if refine is True:
        return RECOMMENDED_STEPS
    if isinstance(refine, str):
        refine = [refine]
    try:
        names = [str(name) if isinstance(name, str) else None for name in refine]
    except TypeError:
        names = [None]
    if None in names:
        raise ValueError(f"`refine` must be True, False or a list of step names {sorted(STEPS)}; got {refine!r}.")
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        raise ValueError(f"Unknown refinement step(s) {unknown}; the steps are {sorted(STEPS)}.")
    return tuple(dict.fromkeys(names))


def check_refine_options(refine, calibration_data, calibration_labels, target_size, mean_bits, refine_samples):
    """Validates the refinement options of `convert` before any work; returns the step names."""
    steps = resolve_steps(refine)
    if target_size is not None and mean_bits is not None:
        raise ValueError("Give `target_size` or `mean_bits`, not both.")
    needs_data = bool(steps) or target_size is not None or mean_bits is not None
    if needs_data and calibration_data is None:
        what = "refine" if steps else ("target_size" if target_size is not None else "mean_bits")
        raise ValueError(
            f"`{what}` measures the network loss on calibration data: pass `calibration_data` "
            "(model inputs, a few hundred samples)."
        )
    if calibration_labels is not None:
        if not needs_data:
            raise ValueError("`calibration_labels` are only used by refinement: pass `refine` as well.")
        count = check_labels(calibration_labels).shape[0]
        size = in_memory_size(calibration_data)
        if size is not None and size != count:
            raise ValueError(
                f"`calibration_labels` has {count} labels for {size} calibration samples: give one per sample."
            )
    if mean_bits is not None and not (isinstance(mean_bits, numbers.Real) and 2 <= mean_bits <= 8):
        raise ValueError(f"`mean_bits` must be a number in [2, 8]; got {mean_bits!r}.")
    if target_size is not None and not (
        isinstance(target_size, numbers.Real) and not isinstance(target_size, bool) and target_size > 0
    ):
        raise ValueError(
            f"`target_size` must be a positive number of bytes or a fraction of the float size; got {target_size!r}."
        )
    if isinstance(target_size, float) and not (target_size <= 1 or target_size.is_integer()):
        raise ValueError(f"`target_size` as a fraction of the float size must be in (0, 1]; got {target_size}.")
    if not (isinstance(refine_samples, numbers.Integral) and refine_samples > 0):
        raise ValueError(f"`refine_samples` must be a positive integer; got {refine_samples!r}.")
    return steps


def size_budget(plan, float_bytes, target_size, mean_bits, per_channel):
    """The mixed-precision budget, `("bytes", limit)` or `("bits", limit)`, or None.

    `target_size` counts the converted model's weight bytes (codes, scales,
    biases and the weights of layers that stay float): an int is bytes, a
    float in (0, 1] a fraction of `float_bytes`. It is turned into a limit
    on the quantized layers' bytes.

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


def refine_plan(
    graph,
    folds,
    plan,
    *,
    steps,
    inputs,
    labels,
    samples,
    method,
    per_channel,
    exponent_bounds,
    fast_activations,
    budget=None,
    max_evaluations=DEFAULT_MAX_EVALUATIONS,
    rounding_iterations=ROUNDING_ITERATIONS,
    progress=None,
):
    """Runs the refinement steps on a fitted plan; returns `(plan, step reports)`.

    Args:
        graph, folds, plan: the conversion's `FlatGraph`, folds and fitted
            `ConversionPlan` (changed in place).
        steps: step names, in order.
        inputs: the calibration subsample, flat list of arrays.
        labels: integer labels of the subsample, or None (KL to float).
        samples: recorded activation samples by quantizer key.
        method: "powerquant" or "uniform".
        per_channel: `convert`'s `per_channel`.
        exponent_bounds: the exponent search interval.
        fast_activations: keep activation exponents in {1, 1/2, 1/4}.
        budget: mixed-precision budget from `size_budget`, or None.
        max_evaluations: LAPQ's Powell evaluation budget.
        rounding_iterations: gradient steps per layer of learned rounding.
        progress: `progress(stage, done, total)` or None.

    Returns:
        The plan and a list of `StepReport`.
    """
    objective = NetworkObjective(graph, folds, plan, per_channel, inputs, labels)
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

    context = RefinementContext(
        objective, plan, fitters, activation_models, method, exponent_bounds, fast_activations, max_evaluations,
        progress,
    )
    settings = Settings.from_plan(plan, per_channel)
    reports = []
    run = [("bits", lambda c, s: bits_step(c, s, budget))] if budget is not None else []
    run += [
        (name, (lambda c, s: rounding_step(c, s, rounding_iterations)) if name == "rounding" else STEPS[name])
        for name in steps
    ]
    for _, step in run:
        started, evaluations = time.perf_counter(), objective.evaluations
        settings, report = step(context, settings)
        report.seconds = time.perf_counter() - started
        report.evaluations = objective.evaluations - evaluations
        reports.append(report)
    apply_settings(plan, settings, fitters, activation_models(2.0))
    return plan, reports


def subsample_labels(labels, reservoir):
    """The labels of the reservoir's kept samples; checks their count against the stream."""
    labels = check_labels(labels)
    if labels.shape[0] < reservoir.seen:
        raise ValueError(
            f"`calibration_labels` has {labels.shape[0]} labels for {reservoir.seen} calibration samples."
        )
    return np.asarray(labels[reservoir.positions])


__all__ += ["DEFAULT_REFINE_SAMPLES", "ROUNDING_ITERATIONS", "subsample_labels"]

"""Refinement steps: each takes `Settings` and returns better or equal ones on the network loss.

Every step starts by measuring the loss of the settings it is given and
only returns settings whose measured loss is lower or equal, so no step
increases its own objective on the calibration subsample.

- `grid` (PowerQuant never below uniform): per layer and per activation
  quantizer, the power grid `a*` or the uniform grid `a = 1`, chosen by the
  network loss. Greedy from the all-uniform model, so the result is never
  worse than uniform quantization on that loss.
- `granularity` (docs/method.md §8, hybrid): per layer, per-tensor instead of
  per-channel scales where that does not increase the loss.
- `lapq` (docs/method.md §8; Nahshan et al.): weight clip fractions and
  activation clips fitted per layer at several error norms `p`, `p` chosen
  on the network loss by a quadratic fit, then scipy's Powell over all clip
  values and exponents jointly.
- `rounding` (AdaRound): per layer, learned up/down rounding of every
  weight code, by TensorFlow gradients on the layer's output
  reconstruction.
- `bits` (docs/method.md §8, mixed precision): bit widths 2..8 per layer by
  measured loss sensitivity per byte, within a size budget.
"""

import dataclasses
import math
import time
from typing import Optional

import numpy as np
from scipy import optimize

from keras_powerquant.limits import ROUNDING_ITERATIONS

# LAPQ's initialisation norms (Nahshan et al. search p in this range).
LAPQ_NORMS = (2.0, 2.5, 3.0, 3.5, 4.0)
# Activation clips move within this factor range of their starting value.
_CLIP_RANGE = (0.25, 2.0)
_MIN_EXPONENT = 0.25
BIT_CHOICES = tuple(range(2, 9))
# Powell's first step along each coordinate, as a fraction of its range.
_POWELL_STEP = 0.1


@dataclasses.dataclass
class StepReport:
    """What one refinement step did.

    Attributes:
        name: the step.
        loss_before, loss_after: the network loss on the calibration
            subsample before and after the step.
        seconds: wall time of the step.
        evaluations: network evaluations it made.
        decisions: per layer / quantizer records (what was chosen, the
            losses that chose it).
        notes: other remarks.
        holdout_loss_before, holdout_loss_after: the loss on the held-out
            calibration samples before and after the step (None without).
        kept: False when the step's result was discarded because the
            held-out loss rose.
    """

    name: str
    loss_before: float
    loss_after: float
    seconds: float = 0.0
    evaluations: int = 0
    holdout_loss_before: Optional[float] = None
    holdout_loss_after: Optional[float] = None
    kept: bool = True
    decisions: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)


class RefinementContext:
    """What the steps share.

    Args:
        objective: the `NetworkObjective`.
        plan: the `ConversionPlan` (fits of the per-layer fit).
        fitters: `KernelFitter` by layer name.
        activation_models: `{p: {key: ActivationErrorModel}}` factory, see
            `activation_models(p)`.
        method: "powerquant" or "uniform".
        exponent_bounds: the exponent search interval.
        fast_activations: activation exponents restricted to 1, 1/2, 1/4.
        budget: the search steps' `SearchBudget` (`refinement.budget`).
        progress: `progress(stage, done, total)` or None.
    """

    def __init__(
        self,
        objective,
        plan,
        fitters,
        activation_models,
        method,
        exponent_bounds,
        fast_activations,
        budget,
        progress,
    ):
        self.objective = objective
        self.plan = plan
        self.fitters = fitters
        self.activation_models = activation_models
        self.method = method
        self.exponent_bounds = tuple(float(b) for b in exponent_bounds)
        self.fast_activations = fast_activations
        self.budget = budget
        self.progress = progress

    @property
    def power(self):
        return self.method == "powerquant"

    def report_progress(self, stage, done, total):
        if self.progress is not None:
            self.progress(stage, done, total)


def grid_step(context, settings):
    """Chooses `a*` or `a = 1` per layer and activation quantizer on the network loss.

    Greedy from the all-uniform model: one layer or quantizer at a time
    switches to its power fit, and keeps it if the loss drops; the result
    is the better of that and the all-power fit, so it is never worse on
    the loss than uniform. With a scaled budget (`context.budget.grid`),
    the first that many switches are tried and the rest stay uniform.
    """
    loss = context.objective
    start_loss = loss(settings)
    report = StepReport("grid", start_loss, start_loss)
    if not context.power:
        report.notes.append("uniform method: every grid is a = 1 already")
        return settings, report
    uniform = settings.replace(
        kernels={
            name: dataclasses.replace(s, exponent=1.0)
            if s.clip_fraction == 1.0
            else context.fitters[name].fit(dataclasses.replace(s, exponent=1.0))
            for name, s in settings.kernels.items()
        },
        activations={
            key: type(s)(context.plan.quantizers[key].fit.uniform_clip, 1.0) for key, s in settings.activations.items()
        },
    )
    current, current_loss = uniform, loss(uniform)
    report.notes.append(f"all-uniform loss {current_loss:.6g}, all-power loss {start_loss:.6g}")
    items = [("weights", name) for name, s in settings.kernels.items() if s.exponent != 1.0]
    items += [("activation", key) for key, s in settings.activations.items() if s.exponent != 1.0]
    limit = len(items) if context.budget.grid is None else min(len(items), context.budget.grid)
    if limit < len(items):
        report.notes.append(f"budget: {limit} of {len(items)} switches tried; the rest stay uniform")
    for done, (kind, item) in enumerate(items[:limit], start=1):
        if kind == "weights":
            power_setting = settings.kernels[item]
            candidate = current.replace(kernels={item: power_setting})
            name = item
        else:
            power_setting = settings.activations[item]
            candidate = current.replace(activations={item: power_setting})
            name = context.plan.quantizers[item].name
        candidate_loss = loss(candidate)
        chosen = candidate_loss < current_loss
        report.decisions.append(
            {
                "kind": kind,
                "name": name,
                "power_exponent": power_setting.exponent,
                "loss_uniform": current_loss,
                "loss_power": candidate_loss,
                "chosen": "power" if chosen else "uniform",
            }
        )
        if chosen:
            current, current_loss = candidate, candidate_loss
        context.report_progress("refine: grid", done, limit)
    if start_loss <= current_loss:
        report.notes.append("the all-power per-layer fit has the lowest loss: kept")
        return settings, report
    report.loss_after = current_loss
    return current, report


def granularity_step(context, settings):
    """Per-tensor scales for the layers where they do not increase the network loss."""
    loss = context.objective
    current_loss = loss(settings)
    report = StepReport("granularity", current_loss, current_loss)
    names = [name for name, s in settings.kernels.items() if s.per_channel]
    if context.budget.granularity is not None and context.budget.granularity < len(names):
        report.notes.append(
            f"budget: {context.budget.granularity} of {len(names)} layers tried; the rest stay per-channel"
        )
        names = names[: context.budget.granularity]
    for done, name in enumerate(names, start=1):
        setting = settings.kernels[name]
        candidate_setting = _refit(context, name, dataclasses.replace(setting, per_channel=False))
        candidate = settings.replace(kernels={name: candidate_setting})
        candidate_loss = loss(candidate)
        chosen = candidate_loss <= current_loss
        report.decisions.append(
            {
                "name": name,
                "loss_per_channel": current_loss,
                "loss_per_tensor": candidate_loss,
                "sensitivity": candidate_loss - current_loss,
                "chosen": "per-tensor" if chosen else "per-channel",
            }
        )
        if chosen:
            settings, current_loss = candidate, candidate_loss
        context.report_progress("refine: granularity", done, len(names))
    report.loss_after = current_loss
    return settings, report


def _refit(context, name, setting, clip=None):
    """A kernel setting's exponent (power method, `a != 1`) and clip fraction refitted (p = 2).

    The clip fraction is refitted when `clip`, or by default when the
    setting already clips.
    """
    bounds = context.exponent_bounds if context.power and setting.exponent != 1.0 else None
    clip = setting.clip_fraction != 1.0 if clip is None else clip
    return context.fitters[name].fit(setting, 2.0, bounds, clip=clip)


def lapq_step(context, settings):
    """LAPQ: clips fitted at several norms p, p chosen on the loss, then Powell jointly."""
    started = time.perf_counter()
    loss = context.objective
    start_loss = loss(settings)
    report = StepReport("lapq", start_loss, start_loss)
    best, best_loss = settings, start_loss

    by_norm = {}
    for p in LAPQ_NORMS:
        by_norm[p] = _clips_at_norm(context, settings, p)
        by_norm[p] = (by_norm[p], loss(by_norm[p]))
        context.report_progress("refine: lapq init", len(by_norm), len(LAPQ_NORMS))
    norms = np.array(LAPQ_NORMS)
    losses = np.array([by_norm[p][1] for p in LAPQ_NORMS])
    curvature, slope, _ = np.polyfit(norms, losses, 2)
    chosen_norm = None
    if curvature > 0:
        chosen_norm = float(np.clip(-slope / (2 * curvature), norms[0], norms[-1]))
        if chosen_norm not in by_norm:
            candidate = _clips_at_norm(context, settings, chosen_norm)
            by_norm[chosen_norm] = (candidate, loss(candidate))
    for p, (candidate, candidate_loss) in sorted(by_norm.items()):
        report.decisions.append({"stage": "init", "p": p, "loss": candidate_loss})
        if candidate_loss < best_loss:
            best, best_loss = candidate, candidate_loss
    report.notes.append(
        f"initialisation: quadratic in p gives p = {chosen_norm if chosen_norm is None else round(chosen_norm, 3)}; "
        f"best start loss {best_loss:.6g}"
    )

    best, best_loss, evaluations = _powell(context, best, best_loss)
    report.notes.append(f"Powell: {evaluations} evaluations, loss {best_loss:.6g}")
    report.loss_after = best_loss
    report.seconds = time.perf_counter() - started
    return best, report


def _clips_at_norm(context, settings, p):
    """Weight clip fractions and activation clips fitted per layer at error norm `p`."""
    kernels = {
        name: context.fitters[name].fit(s, p, exponent_bounds=None, clip=True) for name, s in settings.kernels.items()
    }
    activations = {}
    for key, s in settings.activations.items():
        clip, _ = context.activation_models(p)[key].best_clip(s.exponent)
        activations[key] = dataclasses.replace(s, clip=clip)
    return settings.replace(kernels=kernels, activations=activations)


def _powell(context, settings, settings_loss):
    """Powell's method over clip fractions, clips and exponents, within the evaluation budget."""
    # Clips first, then exponents: Powell's first sweep visits coordinates in
    # order, so with a budget shorter than a sweep both methods get their
    # clips fitted the same way, and the power exponents get what is left.
    low_exponent = max(context.exponent_bounds[0], _MIN_EXPONENT)
    high_exponent = context.exponent_bounds[1]
    coordinates = [("kernel", name, "clip_fraction", 0.2, 1.0, s.clip_fraction) for name, s in settings.kernels.items()]
    # Activation clips move as a ratio of their start, so every coordinate is O(1).
    coordinates += [("activation", key, "clip", _CLIP_RANGE[0], _CLIP_RANGE[1], 1.0) for key in settings.activations]
    # Exponents the grid step set to 1 stay uniform (and cheap at inference).
    coordinates += [
        ("kernel", name, "exponent", low_exponent, high_exponent, s.exponent)
        for name, s in settings.kernels.items()
        if context.power and s.exponent != 1.0
    ]
    coordinates += [
        ("activation", key, "exponent", low_exponent, high_exponent, s.exponent)
        for key, s in settings.activations.items()
        if context.power and s.exponent != 1.0 and not context.fast_activations
    ]
    start_clips = {key: s.clip for key, s in settings.activations.items()}
    low = np.array([c[3] for c in coordinates])
    span = np.array([c[4] for c in coordinates]) - low

    def settings_at(x):
        kernels, activations = dict(settings.kernels), dict(settings.activations)
        folded = np.mod(x, 2.0)
        values = low + np.where(folded <= 1.0, folded, 2.0 - folded) * span
        for (kind, key, field, _, _, _), value in zip(coordinates, values):
            value = float(value)
            if kind == "kernel":
                kernels[key] = dataclasses.replace(kernels[key], **{field: value})
            elif field == "clip":
                activations[key] = dataclasses.replace(activations[key], clip=start_clips[key] * value)
            else:
                activations[key] = dataclasses.replace(activations[key], exponent=value)
        return settings.replace(kernels=kernels, activations=activations)

    best = {"loss": settings_loss, "settings": settings}
    count = [0]

    def objective(x):
        candidate = settings_at(x)
        value = context.objective(candidate)
        count[0] += 1
        if value < best["loss"]:
            best.update(loss=value, settings=candidate)
        context.report_progress("refine: lapq", count[0], context.budget.powell)
        return value

    if not coordinates or context.budget.powell <= 0:
        return settings, settings_loss, 0
    # Not Powell's `bounds`: scipy's bounded line search returns the best
    # interior point it tried even when that is worse than where the line
    # started (a clip fraction of 1 sits on its bound), so Powell drifted to
    # worse settings. Unbounded, Brent's line search keeps the starting point
    # unless it finds a lower loss; each coordinate is scaled to [0, 1] over
    # its range and folded back into it (a triangle wave), so every point
    # Powell tries is a valid setting and a search that starts on a bound
    # explores inwards whichever way it steps.
    x0 = (np.array([c[5] for c in coordinates]) - low) / span
    optimize.minimize(
        objective,
        x0,
        method="Powell",
        options={
            "maxfev": context.budget.powell,
            "xtol": 1e-2,
            "ftol": 1e-4,
            "direc": np.eye(len(coordinates)) * _POWELL_STEP,
        },
    )
    return best["settings"], best["loss"], count[0]


def kernel_bytes(layer_plan, bits, per_channel):
    """Bytes of one quantized layer's variables: codes, scales and bias.

    `layer_plan` is a `LayerPlan` or a `NestedKernel`: its `kernel` (scale
    channels on the last axis) and `bias` (or None).
    """
    size = int(layer_plan.kernel.size)
    codes = math.ceil(size / 2) if bits <= 4 else size
    channels = int(np.prod(layer_plan.kernel.shape[-1:])) if layer_plan.bias is None else int(layer_plan.bias.size)
    scales = 4 * channels if per_channel else 4
    bias = 4 * int(layer_plan.bias.size) if layer_plan.bias is not None else 0
    return codes + scales + bias


def bits_step(context, settings, budget):
    """Mixed precision: bits per layer by measured loss sensitivity per byte, within `budget`.

    Each layer's sensitivity at `b` bits is the loss change with that layer
    alone at `b` bits (exponent and clip refitted). Starting from 8 bits
    everywhere, the move that saves cost at the least loss per unit saved
    is taken until the budget holds; what is left is then spent where it
    lowers the loss most. Unlike the other steps it trades loss for size:
    its loss can rise when the budget is below the starting size.

    Args:
        budget: `("bytes", limit)` on the quantized layers' variable bytes,
            or `("bits", limit)` on their summed kernel bits.
    """
    loss = context.objective
    base_loss = loss(settings)
    report = StepReport("bits", base_loss, base_loss)
    unit, limit = budget
    layer_plans = {p.layer.name: p for p in context.plan.layers.values()}

    def cost(name, bits):
        s = settings.kernels[name]
        if unit == "bits":
            return bits * int(layer_plans[name].kernel.size)
        return kernel_bytes(layer_plans[name], bits, s.per_channel)

    names = list(settings.kernels)
    candidates, sensitivity = {}, {}
    for done, name in enumerate(names, start=1):
        candidates[name], sensitivity[name] = {}, {}
        for bits in BIT_CHOICES:
            s = settings.kernels[name]
            candidate = _refit(context, name, dataclasses.replace(s, bits=bits), clip=True)
            candidates[name][bits] = candidate
            sensitivity[name][bits] = (
                0.0 if candidate == s else loss(settings.replace(kernels={name: candidate})) - base_loss
            )
        context.report_progress("refine: bits", done, len(names))

    allocation = {name: max(BIT_CHOICES) for name in names}
    total = sum(cost(n, b) for n, b in allocation.items())
    while total > limit:
        best_move, best_ratio = None, None
        for name in names:
            current = allocation[name]
            for lower in BIT_CHOICES:
                saved = cost(name, current) - cost(name, lower)
                if lower >= current or saved <= 0:
                    continue
                ratio = (sensitivity[name][lower] - sensitivity[name][current]) / saved
                if best_ratio is None or ratio < best_ratio:
                    best_move, best_ratio = (name, lower), ratio
        if best_move is None:
            break
        allocation[best_move[0]] = best_move[1]
        total = sum(cost(n, b) for n, b in allocation.items())
    # Spend what the last reductions left over, where it lowers the loss most.
    while True:
        best_move, best_gain = None, 0.0
        for name in names:
            current = allocation[name]
            for higher in BIT_CHOICES:
                extra = cost(name, higher) - cost(name, current)
                gain = sensitivity[name][current] - sensitivity[name][higher]
                if higher <= current or total + extra > limit or gain <= 0:
                    continue
                if gain > best_gain:
                    best_move, best_gain = (name, higher), gain
        if best_move is None:
            break
        total += cost(best_move[0], best_move[1]) - cost(best_move[0], allocation[best_move[0]])
        allocation[best_move[0]] = best_move[1]
    # Among bit widths of equal cost, the most accurate (5..8 bits store one byte per code).
    for name in names:
        same_cost = [b for b in BIT_CHOICES if cost(name, b) == cost(name, allocation[name])]
        allocation[name] = min(same_cost, key=lambda b: (sensitivity[name][b], -b))

    allocated = settings.replace(kernels={name: candidates[name][allocation[name]] for name in names})
    allocated_loss = loss(allocated)
    for name in names:
        report.decisions.append(
            {
                "name": name,
                "bits": allocation[name],
                "cost": cost(name, allocation[name]),
                "sensitivity": {str(b): sensitivity[name][b] for b in BIT_CHOICES},
            }
        )
    report.notes.append(f"{unit}: {total} of a budget of {limit}")
    report.loss_after = allocated_loss
    return allocated, report


# AdaRound's schedule (Nagel et al. 2020): no regulariser for the first
# fifth of the iterations, then beta annealed from 20 to 2.
_ROUNDING_WARMUP = 0.2
_BETA_RANGE = (20.0, 2.0)
_ROUNDING_WEIGHT = 0.01
# Samples in each gradient batch of learned rounding.
_GRADIENT_BATCH = 32


def _rounding_train_step(layer, optimizer):
    """One compiled Adam step on `layer.rounding`: reconstruction error plus AdaRound's regulariser."""
    import tensorflow as tf

    from keras_powerquant.refinement.tunable import rectified_sigmoid

    @tf.function
    def train_step(x, y, beta, weight):
        with tf.GradientTape() as tape:
            error = tf.reduce_mean(tf.square(layer(x) - y))
            h = rectified_sigmoid(layer.rounding)
            regulariser = tf.reduce_mean(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))
            loss = error + weight * regulariser
        gradients = tape.gradient(loss, [layer.rounding.value])
        optimizer.apply_gradients(zip(gradients, [layer.rounding]))
        return error

    return train_step


def _gradient_batches(size, iterations, seed):
    """Index arrays of learned rounding's gradient batches: `_GRADIENT_BATCH` samples each.

    Always that many, drawn with replacement from smaller sets: TensorFlow
    2.21's oneDNN Conv2DBackpropFilter aborts or corrupts memory on 1x1
    stride-2 convolutions at some batch sizes (9, 31, 33, 39, 63 failed;
    16, 32, 48, 64 ran).
    """
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        yield rng.choice(size, _GRADIENT_BATCH, replace=size < _GRADIENT_BATCH)


def rounding_step(context, settings, iterations=ROUNDING_ITERATIONS):
    """Learned rounding (AdaRound), layer by layer.

    For each quantized layer in graph order, with the layers before it
    already rounded, minimises by gradient descent (Adam)

        mean (layer(x) - layer_q(x_q))^2 + lambda sum (1 - |2 h(V) - 1|^beta) / n

    over its rounding variables `V`, where `x` is the layer's input in the
    float network and `x_q` in the quantized one. The codes then round up
    where `V >= 0`. The step keeps the result only if the network loss does
    not rise. Exponents stay as LAPQ left them: learning them by gradient,
    jointly with the rounding variables or alone (docs/method.md §8), did
    not lower the network loss in our trials.
    """
    import keras
    import tensorflow as tf

    from keras_powerquant.refinement.tunable import rounding_logits
    from keras_powerquant.refinement.tunable import SOFT

    objective = context.objective
    start_loss = objective(settings)
    report = StepReport("rounding", start_loss, start_loss)
    names = list(settings.kernels)
    current = settings
    for done, name in enumerate(names, start=1):
        layer = objective.kernel_layers[name]
        reader = keras.Model(objective.model.inputs, layer.input)
        objective.assign(current, quantized=False)
        float_inputs = [reader(_inputs(xs), training=False) for xs in objective.batches]
        targets = [layer(x) for x in float_inputs]
        objective.assign(current)
        quantized_inputs = []
        for index, xs in enumerate(objective.batches):
            objective.use_batch(index)
            quantized_inputs.append(reader(_inputs(xs), training=False))
        # The reconstruction is AdaRound's, of the layer's output without its bias correction.
        layer.correcting.assign(0.0)
        objective.forget(layer.correcting)
        powered = layer.powered_codes().numpy()
        layer.rounding.assign(rounding_logits(powered - np.floor(powered)))
        layer.rounding_mode.assign(SOFT)
        objective.forget(layer.rounding)
        objective.forget(layer.rounding_mode)
        x_q = tf.concat(quantized_inputs, 0)
        target = tf.concat(targets, 0)
        warmup = int(iterations * _ROUNDING_WARMUP)
        first_error = last_error = None
        # While trained, the layer computes its kernel from the rounding variables on each call.
        layer.live = True
        try:
            train_step = _rounding_train_step(layer, keras.optimizers.Adam(learning_rate=1e-2))
            for step, index in enumerate(_gradient_batches(int(x_q.shape[0]), iterations, seed=done)):
                progress = max(step - warmup, 0) / max(iterations - warmup, 1)
                beta = _BETA_RANGE[0] + (_BETA_RANGE[1] - _BETA_RANGE[0]) * progress
                weight = 0.0 if step < warmup else _ROUNDING_WEIGHT
                error = train_step(
                    tf.gather(x_q, index), tf.gather(target, index), tf.constant(beta), tf.constant(weight)
                )
                error = float(error)
                first_error = error if first_error is None else first_error
                last_error = error
        finally:
            layer.live = False
        rounding_up = layer.rounding.numpy() >= 0
        current = current.replace(rounding={name: rounding_up})
        report.decisions.append(
            {
                "name": name,
                "reconstruction_error_first_batch": first_error,
                "reconstruction_error_last_batch": last_error,
                "rounded_up_fraction": float(rounding_up.mean()),
            }
        )
        context.report_progress("refine: rounding", done, len(names))
    final_loss = objective(current)
    if final_loss > start_loss:
        report.notes.append(f"learned rounding raised the network loss to {final_loss:.6g}: kept rounding to nearest")
        objective(settings)
        return settings, report
    report.loss_after = final_loss
    return current, report


def _inputs(xs):
    return xs if len(xs) > 1 else xs[0]

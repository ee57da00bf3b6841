"""Synthetic calibration inputs generated from the model itself (ZeroQ, retro-synthesis).

Starting from seeded random inputs `X`, gradient descent on `X` alone (the
model frozen, in inference mode) minimises

    sum over BatchNorm calls l of
        (||mean_b(z_l) - mu_l||^2 + ||std_b(z_l) - sigma_l||^2) / (C_l * s_l^2)

where `z_l` is the BatchNorm's input, `mean_b` / `std_b` are taken per
channel over the batch and spatial axes, `mu_l` is the moving mean,
`sigma_l = sqrt(moving_variance + epsilon)`, `C_l` the number of channels
and `s_l^2` the mean of `sigma_l^2` over channels: each layer's term is a
relative error, so a network fed raw 0-255 pixels weighs its layers as one
fed `x / 255` does. For a classifier (an output of softmax or a linear
`Dense`), a cross-entropy term pulls sample `i` to a target class; the
targets cycle through a seeded permutation of the classes, so they are
spread evenly over the samples (retro-synthesis' class-conditioned
variant; ZeroQ uses the BatchNorm term alone).

Inputs are optimised in batches: each batch is its own optimisation, with
BatchNorm statistics taken over that batch.
"""

import dataclasses
import logging
import math
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.errors import UnsupportedModelError
from keras_powerquant.limits import DEFAULT_NUM_SAMPLES
from keras_powerquant.limits import DEFAULT_STEPS
from keras_powerquant.loading import resolve_model
from keras_powerquant.quantization.validation import check_integer

logger = logging.getLogger("keras_powerquant")

DEFAULT_LEARNING_RATE = 0.1
DEFAULT_BATCH_SIZE = 64
# Input channels given their own starting offset (see `_affine_start`).
_MAX_OFFSET_CHANNELS = 16
# Progress reports (and loss read-backs) per batch.
_PROGRESS_UPDATES = 5


@dataclasses.dataclass
class Synthesis:
    """Synthetic inputs and how they were made.

    Attributes:
        inputs: list of numpy arrays, one per model input (model input order),
            each `(num_samples,) + input_shape[1:]` in the input's dtype.
        classes: int array `(num_samples,)` of target classes, or None
            without a class term.
        batch_norms: number of BatchNorm calls matched.
        classifier_outputs: names of the outputs given a class term.
        batchnorm_loss: the BatchNorm term at the end, averaged over batches
            (None without BatchNorm).
        class_loss: the cross-entropy term at the end, averaged over batches.
        steps: optimisation steps per batch.
        seconds: wall time.
        notes: one-line remarks for the conversion report.
    """

    inputs: list
    classes: Optional[np.ndarray]
    batch_norms: int
    classifier_outputs: list
    batchnorm_loss: Optional[float]
    class_loss: Optional[float]
    steps: int
    seconds: float
    notes: list


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """`calibration_data` for `convert`: generate synthetic inputs with these options.

    `convert(model, calibration_data="synthetic")` is
    `convert(model, calibration_data=SyntheticData())`. The fields are the
    keyword arguments of `synthesize_inputs`.
    """

    num_samples: int = DEFAULT_NUM_SAMPLES
    seed: int = 0
    steps: int = DEFAULT_STEPS
    learning_rate: float = DEFAULT_LEARNING_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    input_range: Optional[tuple] = None
    class_term: bool = True
    time_limit: Optional[float] = None

    def __post_init__(self):
        _check_options(self.num_samples, self.seed, self.steps, self.learning_rate, self.batch_size,
                       self.input_range, self.time_limit)

    def generate(self, model, progress=None):
        """Runs `synthesize` on a loaded model with these options; returns a `Synthesis`."""
        return synthesize(model, progress=progress, **dataclasses.asdict(self))


def _check_options(num_samples, seed, steps, learning_rate, batch_size, input_range, time_limit=None):
    check_integer(num_samples, "num_samples", 1)
    if time_limit is not None and not (
        isinstance(time_limit, (int, float)) and not isinstance(time_limit, bool)
        and math.isfinite(time_limit) and time_limit > 0
    ):
        raise ValueError(f"`time_limit` must be a finite number of seconds > 0, or None; got {time_limit!r}.")
    check_integer(seed, "seed", 0)
    check_integer(steps, "steps", 0)
    check_integer(batch_size, "batch_size", 1)
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`learning_rate` must be a finite number > 0; got {learning_rate!r}.")
    if input_range is not None:
        try:
            low, high = (float(v) for v in input_range)
        except (TypeError, ValueError):
            raise ValueError(f"`input_range` must be a pair (low, high); got {input_range!r}.") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"`input_range` must satisfy low < high, both finite; got {input_range!r}.")


def synthesize_inputs(
    model,
    num_samples=DEFAULT_NUM_SAMPLES,
    *,
    seed=0,
    steps=DEFAULT_STEPS,
    learning_rate=DEFAULT_LEARNING_RATE,
    batch_size=DEFAULT_BATCH_SIZE,
    input_range=None,
    class_term=True,
    classes=None,
    time_limit=None,
    progress=None,
):
    """Generates calibration inputs from a model's BatchNorm statistics and classifier head.

    Random inputs are optimised with Adam so that every BatchNorm layer's
    input has, per channel over the batch and spatial axes, the mean and
    standard deviation the layer recorded in training (its moving mean and
    `sqrt(moving_variance + epsilon)`), and, for a classifier, so that each
    sample is classified as its target class. See the module docstring for
    the loss. The result is deterministic for a given seed.

    Args:
        model: a Functional or Sequential `keras.Model`, or the path of a
            `.keras` or `.h5` file (loaded as `convert` loads it).
        num_samples: number of samples to generate, >= 1.
        seed: seed of the initial inputs and the class targets, >= 0.
        steps: Adam steps per batch, >= 0 (0 returns the initial inputs).
        learning_rate: Adam's learning rate on the unit-scale variables
            (see `input_range`).
        batch_size: samples optimised together; BatchNorm statistics are
            matched over each batch.
        input_range: optional `(low, high)` of the model's inputs (e.g.
            `(0, 255)` for raw pixels, `(0, 1)` for `x / 255`). Inputs are
            then `low + (high - low) * sigmoid(v)` and never leave the range.
            Without it, inputs are `scale * v` with `scale` chosen from the
            first BatchNorm so that its input starts at the recorded
            standard deviation (1 for a model without BatchNorm).
        class_term: add the cross-entropy term for classifier outputs.
        classes: optional int array `(num_samples,)` of target classes;
            by default a seeded permutation of the classes, repeated.
        time_limit: optional bound in seconds: once it has passed, every
            batch stops after the step that is running (its inputs as they
            are then; the result then depends on the machine's speed, and
            the notes say how many steps were run).
        progress: optional callback `progress(stage, done, total)`, the
            `convert` protocol: `done` of `total` steps over all batches,
            and the stage names the current loss ("synthesis (loss 0.12)").

    Returns:
        A numpy array `(num_samples,) + input_shape[1:]` in the input's
        dtype for a single-input model; a list of such arrays, in
        `model.inputs` order, for several inputs.

    Raises:
        UnsupportedModelError: the model has neither a BatchNorm layer nor
            a classifier output (or has non-float or not fully defined
            input shapes).
        ModelLoadError: `model` is a path that cannot be loaded.
        ValueError: invalid options.
    """
    result = synthesize(
        model, num_samples, seed=seed, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
        input_range=input_range, class_term=class_term, classes=classes, time_limit=time_limit,
        progress=progress,
    )
    for note in result.notes:
        logger.info(note)
    return result.inputs[0] if len(result.inputs) == 1 else result.inputs


def _batch_norm_targets(graph):
    """`[(input key, axis, mean, std)]` of each BatchNorm call, as float32 numpy."""
    targets = []
    for op in graph.ops:
        layer = op.layer
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        mean = keras.ops.convert_to_numpy(layer.moving_mean).astype(np.float32)
        variance = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float32)
        std = np.sqrt(variance + np.float32(layer.epsilon))
        targets.append((op.input_key, layer.axis, mean, std))
    return targets


def _softmax_layer(layer):
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


def _classifier_outputs(graph):
    """`[(output index, num classes, from_logits, layer name)]` of the outputs that look like classifiers.

    Softmax outputs (a softmax activation, layer or `Activation`) give
    probabilities; a linear `Dense` output with at least 2 units gives logits.
    """
    heads = []
    for index, key in enumerate(graph.output_keys):
        op = graph.producer.get(key)
        if op is None:
            continue
        shape = op.output_tensors[op.output_keys.index(key)].shape
        classes = shape[-1]
        if classes is None or classes < 2 or len(shape) != 2:
            continue
        if _softmax_layer(op.layer):
            heads.append((index, int(classes), False, op.layer.name))
        elif isinstance(op.layer, keras.layers.Dense) and op.layer.activation in (
            keras.activations.linear, None
        ):
            heads.append((index, int(classes), True, op.layer.name))
    return heads


def _check_inputs(graph):
    for tensor in graph.input_tensors:
        if not tf.as_dtype(tensor.dtype).is_floating:
            raise UnsupportedModelError(
                f"Input '{tensor.name}' has dtype {tensor.dtype}: synthetic inputs are found by "
                "gradient descent and need float inputs; pass real calibration data instead."
            )
        if any(d is None for d in tensor.shape[1:]):
            raise UnsupportedModelError(
                f"Input '{tensor.name}' has shape {tuple(tensor.shape)}: synthetic inputs need every "
                "dimension but the batch defined; rebuild the model with a fixed input shape."
            )


def _target_classes(num_samples, heads, seed, classes):
    if not heads:
        return None
    count = min(num for _, num, _, _ in heads)
    if classes is not None:
        classes = np.asarray(classes)
        if classes.shape != (num_samples,) or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"`classes` must be {num_samples} integers; got shape {classes.shape}.")
        if classes.min() < 0 or classes.max() >= count:
            raise ValueError(f"`classes` must lie in [0, {count}); got {classes.min()}..{classes.max()}.")
        return classes.astype(np.int64)
    order = np.random.default_rng([seed, 1]).permutation(count)
    return order[np.arange(num_samples) % count]


def _model_inputs(graph):
    return [(tuple(t.shape[1:]), t.dtype) for t in graph.input_tensors]


class _Objective:
    """The loss of a batch of inputs, as a TensorFlow function of the input variables."""

    def __init__(self, graph, batch_norms, heads, input_range, affine):
        self.graph = graph
        self.batch_norms = batch_norms
        self.heads = heads
        self.input_range = input_range
        self.affine = affine
        self.keys = {key for key, _, _, _ in batch_norms}

    def inputs(self, variables):
        """The model inputs represented by the optimised variables."""
        if self.input_range is None:
            return [scale * v + offset for v, (scale, offset) in zip(variables, self.affine)]
        low, high = self.input_range
        return [low + (high - low) * tf.sigmoid(v) for v in variables]

    def __call__(self, variables, targets):
        inputs = self.inputs(variables)
        outputs, kept = self.graph.evaluate(
            inputs, lambda op, args, kwargs: op.run(args, kwargs, training=False), keep=self.keys
        )
        batchnorm_loss = tf.constant(0.0)
        for key, axis, mean, std in self.batch_norms:
            z = tf.cast(kept[key], tf.float32)
            axes = [a for a in range(len(z.shape)) if a != axis % len(z.shape)]
            batch_mean, batch_var = tf.nn.moments(z, axes)
            batch_std = tf.sqrt(batch_var + 1e-8)
            norm = float(np.mean(std**2)) * mean.size
            batchnorm_loss += (
                tf.reduce_sum(tf.square(batch_mean - mean)) + tf.reduce_sum(tf.square(batch_std - std))
            ) / norm
        class_loss = tf.constant(0.0)
        for index, _, from_logits, _ in self.heads:
            class_loss += tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    targets, tf.cast(outputs[index], tf.float32), from_logits=from_logits
                )
            )
        return batchnorm_loss, class_loss


def _run_until(graph, inputs, key):
    """The value of tensor `key` for `inputs` (numpy), float64."""
    _, kept = graph.evaluate(
        [tf.constant(x) for x in inputs],
        lambda op, args, kwargs: op.run(args, kwargs, training=False),
        keep={key},
    )
    return keras.ops.convert_to_numpy(kept[key]).astype(np.float64)


def _affine_start(graph, batch_norms, input_shapes, seed):
    """Per-input `(scale, offset)` starting the first BatchNorm's input near its recorded statistics.

    The first BatchNorm usually follows an affine map of the inputs (a
    convolution, a rescaling), so its input's standard deviation is
    proportional to the inputs' scale, and its per-channel mean is affine in
    a per-channel offset of the inputs. One forward pass on unit-variance
    inputs gives the scale; one more per input channel (up to
    `_MAX_OFFSET_CHANNELS`, else one shared offset) gives the offsets by
    least squares. Nonlinear paths make this an approximation that the
    optimisation then corrects.
    """
    if not batch_norms:
        return [(1.0, np.zeros(shape[-1:], np.float32)) for shape, _ in input_shapes]
    key, axis, target_mean, target_std = batch_norms[0]
    rng = np.random.default_rng([seed, 2])
    unit = [rng.standard_normal((16,) + shape).astype(np.float32) for shape, _ in input_shapes]

    def channel_moments(value):
        axes = tuple(a for a in range(value.ndim) if a != axis % value.ndim)
        return value.mean(axis=axes), value.std(axis=axes)

    _, measured = channel_moments(_run_until(graph, unit, key))
    ratio = target_std[measured > 0] / measured[measured > 0]
    scale = float(np.median(ratio)) if ratio.size else 1.0
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    scaled = [scale * x for x in unit]
    base, _ = channel_moments(_run_until(graph, scaled, key))
    # Columns of the Jacobian of the BatchNorm's mean w.r.t. each offset, by finite differences of size `scale`.
    columns, starts = [], []
    for index, x in enumerate(scaled):
        channels = x.shape[-1] if x.shape[-1] <= _MAX_OFFSET_CHANNELS else 1
        for channel in range(channels):
            shift = np.zeros(x.shape[-1], np.float32)
            shift[channel if channels > 1 else slice(None)] = scale
            shifted = [y + shift if i == index else y for i, y in enumerate(scaled)]
            mean, _ = channel_moments(_run_until(graph, shifted, key))
            columns.append((mean - base) / scale)
        starts.append((index, channels))
    jacobian = np.stack(columns, axis=1)
    solution = np.linalg.lstsq(jacobian, target_mean - base, rcond=None)[0]
    result, column = [], 0
    for (_, channels), (shape, _) in zip(starts, input_shapes):
        offset = np.broadcast_to(solution[column : column + channels], shape[-1:]).astype(np.float32)
        offset = np.where(np.isfinite(offset), offset, 0.0).astype(np.float32)
        result.append((scale, offset))
        column += channels
    return result


def synthesize(
    model,
    num_samples=DEFAULT_NUM_SAMPLES,
    *,
    seed=0,
    steps=DEFAULT_STEPS,
    learning_rate=DEFAULT_LEARNING_RATE,
    batch_size=DEFAULT_BATCH_SIZE,
    input_range=None,
    class_term=True,
    classes=None,
    time_limit=None,
    progress=None,
):
    """`synthesize_inputs`, returning a `Synthesis` (inputs, targets, losses, notes)."""
    _check_options(num_samples, seed, steps, learning_rate, batch_size, input_range, time_limit)
    started = time.perf_counter()
    deadline = None if time_limit is None else started + time_limit
    model, notes = resolve_model(model)
    graph = FlatGraph(model)
    _check_inputs(graph)
    batch_norms = _batch_norm_targets(graph)
    heads = _classifier_outputs(graph) if class_term else []
    if not batch_norms and not heads:
        what = "no classifier output (softmax, or a linear Dense with 2+ units)"
        if not class_term:
            what = "the class term is off (class_term=False)"
        raise UnsupportedModelError(
            f"Cannot synthesize inputs for model '{model.name}': it has no BatchNormalization layer "
            f"and {what}. Pass real calibration data instead."
        )
    targets = _target_classes(num_samples, heads, seed, classes)
    input_shapes = _model_inputs(graph)
    if input_range is not None:
        input_range = (float(input_range[0]), float(input_range[1]))
    affine = _affine_start(graph, batch_norms, input_shapes, seed) if input_range is None else None
    objective = _Objective(graph, batch_norms, heads, input_range, affine)

    head_names = [name for _, _, _, name in heads]
    if batch_norms:
        notes.append(
            f"synthetic inputs: {num_samples} samples, {steps} Adam steps, matching "
            f"{len(batch_norms)} BatchNorm layer(s)"
            + (f" and the classes of layer(s) {', '.join(head_names)}" if heads else ", no class term")
        )
    else:
        notes.append(
            f"synthetic inputs: {num_samples} samples, {steps} Adam steps; the model has no "
            f"BatchNorm layer, so they use the class term alone (layer(s) {', '.join(head_names)})"
        )

    batches = [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]
    total = len(batches) * steps
    pieces = [[] for _ in input_shapes]
    losses, steps_run = [], []
    optimisers = {}
    for number, (start, stop) in enumerate(batches):
        count = stop - start
        if count not in optimisers:
            optimisers[count] = _BatchOptimiser(objective, input_shapes, count, learning_rate)
        rng = np.random.default_rng([seed, 3, number])
        initial = [rng.standard_normal((count,) + shape).astype(np.float32) for shape, _ in input_shapes]
        batch_targets = np.zeros(count, np.int64) if targets is None else targets[start:stop]
        values, loss, ran = optimisers[count].run(
            initial, batch_targets, steps, progress=progress, done=number * steps, total=total,
            deadline=deadline,
        )
        steps_run.append(ran)
        for piece, value in zip(pieces, values):
            piece.append(value)
        losses.append(loss)
    inputs = [np.concatenate(piece).astype(dtype) for piece, (_, dtype) in zip(pieces, input_shapes)]
    batchnorm_loss = float(np.mean([b for b, _ in losses])) if batch_norms else None
    class_loss = float(np.mean([c for _, c in losses])) if heads else None
    if min(steps_run) < steps:
        notes.append(
            f"synthetic inputs: the time limit of {time_limit:g} s stopped the optimisation after "
            f"{min(steps_run)} to {max(steps_run)} of {steps} steps per batch (the inputs depend on "
            "the machine's speed)"
        )
    return Synthesis(
        inputs=inputs,
        classes=targets,
        batch_norms=len(batch_norms),
        classifier_outputs=head_names,
        batchnorm_loss=batchnorm_loss,
        class_loss=class_loss,
        steps=steps,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


class _BatchOptimiser:
    """Adam on the variables of one batch size; reused, without retracing, by batches of that size."""

    def __init__(self, objective, input_shapes, count, learning_rate):
        self.objective = objective
        self.variables = [tf.Variable(tf.zeros((count,) + shape)) for shape, _ in input_shapes]
        self.targets = tf.Variable(tf.zeros((count,), tf.int64))
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(self.variables)
        # Its state as built (zero moments, step 0, the learning rate), restored for each batch.
        self.fresh_state = [keras.ops.convert_to_numpy(v) for v in self.optimizer.variables]

    @tf.function
    def _step(self):
        with tf.GradientTape() as tape:
            batchnorm_loss, class_loss = self.objective(self.variables, self.targets)
            loss = batchnorm_loss + class_loss
        self.optimizer.apply(tape.gradient(loss, self.variables), self.variables)
        return batchnorm_loss, class_loss

    def run(self, initial, targets, steps, progress, done, total, deadline=None):
        """Optimises from `initial` for `steps` steps, or until `time.perf_counter()` passes
        `deadline`; returns `(input arrays, (batchnorm loss, class loss), steps run)`."""
        for variable, value in zip(self.variables, initial):
            variable.assign(value)
        self.targets.assign(targets)
        for variable, value in zip(self.optimizer.variables, self.fresh_state):
            variable.assign(value)
        every = max(1, steps // _PROGRESS_UPDATES)
        stage = "synthesis"
        ran = 0
        for i in range(steps):
            if deadline is not None and time.perf_counter() > deadline:
                break
            ran += 1
            batchnorm_loss, class_loss = self._step()
            if progress is not None:
                if (i + 1) % every == 0 or i + 1 == steps:
                    stage = f"synthesis (loss {float(batchnorm_loss) + float(class_loss):.4g})"
                progress(stage, done + i + 1, total)
        # Eagerly: one forward pass costs less than tracing it.
        batchnorm_loss, class_loss = self.objective(self.variables, self.targets)
        inputs = self.objective.inputs(self.variables)
        return [keras.ops.convert_to_numpy(x) for x in inputs], (float(batchnorm_loss), float(class_loss)), ran

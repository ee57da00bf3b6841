"""The network loss that refinement minimises, evaluated on a calibration subsample.

With labels: the mean cross-entropy of the quantized model's predictions.
Without: the mean KL divergence `KL(float || quantized)` between the float
and the quantized model's class distributions. Outputs that are not class
scores (rank other than 2, or one column) contribute their mean squared
error relative to the float output's mean square. Class scores are read as
probabilities when the float model's rows are non-negative and sum to 1,
as logits otherwise.
"""

import time

import numpy as np
import tensorflow as tf

from keras_powerquant.refinement.tunable import CODES
from keras_powerquant.refinement.tunable import FLOAT
from keras_powerquant.refinement.tunable import HARD
from keras_powerquant.refinement.tunable import NEAREST
from keras_powerquant.refinement.tunable import TunableBuilder

_EPSILON = 1e-7


def _is_probabilities(values):
    return bool(np.all(values >= 0) and np.allclose(values.sum(axis=-1), 1.0, atol=1e-3))


def _log_probabilities(values, probabilities):
    if probabilities:
        return tf.math.log(tf.clip_by_value(values, _EPSILON, 1.0))
    return tf.nn.log_softmax(values, axis=-1)


class NetworkObjective:
    """Loss of the quantized network for given `Settings`, on fixed calibration inputs.

    Builds the `TunableBuilder` model once; each call assigns the settings'
    values to its variables and runs it on the held inputs in batches.

    Args:
        graph, folds, plan, per_channel: as for `ModelBuilder` (the plan's
            fits filled in).
        inputs: flat list of arrays in model input order, `(N, ...)` each.
        labels: optional integer class labels `(N,)` (single-output
            classifiers): the loss is then the cross-entropy.
        batch_size: evaluation batch size.
        holdout_inputs, holdout_labels: optional samples kept apart from
            the steps, on which `holdout_loss` checks their results.
        correct_bias: evaluate the network as empirical bias correction
            leaves it (see `tunable`): each channels-last layer's output
            mean is moved back to the float model's on the batch.
    """

    def __init__(
        self,
        graph,
        folds,
        plan,
        per_channel,
        inputs,
        labels=None,
        batch_size=64,
        correct_bias=False,
        holdout_inputs=None,
        holdout_labels=None,
    ):
        builder = TunableBuilder(graph, folds, plan, per_channel)
        self.model = builder.build()
        self.kernel_layers = builder.kernel_layers
        self.activation_layers = builder.activation_layers
        # The layers whose output means the loss corrects, by name.
        self.correcting = {
            name: layer for name, layer in self.kernel_layers.items() if correct_bias and layer.corrects_mean
        }
        # Per batch, the float model's output means of the correcting layers (recorded on first use).
        self.reference_means = None
        self.size = int(inputs[0].shape[0])
        self.holdout_size = 0 if holdout_inputs is None else int(holdout_inputs[0].shape[0])
        # The steps' batches first, then the held-out ones.
        self._all_batches, self._labels = _batched(inputs, labels, batch_size)
        self.fit_batches = len(self._all_batches)
        if self.holdout_size:
            holdout_batches, holdout_labels = _batched(holdout_inputs, holdout_labels, batch_size)
            self._all_batches += holdout_batches
            self._labels += holdout_labels
        float_model = traced_inference(graph.model)
        references = [[np.asarray(o) for o in _flat(float_model(_model_inputs(xs)))] for xs in self._all_batches]
        self.kinds = [self._output_kind(np.concatenate([r[i] for r in references])) for i in range(len(references[0]))]
        self.references = [[tf.constant(o) for o in batch] for batch in references]
        self.labelled = labels is not None
        self._batch_loss = tf.function(self._batch_loss_eager)
        # A plain call of the evaluation model, for the passes that read its layers' variables after it.
        self._forward = traced_inference(self.model)
        self.evaluations = 0
        self.seconds = 0.0
        self._assigned = {}

    @staticmethod
    def _output_kind(values):
        if values.ndim == 2 and values.shape[1] > 1:
            return "probabilities" if _is_probabilities(values) else "logits"
        return "regression"

    @property
    def correcting_layers(self):
        return list(self.correcting.values())

    @property
    def batches(self):
        """The batches the steps fit on (flat input lists)."""
        return self._all_batches[: self.fit_batches]

    @property
    def criterion(self):
        if self.labelled:
            return "cross-entropy"
        return "KL(float || quantized)" if "regression" not in self.kinds else "KL / relative MSE"

    def _assign(self, variable, value):
        """Assigns `value` unless the variable holds it already; returns whether it changed."""
        # Skipping unchanged variables keeps an evaluation that moves one
        # coordinate (Powell's line searches) from assigning all of them.
        if self._assigned.get(id(variable)) == value:
            return False
        variable.assign(value)
        self._assigned[id(variable)] = value
        return True

    def assign(self, settings, quantized=True):
        """Sets the model's variables to `settings`; `quantized=False` makes it the float model."""
        for name, setting in settings.kernels.items():
            layer = self.kernel_layers[name]
            changed = [
                self._assign(layer.exponent, float(setting.exponent)),
                self._assign(layer.clip_fraction, float(setting.clip_fraction)),
                self._assign(layer.max_code, float(2 ** (setting.bits - 1) - 1)),
                self._assign(layer.per_channel_flag, 1.0 if setting.per_channel else 0.0),
            ]
            codes = settings.codes_for(name)
            rounding_up = None if codes is not None else settings.rounding.get(name)
            chosen = codes if codes is not None else rounding_up
            if chosen is not None:
                # The array changes with the settings that hold it: compare by identity.
                if self._assigned.get(id(layer.rounding)) is not chosen:
                    values = codes if codes is not None else np.where(rounding_up, 1.0, -1.0)
                    layer.rounding.assign(np.asarray(values, dtype=np.float32))
                    self._assigned[id(layer.rounding)] = chosen
                    changed.append(True)
            if not quantized:
                mode = FLOAT
            else:
                mode = CODES if codes is not None else (HARD if rounding_up is not None else NEAREST)
            changed.append(self._assign(layer.rounding_mode, mode))
            if any(changed):
                layer.refresh_kernel()
        for key, setting in settings.activations.items():
            layer = self.activation_layers[key]
            self._assign(layer.clip, float(setting.clip))
            self._assign(layer.exponent, float(setting.exponent))
            self._assign(layer.enabled, 1.0 if quantized else 0.0)
        for layer in self.correcting_layers:
            self._assign(layer.correcting, 1.0 if quantized else 0.0)

    def record_reference_means(self, settings):
        """Records, once, the float model's per-batch output means of the correcting layers.

        A capturing pass of the model with `settings` assigned as the float
        model; the variables stay so until the next `assign`.
        """
        if self.reference_means is not None or not self.correcting_layers:
            return
        self.assign(settings, quantized=False)
        for layer in self.correcting_layers:
            layer.capturing = True
        try:
            means = []
            for xs in self._all_batches:
                self.model(_model_inputs(xs), training=False)
                means.append([tf.constant(layer.reference_mean.numpy()) for layer in self.correcting_layers])
        finally:
            for layer in self.correcting_layers:
                layer.capturing = False
        self.reference_means = means

    def bias_shifts(self, settings):
        """The mean correction of each correcting layer over the held inputs, by layer name.

        With `settings` applied, each batch's shift `mean(y_hat) - mean(y)`
        (per output channel, upstream layers corrected) averaged over the
        batches, weighted by their sizes: float64 arrays of the bias' shape,
        to subtract from the exported layers' biases.
        """
        if not self.correcting_layers:
            return {}
        self.record_reference_means(settings)
        self.assign(settings)
        totals = dict.fromkeys(self.correcting, 0.0)
        for index, xs in enumerate(self.batches):
            self.use_batch(index)
            self._forward(_model_inputs(xs))
            weight = int(xs[0].shape[0])
            for name, layer in self.correcting.items():
                totals[name] += layer.applied_shift.numpy().astype(np.float64) * weight
        return {name: total / self.size for name, total in totals.items()}

    def use_batch(self, index):
        """Sets the correcting layers' float output means to those of batch `index` (for direct model calls)."""
        for layer, mean in zip(self.correcting_layers, self.batch_means(index)):
            layer.reference_mean.assign(mean)

    def batch_means(self, index):
        return self.reference_means[index] if self.reference_means is not None else []

    def forget(self, variable):
        """Marks a variable as changed outside `assign` (by an optimizer): the next `assign` sets it."""
        self._assigned.pop(id(variable), None)

    def __call__(self, settings):
        """The mean loss over the steps' inputs with `settings` applied."""
        started = time.perf_counter()
        loss = self._mean_loss(settings, range(self.fit_batches), self.size)
        self.evaluations += 1
        self.seconds += time.perf_counter() - started
        return loss

    def holdout_loss(self, settings):
        """The mean loss over the held-out inputs, or None without them.

        With bias correction, the held-out samples get the corrections
        measured on the steps' samples (`bias_shifts`), as the exported
        model would, not corrections measured on themselves.
        """
        if not self.holdout_size:
            return None
        shifts = self.bias_shifts(settings)
        for name, layer in self.correcting.items():
            layer.fixed_shift.assign(shifts[name].astype(np.float32))
            layer.shift_fixed.assign(1.0)
        try:
            return self._mean_loss(settings, range(self.fit_batches, len(self._all_batches)), self.holdout_size)
        finally:
            for layer in self.correcting_layers:
                layer.shift_fixed.assign(0.0)

    def _mean_loss(self, settings, indices, size):
        self.record_reference_means(settings)
        self.assign(settings)
        total = 0.0
        for i in indices:
            xs = self._all_batches[i]
            total += float(self._batch_loss(xs, self.references[i], self._labels[i], self.batch_means(i)))
        return total / size

    def _batch_loss_eager(self, xs, references, labels, reference_means):
        """Summed loss of one batch (traced once by `tf.function`)."""
        for layer, mean in zip(self.correcting_layers, reference_means):
            layer.reference_mean.assign(mean)
        outputs = _flat(self.model(_model_inputs(xs), training=False))
        loss = tf.constant(0.0)
        for output, reference, kind in zip(outputs, references, self.kinds):
            if kind == "regression":
                scale = tf.maximum(tf.reduce_mean(tf.square(reference)), _EPSILON)
                squared = tf.reshape(tf.square(output - reference), [tf.shape(output)[0], -1])
                loss += tf.reduce_sum(tf.reduce_mean(squared, axis=1)) / scale
                continue
            probabilities = kind == "probabilities"
            log_q = _log_probabilities(output, probabilities)
            if labels is not None:
                loss += -tf.reduce_sum(tf.gather(log_q, labels, axis=1, batch_dims=1))
            else:
                log_p = _log_probabilities(reference, probabilities)
                loss += tf.reduce_sum(tf.exp(log_p) * (log_p - log_q))
        return loss


def traced_inference(model):
    """`model(x, training=False)` as a `tf.function`: an eager Keras call is several times slower on a CPU.

    The trace fixes the layers' Python attributes (a tunable layer's `live`,
    `capturing`) as they are at its first call; their variables are read at
    every call.
    """
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def _batched(inputs, labels, batch_size):
    """`(batches, labels)`: flat input lists of `batch_size` samples, and their int32 labels (None each without)."""
    size = int(inputs[0].shape[0])
    starts = range(0, size, batch_size)
    batches = [[tf.constant(a[start : start + batch_size]) for a in inputs] for start in starts]
    if labels is None:
        return batches, [None] * len(batches)
    return batches, [tf.constant(np.asarray(labels[start : start + batch_size], dtype=np.int32)) for start in starts]


def _model_inputs(xs):
    return xs if len(xs) > 1 else xs[0]


def _flat(outputs):
    return tf.nest.flatten(outputs)

"""Calibration data: validation, batching and bounded-memory activation sampling."""

import collections.abc

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant.converter.graph import CompiledCalls
from keras_powerquant.errors import CalibrationDataError
from keras_powerquant.limits import DEFAULT_CALIBRATION_BATCH_SIZE

# Values kept per recorded tensor: enough to fit an 8-bit quantizer, and
# memory stays bounded however large the calibration set.
DEFAULT_SAMPLES_PER_TENSOR = 1 << 17


class ReservoirSampler:
    """A uniform sample, without replacement, of at most `capacity` values of a stream.

    After each chunk the values kept are a uniform `capacity`-subset of all
    values seen. Of the new subset, the number drawn from the chunk is
    hypergeometric (the chunk's `size` values among `seen + size`); the
    chunk's are picked from it, the others from the values kept, themselves
    a uniform subset of the values before it. Each chunk costs time in the
    values it gives, not in its size: an ImageNet model's activations are
    billions of values per calibration set, which drawing a priority per
    value took 6 ns each to sample. Deterministic for a given seed.
    """

    # numpy's hypergeometric sampler takes populations below 1e9; beyond,
    # the binomial (drawing with replacement) differs from it by less than
    # capacity / 1e9 of its spread.
    _HYPERGEOMETRIC_LIMIT = 10**9

    def __init__(self, capacity, seed):
        self.capacity = int(capacity)
        self._rng = np.random.default_rng(seed)
        self._values = np.empty(0, dtype=np.float32)
        self.seen = 0

    def add(self, chunk):
        chunk = np.asarray(chunk, dtype=np.float32).ravel()
        seen, size = self.seen, chunk.size
        self.seen += size
        if self._values.size + size <= self.capacity:
            self._values = np.concatenate([self._values, chunk])
            return
        if seen == 0:
            taken = self.capacity
        elif max(size, seen) < self._HYPERGEOMETRIC_LIMIT:
            taken = int(self._rng.hypergeometric(size, seen, self.capacity))
        else:
            taken = min(int(self._rng.binomial(self.capacity, size / (seen + size))), size)
        new = chunk[self._rng.choice(size, taken, replace=False)]
        if self._values.size < self.capacity:
            old = self._values[self._rng.choice(self._values.size, self.capacity - taken, replace=False)]
            # Shuffled, so that any prefix of the sample is a uniform sample too.
            self._values = self._rng.permutation(np.concatenate([old, new]))
        else:
            # The new values replace the old ones at uniformly chosen
            # positions, in random order: the sample stays shuffled, at a
            # cost in `taken` rather than in `capacity`.
            self._values[self._rng.choice(self.capacity, taken, replace=False)] = new

    @property
    def values(self):
        return self._values


def _describe_shape(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _check_input(array, tensor, index):
    name = tensor.name
    expected = _describe_shape(tensor.shape)
    if not isinstance(array, np.ndarray) or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        got = type(array).__name__ if not isinstance(array, np.ndarray) else f"dtype {array.dtype}"
        raise CalibrationDataError(
            f"Calibration input {index} ('{name}'): expected a numeric array of shape "
            f"{expected}; got {got}."
        )
    if array.ndim != len(tensor.shape) or any(
        d is not None and d != a for d, a in zip(tensor.shape[1:], array.shape[1:])
    ):
        raise CalibrationDataError(
            f"Calibration input {index} ('{name}'): expected shape {expected}; got "
            f"{_describe_shape(array.shape)}."
        )
    if array.shape[0] == 0:
        raise CalibrationDataError(
            f"Calibration input {index} ('{name}'): expected at least one sample; got shape "
            f"{_describe_shape(array.shape)}."
        )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise CalibrationDataError(
            f"Calibration input {index} ('{name}'): expected finite values; got {bad} NaN or "
            f"Inf value(s) in a batch of shape {_describe_shape(array.shape)}."
        )
    return array.astype(tensor.dtype if tensor.dtype else "float32", copy=False)


def _as_numpy(value):
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) and value and all(np.isscalar(v) for v in value):
        return np.asarray(value)
    return value


def _is_array(value):
    return isinstance(value, (np.ndarray, tf.Tensor, tf.Variable))


def _inputs_part(data, num_inputs):
    """The model inputs in `data`, read as `Model.fit`/`predict` read them, or None.

    An array, a dict by input name, or a list/tuple of one array per input
    (`[x]` for one input) are the inputs; a tuple `(x, y)` or
    `(x, y, sample_weight)` holds them in `x`.
    """
    if _is_array(data) or isinstance(data, dict):
        return data
    if isinstance(data, (list, tuple)) and data:
        if len(data) == num_inputs and not any(isinstance(v, (list, tuple, dict)) for v in data):
            return list(data)
        if isinstance(data, tuple) and len(data) in (2, 3):
            return _inputs_part(data[0], num_inputs)
    return None


def _describe_structure(value):
    if isinstance(value, (list, tuple)):
        kinds = sorted({"array" if _is_array(v) else type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {len(value)} ({', '.join(kinds) or 'nothing'})"
    return f"a {type(value).__name__}"


def _expected_structure(input_tensors):
    if len(input_tensors) == 1:
        tensor = input_tensors[0]
        return f"an array x of shape {_describe_shape(tensor.shape)} ('{tensor.name}'), [x] or (x, y)"
    names = ", ".join(t.name for t in input_tensors)
    return (
        f"a list of {len(input_tensors)} arrays [{names}], a dict of arrays by those names, "
        "or (inputs, y)"
    )


def _flat_inputs(item, input_tensors):
    """The model inputs of one batch (or of all in-memory data), a flat list in model input order."""
    inputs = _inputs_part(item, len(input_tensors))
    if isinstance(inputs, dict):
        missing = [t.name for t in input_tensors if t.name not in inputs]
        if missing:
            raise CalibrationDataError(
                f"Calibration batch lacks inputs {missing}; it has {sorted(inputs)}."
            )
        return [_as_numpy(inputs[t.name]) for t in input_tensors]
    if _is_array(inputs) and len(input_tensors) == 1:
        return [_as_numpy(inputs)]
    if isinstance(inputs, list):
        return [_as_numpy(v) for v in inputs]
    if isinstance(item, (list, tuple)) and item and all(np.isscalar(v) for v in item) and len(input_tensors) == 1:
        return [_as_numpy(item)]
    raise CalibrationDataError(
        f"The model has {len(input_tensors)} input(s): calibration data (or each of its batches) must be "
        f"{_expected_structure(input_tensors)}; got {_describe_structure(item)}."
    )


def calibration_batches(data, input_tensors, batch_size=DEFAULT_CALIBRATION_BATCH_SIZE, max_batches=None):
    """Yields validated batches, each a flat list of arrays in model input order.

    Args:
        data: the forms `Model.fit` and `predict` take: an array (one
            input), `[x]`, a list/tuple or dict of arrays (one per input,
            same length), `(x, y)` or `(x, y, sample_weight)` whose `x` is
            used, a `tf.data.Dataset`, or an iterable/generator of batches
            in any of these forms.
        input_tensors: the model's input KerasTensors.
        batch_size: batch size used to split in-memory arrays.
        max_batches: stop after this many batches.

    Raises:
        CalibrationDataError: on shapes, dtypes or structures that do not
            match the model inputs, non-finite values, or no data.
    """
    count = 0
    for arrays in _flat_batches(data, input_tensors, batch_size):
        if max_batches is not None and count >= max_batches:
            return
        yield [_check_input(a, t, i) for i, (a, t) in enumerate(zip(arrays, input_tensors))]
        count += 1
    if count == 0:
        raise CalibrationDataError(
            "The calibration data is empty: expected at least one batch of model inputs; got none."
        )


def count_batches(data, input_tensors, batch_size=DEFAULT_CALIBRATION_BATCH_SIZE, max_batches=None):
    """How many batches `calibration_batches` will yield, or None when it cannot be known beforehand.

    Known for in-memory arrays, sized sequences of batches and
    `tf.data.Dataset`s of finite cardinality; not for generators. Reads no
    data and raises nothing: `calibration_batches` validates.
    """
    count = None
    inputs = _inputs_part(data, len(input_tensors))
    values = inputs.values() if isinstance(inputs, dict) else [inputs] if _is_array(inputs) else inputs
    if inputs is not None and values and all(_is_array(v) for v in values):
        first = next(iter(values))
        if getattr(first, "shape", None) is not None and len(first.shape) and first.shape[0] is not None:
            count = -(-int(first.shape[0]) // batch_size)
    elif isinstance(data, tuple):
        count = 1
    elif isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        count = cardinality if cardinality >= 0 else None
    elif isinstance(data, collections.abc.Sized) and not isinstance(data, (str, bytes)):
        count = len(data)
    if max_batches is not None:
        count = max_batches if count is None else min(count, max_batches)
    return count


def _flat_batches(data, input_tensors, batch_size):
    """Batches of `data` as flat lists of arrays in model input order."""
    inputs = _inputs_part(data, len(input_tensors))
    values = inputs.values() if isinstance(inputs, dict) else [inputs] if _is_array(inputs) else inputs
    if inputs is not None and values and all(_is_array(v) for v in values):
        arrays = _flat_inputs(inputs, input_tensors)
        lengths = {a.shape[0] if isinstance(a, np.ndarray) and a.ndim else None for a in arrays}
        if len(lengths) != 1 or None in lengths:
            raise CalibrationDataError(
                "Calibration arrays must all hold the same number of samples; got "
                f"{[getattr(a, 'shape', None) for a in arrays]}."
            )
        total = lengths.pop()
        for start in range(0, total, batch_size):
            yield [a[start : start + batch_size] for a in arrays]
        return
    if isinstance(data, tuple):
        # A tuple is a structure, as in `fit`: (x, y) or one array per input.
        yield _flat_inputs(data, input_tensors)
        return
    if isinstance(data, tf.data.Dataset):
        items = data.as_numpy_iterator()
    elif isinstance(data, (str, bytes)) or not isinstance(data, collections.abc.Iterable):
        raise CalibrationDataError(
            "Calibration data must be a numpy array, a tf.data.Dataset or an iterable of "
            f"batches; got {type(data).__name__}."
        )
    else:
        items = data
    for item in items:
        yield _flat_inputs(item, input_tensors)


class InputMeans:
    """Per-position means of tensors over the first samples of a pass, in float64.

    A tensor's mean keeps every axis but the batch axis (one sample's
    shape): through a linear layer it gives that layer's exact mean output,
    zero padding at the borders included. Fed by `record_samples` from the
    pass that samples activations, so that empirical bias correction needs
    no float pass of its own. A batch counts while fewer than
    `max_samples` samples were counted before it (the batches `convert`
    keeps for the correction).

    Args:
        keys: the tensor keys to average.
        max_samples: samples after which batches no longer count.
    """

    def __init__(self, keys, max_samples):
        self.keys = list(dict.fromkeys(keys))
        self.max_samples = int(max_samples)
        self.samples = 0
        self._sums = dict.fromkeys(self.keys)

    @property
    def wants_more(self):
        return self.samples < self.max_samples

    def add(self, key, values):
        """Adds one batch's `values` of tensor `key` (then `count` the batch once its keys are added)."""
        # Each batch summed in float32 (TensorFlow's reduction, ten times
        # numpy's float64 one), the batches accumulated in float64.
        sums = tf.reduce_sum(values, axis=0).numpy().astype(np.float64)
        self._sums[key] = sums if self._sums[key] is None else self._sums[key] + sums

    def count(self, batch_size):
        """Counts a batch of `batch_size` samples, added for every key."""
        self.samples += int(batch_size)

    def means(self):
        """tensor key -> float64 mean, of one sample's shape."""
        return {key: self._sums[key] / self.samples for key in self.keys}


def record_samples(
    graph, batches, keys, capacity=DEFAULT_SAMPLES_PER_TENSOR, progress=None, input_means=None, eager_layers=()
):
    """Runs the float model on calibration batches and samples the given tensors.

    Args:
        graph: the model's `FlatGraph`.
        batches: iterable of flat input lists (from `calibration_batches`).
        keys: tensor keys to sample.
        capacity: values kept per tensor.
        progress: optional `progress(done_batches)` callback.
        input_means: optional `InputMeans`, fed in the same pass.
        eager_layers: ids of layers to call eagerly (`CompiledCalls`).

    Returns:
        A dict from key to a 1-D float32 array of sampled values.
    """
    keys = list(dict.fromkeys(keys))
    samplers = {key: ReservoirSampler(capacity, seed=i) for i, key in enumerate(keys)}
    call_op = CompiledCalls(eager=eager_layers)
    for done, batch in enumerate(batches, start=1):
        means = input_means if input_means is not None and input_means.wants_more else None
        # Each value is read as it is computed and dropped after its last
        # use: a batch never holds all the sampled tensors at once (4 GB for
        # 32 EfficientNet-Lite2 images).
        observe = _observer(samplers, means)
        graph.evaluate([keras.ops.convert_to_tensor(a) for a in batch], call_op, keep=set(), observe=observe)
        if means is not None:
            means.count(len(batch[0]))
        if progress is not None:
            progress(done)
    return {key: sampler.values for key, sampler in samplers.items()}


def _observer(samplers, means):
    """The `observe` of one batch: feeds `samplers` by key and, when not None, `means`."""
    mean_keys = set(means.keys) if means is not None else set()

    def observe(key, value):
        if key in samplers:
            # `np.asarray` views the tensor's buffer; `convert_to_numpy` copies it.
            samplers[key].add(np.asarray(value))
        if key in mean_keys:
            means.add(key, value)

    return observe

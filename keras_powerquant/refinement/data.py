"""The calibration subsample refinement evaluates on, and its labels.

Refinement runs the quantized network hundreds of times, so it holds a
fixed subsample of calibration inputs (never the whole set, nor any
activation of it): `InputReservoir` keeps a uniform random sample of whole
samples while the calibration batches stream by for activation statistics,
with their positions in the stream so labels can follow them.
"""

import numpy as np


class InputReservoir:
    """A uniform sample of at most `capacity` whole samples from a stream of batches.

    Deterministic for a seed. Memory: `capacity` samples plus one batch.

    Args:
        capacity: samples kept.
        seed: seed of the sample priorities.
    """

    def __init__(self, capacity, seed=0):
        self.capacity = int(capacity)
        self._rng = np.random.default_rng(seed)
        self._arrays = None
        self._priorities = np.empty(0)
        self._positions = np.empty(0, dtype=np.int64)
        self.seen = 0

    def add(self, batch):
        """Offers one batch (flat list of arrays, same first dimension)."""
        size = batch[0].shape[0]
        positions = np.arange(self.seen, self.seen + size)
        priorities = self._rng.random(size)
        self.seen += size
        if self._arrays is None:
            arrays = [np.asarray(a) for a in batch]
        else:
            arrays = [np.concatenate([kept, a]) for kept, a in zip(self._arrays, batch)]
        priorities = np.concatenate([self._priorities, priorities])
        positions = np.concatenate([self._positions, positions])
        if priorities.size > self.capacity:
            kept = np.sort(np.argpartition(priorities, self.capacity - 1)[: self.capacity])
            arrays = [a[kept] for a in arrays]
            priorities, positions = priorities[kept], positions[kept]
        self._arrays, self._priorities, self._positions = arrays, priorities, positions

    def watch(self, batches):
        """Yields `batches` unchanged, offering each to the reservoir."""
        for batch in batches:
            self.add(batch)
            yield batch

    @property
    def inputs(self):
        """The kept samples: flat list of arrays in stream order."""
        return self._arrays

    @property
    def positions(self):
        """Positions in the stream of the kept samples, ascending."""
        return self._positions


def check_labels(labels):
    """Validates `calibration_labels`: a 1-D array of non-negative integer class labels."""
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "`calibration_labels` must be a 1-D array of integer class labels (one per "
            f"calibration sample); got dtype {array.dtype} and shape {array.shape}."
        )
    if array.size and array.min() < 0:
        raise ValueError(f"`calibration_labels` must be >= 0; got {int(array.min())}.")
    return array


def in_memory_size(data):
    """The number of samples of in-memory calibration arrays, or None for streams."""
    if isinstance(data, np.ndarray):
        return data.shape[0] if data.ndim else None
    values = data.values() if isinstance(data, dict) else data
    if isinstance(data, (list, tuple, dict)) and values and all(isinstance(v, np.ndarray) for v in values):
        return next(iter(values)).shape[0]
    return None

"""Calibration in bounded passes over the data (issue 19): equal results, fewer passes.

The reference here is the empirical bias correction as it was before it ran
in one pass: one quantized-model pass per wave of layers that depend only on
earlier waves. The one-pass correction must give the same shifts.
"""

import importlib

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.converter import bias_correction as bc
from keras_powerquant.converter import calibration
from keras_powerquant.converter.registry import linear_type
from tests import models

# The module: the package exports the function `convert` under the same name.
convert_module = importlib.import_module("keras_powerquant.converter.convert")


def _waves(graph, plan):
    depth = {key: 0 for key in graph.input_keys}
    waves = {}
    for op in graph.ops:
        level = max((depth.get(k, 0) for k in op.input_keys), default=0)
        if id(op.layer) in plan.layers:
            waves.setdefault(level, []).append(id(op.layer))
            level += 1
        for key in op.output_keys:
            depth[key] = level
    return [waves[level] for level in sorted(waves)]


def _wave_corrections(graph, plan, model, quantized_layers, batches, progress=None):
    """The former `empirical_corrections`: one quantized pass per wave."""
    batches = bc._rebatched(batches, bc._PASS_BATCH_SIZE)
    layer_keys = list(plan.layers)
    input_keys = [plan.layers[key].input_key for key in layer_keys]

    def float_inputs(inputs):
        _, kept = graph.evaluate(inputs, lambda op, args, kwargs: op.layer(*args, **kwargs), keep=set(input_keys))
        return [kept[key] for key in input_keys]

    layers = [plan.layers[key].layer for key in layer_keys]
    ndims = [linear_type(layer).input_channel_ndim(layer) for layer in layers]
    float_means = dict(zip(layer_keys, bc._input_means(bc._summing(float_inputs, ndims), batches)))
    probe = keras.Model(model.inputs, [quantized_layers[key].input for key in layer_keys])
    probe_sums = bc._summing(lambda inputs: probe(inputs, training=False), ndims)
    corrections = {}
    for wave in _waves(graph, plan):
        quantized_means = dict(zip(layer_keys, bc._input_means(probe_sums, batches)))
        for key in wave:
            shift = bc._shift(plan.layers[key], quantized_layers[key], float_means[key], quantized_means[key])
            corrections[key] = bc.BiasCorrection("empirical", shift)
        bc.apply_corrections(quantized_layers, {key: corrections[key] for key in wave})
    return corrections


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_one_pass_bias_correction_equals_the_pass_per_wave(name, monkeypatch):
    """Same shifts (to float32 summation order) and same outputs as one pass per wave."""
    model = models.build(name)
    data = models.reference_inputs(model, n=160)
    monkeypatch.setattr(convert_module, "empirical_corrections", _wave_corrections)
    reference, reference_report = kpq.convert(model, 4, 4, calibration_data=data)
    monkeypatch.undo()
    quantized, report = kpq.convert(model, 4, 4, calibration_data=data)
    shifts = {layer.name: layer.bias_shift for layer in report.quantized_layers}
    reference_shifts = {layer.name: layer.bias_shift for layer in reference_report.quantized_layers}
    assert len(shifts) >= 5 and all(shift is not None for shift in shifts.values())
    for layer_name, shift in reference_shifts.items():
        assert shifts[layer_name] == pytest.approx(shift, rel=1e-4, abs=1e-6), layer_name
    for layer in quantized.layers:
        if getattr(layer, "bias", None) is not None and hasattr(layer, "dequantized_kernel"):
            np.testing.assert_allclose(
                layer.bias.numpy(), reference.get_layer(layer.name).bias.numpy(), rtol=1e-4, atol=1e-6
            )
    np.testing.assert_allclose(quantized.predict(data[:16], verbose=0), reference.predict(data[:16], verbose=0),
                               rtol=1e-3, atol=1e-4)


class _PlainReservoir(calibration.ReservoirSampler):
    """The sampler without its large-chunk shortcut: a partition over every value."""

    def add(self, chunk):
        chunk = np.asarray(chunk, dtype=np.float32).ravel()
        self.seen += chunk.size
        priorities = self._rng.random(chunk.size, dtype=np.float32)
        if self._values.size >= self.capacity:
            keep = priorities < self._priorities.max()
            chunk, priorities = chunk[keep], priorities[keep]
        values = np.concatenate([self._values, chunk])
        priorities = np.concatenate([self._priorities, priorities])
        if values.size > self.capacity:
            kept = np.argpartition(priorities, self.capacity - 1)[: self.capacity]
            values, priorities = values[kept], priorities[kept]
        self._values, self._priorities = values, priorities


@pytest.mark.parametrize("chunks", [[200_000, 50_000, 300_000], [3_000, 200_000, 7_000], [1_000_000]])
def test_reservoir_shortcut_keeps_the_same_sample(chunks):
    """Large chunks skip most of the partition; the kept values are the same set."""
    capacity = 10_000
    fast, plain = calibration.ReservoirSampler(capacity, seed=3), _PlainReservoir(capacity, seed=3)
    rng = np.random.default_rng(0)
    for size in chunks:
        chunk = rng.standard_normal(size).astype(np.float32)
        fast.add(chunk)
        plain.add(chunk)
        assert fast.values.size == plain.values.size <= capacity
    np.testing.assert_array_equal(np.sort(fast.values), np.sort(plain.values))
    assert fast.seen == plain.seen == sum(chunks)

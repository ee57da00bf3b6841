"""Calibration in bounded passes over the data (issue 19): equal results, fewer passes.

The reference here is the empirical bias correction as it was before it ran
in one pass: one quantized-model pass per wave of layers that depend only on
earlier waves. The one-pass correction must give the same shifts.
"""

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.converter import bias_correction as bc
from keras_powerquant.converter import calibration
from keras_powerquant.converter.registry import linear_type
from tests import models

# The module: the package exports the function `convert` under the same name.
correction_stage = importlib.import_module("keras_powerquant.pipeline.correction")


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


def _wave_corrections(graph, plan, model, quantized_layers, batches, progress=None, float_means=None):
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
    monkeypatch.setattr(correction_stage, "empirical_corrections", _wave_corrections)
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


def test_stage_clock_estimates_from_the_rate_after_the_first_item():
    from keras_powerquant.progress import format_seconds
    from keras_powerquant.progress import StageClock

    now = [0.0]
    clock = StageClock(lambda: now[0])
    now[0] = 10.0  # the first item also traced: 10 s
    assert clock.update("calibration", 1, 8) == (10.0, 70.0)
    now[0] = 12.0  # then 2 s per item
    assert clock.update("calibration", 2, 8) == (12.0, 12.0)
    now[0] = 16.0
    assert clock.update("calibration", 4, 8) == (16.0, 8.0)
    now[0] = 17.0  # a new stage starts at the last report; no total, no estimate
    assert clock.update("weights", 3, None) == (1.0, None)
    assert [format_seconds(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]


def test_calibration_batches_are_counted_beforehand():
    tensor = keras.Input((4,))
    x = np.zeros((70, 4), np.float32)
    assert calibration.count_batches(x, [tensor], 32) == 3
    assert calibration.count_batches((x, np.zeros(70)), [tensor], 32, max_batches=2) == 2
    assert calibration.count_batches([x], [tensor], 32) == 3  # [x]: the inputs
    assert calibration.count_batches([x[:8], x[8:16]], [tensor], 32) == 2  # a list of batches
    for data in ([x], [x[:8], x[8:16]], tf.data.Dataset.from_tensor_slices(x).batch(16)):
        count = sum(1 for _ in calibration.calibration_batches(data, [tensor], 32))
        assert calibration.count_batches(data, [tensor], 32) == count
    assert calibration.count_batches(tf.data.Dataset.from_tensor_slices(x).batch(16), [tensor]) == 5
    assert calibration.count_batches((b for b in [x]), [tensor]) is None


def test_cli_prints_each_stage_with_done_total_and_eta(tmp_path):
    """`kpq convert` with calibration data: every stage reports done/total, an ETA, and its time."""
    from tests.cli_helpers import invoke
    from tests.cli_helpers import random_images
    from tests.cli_helpers import save_small_model

    _, paths = save_small_model(tmp_path)
    np.save(tmp_path / "calib.npy", random_images(80, seed=5).astype("float32"))
    result = invoke("convert", paths["keras"], "-o", tmp_path / "out", "--calibration-data", tmp_path / "calib.npy")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    # 80 images in batches of 32: three batches, known before the first.
    assert any(line.startswith("  calibration: 1/3, ") and "ETA" in line for line in lines), lines
    assert any(line.startswith("  calibration: 3/3 in ") for line in lines), lines
    for stage in ("weights", "activations", "bias correction"):
        assert any(line.startswith(f"  {stage}: ") and "/" in line and " in " in line for line in lines), (
            stage, lines)


def test_calibrated_conversion_runs_the_float_model_once_per_batch(monkeypatch):
    """Sampling activations and the float means of bias correction share one pass."""
    from keras_powerquant.converter.graph import FlatGraph

    model = models.build("resnet")
    data = models.reference_inputs(model, n=96)
    calls = []
    evaluate = FlatGraph.evaluate

    def counting(self, inputs, call_op, keep=None):
        if self.model is model:
            calls.append(int(inputs[0].shape[0]))
        return evaluate(self, inputs, call_op, keep=keep)

    monkeypatch.setattr(FlatGraph, "evaluate", counting)
    _, report = kpq.convert(model, 4, 4, calibration_data=data, calibration_batch_size=32)
    assert report.options["bias_correction"] == "empirical"
    assert calls == [32, 32, 32]


def test_channel_means_count_only_the_first_samples():
    means = calibration.ChannelMeans({"a": 1, "b": 2}, max_samples=5)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 4, 2, 3)) for _ in range(3)]
    for batch in batches:
        if means.wants_more:
            means.add({"a": batch, "b": batch}, len(batch))
    counted = np.concatenate(batches[:2])  # 3 + 3 >= 5: the third batch is not counted
    np.testing.assert_allclose(means.means()["a"], counted.reshape(-1, 3).mean(axis=0))
    np.testing.assert_allclose(means.means()["b"], counted.reshape(-1, 6).mean(axis=0))

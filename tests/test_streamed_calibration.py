"""Calibration in bounded passes over the data (issue 19): equal results, fewer passes.

The reference for the empirical bias correction is its definition run the
slow way: one full quantized-model pass per wave of layers that depend only
on earlier waves. The one-pass correction must give the same shifts, and
they must be exact: after correction every layer's mean output equals the
float model's, zero padding at the borders included.
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


def _mean_inputs(compute, batches):
    """Per-position means over all batches of the tensors `compute(inputs)` returns."""
    totals, count = None, 0
    for batch in batches:
        outputs = [np.asarray(t, np.float64) for t in compute([tf.convert_to_tensor(a) for a in batch])]
        sums = [o.sum(axis=0) for o in outputs]
        totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
        count += len(batch[0])
    return [t / count for t in totals]


def _wave_corrections(graph, plan, model, quantized_layers, batches, float_means, progress=None):
    """The one-pass correction's definition: one full quantized pass per wave of layers."""
    batches = bc._rebatched(batches, bc._PASS_BATCH_SIZE)
    layer_keys = list(plan.layers)
    input_keys = [plan.layers[key].input_key for key in layer_keys]

    def float_inputs(inputs):
        _, kept = graph.evaluate(inputs, lambda op, args, kwargs: op.layer(*args, **kwargs), keep=set(input_keys))
        return [kept[key] for key in input_keys]

    float_inputs_means = dict(zip(layer_keys, _mean_inputs(float_inputs, batches)))
    probe = keras.Model(model.inputs, [quantized_layers[key].input for key in layer_keys])
    corrections = {}
    for wave in _waves(graph, plan):
        quantized_means = dict(zip(layer_keys, _mean_inputs(lambda inputs: probe(inputs, training=False), batches)))
        for key in wave:
            layer_plan = plan.layers[key]
            response = bc._LinearResponse(layer_plan.layer)
            dequantized = linear_type(layer_plan.layer).converter_kernel(
                layer_plan.layer, quantized_layers[key].dequantized_kernel().numpy()
            )
            shift = response(dequantized, quantized_means[key]) - response(layer_plan.kernel, float_inputs_means[key])
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


@pytest.mark.parametrize("chunks", [[200_000, 50_000, 300_000], [3_000, 200_000, 7_000], [6_000, 1_000_000]])
def test_reservoir_takes_from_each_chunk_its_share_of_the_stream(chunks):
    """Each chunk's values make up its share of the sample, however large or small the chunk."""
    capacity = 10_000
    sampler = calibration.ReservoirSampler(capacity, seed=3)
    for index, size in enumerate(chunks):
        sampler.add(np.full(size, index, dtype=np.float32))
    assert sampler.values.size == capacity and sampler.seen == sum(chunks)
    counts = np.bincount(sampler.values.astype(int), minlength=len(chunks))
    shares = np.asarray(chunks) / sum(chunks)
    # Binomial spread (the hypergeometric one is smaller): within 4 standard errors.
    assert np.all(np.abs(counts / capacity - shares) < 4 * np.sqrt(shares * (1 - shares) / capacity) + 1e-12)
    # Any prefix is a uniform sample too (the values are shuffled).
    prefix = np.bincount(sampler.values[: capacity // 4].astype(int), minlength=len(chunks)) / (capacity // 4)
    assert np.all(np.abs(prefix - shares) < 4 * np.sqrt(shares * (1 - shares) / (capacity // 4)) + 1e-12)


def test_reservoir_keeps_every_value_until_full_and_repeats_for_a_seed():
    values = np.arange(900, dtype=np.float32)
    sampler = calibration.ReservoirSampler(1000, seed=0)
    sampler.add(values[:500])
    sampler.add(values[500:])
    np.testing.assert_array_equal(np.sort(sampler.values), values)
    runs = []
    for _ in range(2):
        again = calibration.ReservoirSampler(100, seed=5)
        for start in range(0, 900, 70):
            again.add(values[start : start + 70])
        runs.append(again.values)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.unique(runs[0]).size == 100


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


def test_progress_lines_in_a_log_come_at_most_every_ten_seconds_and_at_the_end():
    import io

    from keras_powerquant.progress import ProgressPrinter

    now, stream = [0.0], io.StringIO()
    printer = ProgressPrinter(stream, prefix="> ", clock=lambda: now[0])
    for done in range(1, 21):
        now[0] = 2.0 * done
        printer("calibration", done, 20)
    printer("weights", 1, None)
    assert stream.getvalue().splitlines() == [
        "> calibration: 1/20, 2 s elapsed, ETA 38 s",
        "> calibration: 6/20, 12 s elapsed, ETA 28 s",
        "> calibration: 11/20, 22 s elapsed, ETA 18 s",
        "> calibration: 16/20, 32 s elapsed, ETA 8 s",
        "> calibration: 20/20 in 40 s",
        "> weights: 1, 0 s elapsed",
    ]


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

    def counting(self, inputs, call_op, keep=None, observe=None):
        if self.model is model:
            calls.append(int(inputs[0].shape[0]))
        return evaluate(self, inputs, call_op, keep=keep, observe=observe)

    monkeypatch.setattr(FlatGraph, "evaluate", counting)
    _, report = kpq.convert(model, 4, 4, calibration_data=data, calibration_batch_size=32)
    assert report.options["bias_correction"] == "empirical"
    assert calls == [32, 32, 32]


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "multi_io"])
def test_compiled_calls_give_the_eager_values(name):
    """Each op in its own traced function computes what its eager call computes, for any batch size."""
    from keras_powerquant.converter.graph import CompiledCalls
    from keras_powerquant.converter.graph import FlatGraph

    model = models.build(name)
    graph = FlatGraph(model)
    keys = {key for op in graph.ops for key in op.output_keys}
    compiled = CompiledCalls(training=False)
    for size in (8, 5, 3):  # a second batch size, then a third: no retrace per size
        data = models.reference_inputs(model, size, seed=size)
        arrays = [data[t.name] for t in graph.input_tensors] if isinstance(data, dict) else data
        inputs = [tf.convert_to_tensor(a) for a in (arrays if isinstance(arrays, (list, tuple)) else [arrays])]
        eager = graph.evaluate(inputs, lambda op, args, kwargs: op.run(args, kwargs, training=False), keep=keys)[1]
        traced = graph.evaluate(inputs, compiled, keep=keys)[1]
        assert set(traced) == set(eager)
        for key in eager:
            np.testing.assert_allclose(np.asarray(traced[key]), np.asarray(eager[key]), rtol=1e-4, atol=1e-5)
    functions = [f for f in compiled._functions.values()]
    assert functions and all(f.experimental_get_tracing_count() <= 2 for f in functions)


def test_eager_layers_see_values_and_observe_sees_each_value_once():
    """Layers named eager run outside any trace (their hooks read numpy), and `observe`
    gets every input and op output once, though nothing is kept."""
    from keras_powerquant.converter.graph import CompiledCalls
    from keras_powerquant.converter.graph import FlatGraph

    model = models.build("resnet")
    graph = FlatGraph(model)
    hooked = next(op.layer for op in graph.ops if op.is_layer and linear_type(op.layer) is not None)
    seen_eagerly = []
    call = type(hooked).call

    def spying(self, *args, **kwargs):
        if self is hooked:
            seen_eagerly.append(tf.executing_eagerly())
        return call(self, *args, **kwargs)

    observed = []
    inputs = [tf.convert_to_tensor(models.reference_inputs(model, 4))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(hooked), "call", spying)
        outputs, kept = graph.evaluate(
            inputs, CompiledCalls(eager={id(hooked)}), keep=set(), observe=lambda key, value: observed.append(key)
        )
        assert seen_eagerly == [True]
        graph.evaluate(inputs, CompiledCalls(), keep=set())
        assert seen_eagerly == [True, False]
    expected = list(graph.input_keys) + [key for op in graph.ops for key in op.output_keys]
    assert observed == expected and kept == {}
    np.testing.assert_allclose(np.asarray(outputs[0]), model.predict(inputs[0], verbose=0), rtol=1e-4, atol=1e-5)


def test_input_means_count_only_the_first_samples():
    means = calibration.InputMeans(["a", "b"], max_samples=5)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 4, 2, 3)) for _ in range(3)]
    for batch in batches:
        if means.wants_more:
            means.add("a", batch)
            means.add("b", 2 * batch)
            means.count(len(batch))
    counted = np.concatenate(batches[:2])  # 3 + 3 >= 5: the third batch is not counted
    np.testing.assert_allclose(means.means()["a"], counted.mean(axis=0))
    np.testing.assert_allclose(means.means()["b"], 2 * counted.mean(axis=0))


def _border_model():
    """Convolutions with "same" padding and strides, a depthwise one and a Dense: no BatchNorm, linear outputs."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv_a")(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="depthwise")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 5, padding="same", name="conv_b")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="dense")(x))


def test_measured_correction_restores_every_layers_mean_output_exactly():
    """Inputs whose mean varies across the image (a ramp): a uniform-input-mean model of padding is wrong here."""
    model = _border_model()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 3.0, 12, dtype=np.float32)[None, :, None, None]
    data = (rng.standard_normal((64, 12, 12, 3)).astype(np.float32) + ramp)
    names = ["conv_a", "depthwise", "conv_b", "dense"]
    quantized, report = kpq.convert(model, 4, 4, calibration_data=data, quantize_first_last=True)
    assert [report.layer(name).bias_correction for name in names] == ["empirical"] * 4
    float_outputs = keras.Model(model.inputs, [model.get_layer(n).output for n in names])(data)
    quantized_outputs = keras.Model(quantized.inputs, [quantized.get_layer(n).output for n in names])(data)
    uncorrected, _ = kpq.convert(model, 4, 4, calibration_data=data, quantize_first_last=True, bias_correction=False)
    uncorrected_outputs = keras.Model(uncorrected.inputs, [uncorrected.get_layer(n).output for n in names])(data)
    for name, y, y_hat, y_raw in zip(names, float_outputs, quantized_outputs, uncorrected_outputs):
        axes = tuple(range(len(y.shape) - 1))
        mean = np.mean(y, axis=axes)
        tolerance = 1e-4 * float(np.std(y))
        np.testing.assert_allclose(np.mean(y_hat, axis=axes), mean, atol=tolerance, err_msg=name)
        # The correction had something to correct: without it the means are far off.
        assert np.max(np.abs(np.mean(y_raw, axis=axes) - mean)) > 100 * tolerance, name

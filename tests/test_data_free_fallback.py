"""The data-free fallback: quantizers whose statistics are missing or far from a BatchNorm are fitted
on a short synthetic run (`ConversionConfig(data_free_fallback=...)`), the others keep theirs."""

import json
import time

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.converter.folding import plan_folds
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.statistics import propagate_statistics
from keras_powerquant.synthesis import synthesize
from tests.cli_helpers import invoke

L = keras.layers


def _no_batch_norm_classifier():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    # The first layer reads the input through a padding, as ResNet-50's does.
    x = L.ZeroPadding2D(1, name="pad")(inputs)
    x = L.Conv2D(8, 3, activation="relu", name="c1")(x)
    x = L.Conv2D(8, 3, activation="relu", name="c2")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(5, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="no_bn")


def _long_chain():
    """A BatchNorm, then four convolutions without one: their inputs are 0 to 4 steps from it."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="r0")(x)
    for i in range(1, 5):
        x = L.Conv2D(8, 3, padding="same", name=f"c{i}")(x)
        x = L.ReLU(name=f"r{i}")(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(4, name="logits")(x)
    model = keras.Model(inputs, outputs, name="chain")
    bn = model.get_layer("stem_bn")
    bn.set_weights([np.full(8, 1.3), np.full(8, 0.2), np.zeros(8), np.ones(8)])
    return model


def _rules(report):
    return {a.name: a for a in report.activations}


def test_steps_count_linear_layers_and_merges_since_the_batch_norm():
    model = _long_chain()
    graph = FlatGraph(model)
    folds, _ = plan_folds(graph)
    stats = propagate_statistics(graph, folds)
    by_layer = {op.layer.name: stats[op.output_keys[0]] for op in graph.ops}
    assert [by_layer[f"r{i}"].steps for i in range(5)] == [0, 1, 2, 3, 4]
    assert by_layer["r0"].description == "batchnorm -> relu"
    assert by_layer["r3"].description == "propagated: conv -> relu (3 steps from a normalization)"
    assert stats[graph.input_keys[0]].steps is None


def test_model_without_batch_norm_gets_quantized_activations_from_the_fallback():
    model = _no_batch_norm_classifier()
    _, before = kpq.convert(model, 8, 8)
    _, after = kpq.convert(model, 8, 8, data_free_fallback=2)
    for name in ("c1_relu", "head_input_quantizer"):
        assert _rules(before)[name].status == "float"
        assert _rules(after)[name].status == "quantized"
        assert _rules(after)[name].rule == "synthetic (no statistics (unknown: model input))"
        assert _rules(after)[name].clip > 0
    # The model's input keeps its (missing) statistics: synthetic inputs do not know the real range.
    assert _rules(after)["c1_input_quantizer"].status == "float"
    assert any("data-free fallback: 2 activation quantizer(s)" in note for note in after.notes)
    assert after.options["data_free_fallback"] == 2


def test_only_quantizers_far_from_the_batch_norm_fall_back():
    model = _long_chain()
    _, before = kpq.convert(model, 8, 8)
    _, after = kpq.convert(model, 8, 8, data_free_fallback=2)
    before, after = _rules(before), _rules(after)
    for name in ("r0", "r1", "r2"):
        assert after[name].rule == before[name].rule and not after[name].rule.startswith("synthetic")
        assert after[name].clip == before[name].clip
    for name, steps in (("r3", 3), ("logits_input_quantizer", 4)):
        assert after[name].rule == f"synthetic (statistics {steps} steps from a normalization)"
        assert after[name].clip != before[name].clip


def test_batch_norm_everywhere_is_unchanged_and_runs_no_synthesis():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, use_bias=False, name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    x = L.Conv2D(8, 3, use_bias=False, name="c2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="r2")(x)
    outputs = L.Dense(3, activation="softmax", name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    _, before = kpq.convert(model, 8, 8)
    _, after = kpq.convert(model, 8, 8, data_free_fallback=0)
    assert [(a.name, a.status, a.rule, a.clip, a.exponent) for a in after.activations] == [
        (a.name, a.status, a.rule, a.clip, a.exponent) for a in before.activations
    ]
    assert not any("synthetic inputs" in note for note in after.notes)
    assert any("close enough to a BatchNorm" in note for note in after.notes)


def test_the_fallback_is_deterministic():
    model = _long_chain()
    first = _rules(kpq.convert(model, 8, 8, data_free_fallback=1)[1])
    second = _rules(kpq.convert(model, 8, 8, data_free_fallback=1)[1])
    assert [(a.rule, a.clip, a.exponent) for a in first.values()] == [
        (a.rule, a.clip, a.exponent) for a in second.values()
    ]
    assert sum(a.rule.startswith("synthetic") for a in first.values()) == 3


def test_a_model_that_cannot_be_synthesized_for_keeps_its_behaviour_and_says_why():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    x = L.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = L.Dense(1, name="regression")(x)
    model = keras.Model(inputs, outputs)
    _, before = kpq.convert(model, 8, 8)
    _, after = kpq.convert(model, 8, 8, data_free_fallback=2)
    assert [(a.status, a.rule) for a in after.activations] == [(a.status, a.rule) for a in before.activations]
    note = next(note for note in after.notes if note.startswith("data-free fallback not run"))
    assert "no BatchNormalization layer" in note


def test_the_time_limit_stops_the_synthesis_and_the_notes_say_so():
    model = _long_chain()
    started = time.perf_counter()
    result = synthesize(model, 8, steps=100_000, batch_size=8, time_limit=1.0)
    assert time.perf_counter() - started < 15  # tracing and the affine start, then about 1 s of steps
    assert any("time limit of 1 s stopped the optimisation" in note for note in result.notes)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_invalid_threshold_is_a_value_error(value):
    with pytest.raises(ValueError, match="data_free_fallback"):
        kpq.ConversionConfig(data_free_fallback=value)


def test_the_fallback_with_calibration_data_is_refused_before_any_work():
    model = _no_batch_norm_classifier()
    data = np.zeros((4,) + tuple(model.inputs[0].shape[1:]), np.float32)
    with pytest.raises(ValueError, match="`data_free_fallback` refits data-free statistics"):
        kpq.convert(model, 8, 8, data_free_fallback=2, calibration_data=data)


def test_cli_flag(tmp_path):
    path = tmp_path / "no_bn.keras"
    _no_batch_norm_classifier().save(path)
    result = invoke("convert", path, "-o", tmp_path / "out", "--data-free-fallback", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["options"]["data_free_fallback"] == 2
    rules = {a["name"]: a["rule"] for a in report["activations"]}
    assert rules["c1_relu"].startswith("synthetic (no statistics")

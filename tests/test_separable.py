"""SeparableConv2D: split into its depthwise and pointwise convolutions, each quantized with its own exponent."""

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.layers import PowerQuantConv2D
from keras_powerquant.layers import PowerQuantDepthwiseConv2D
from tests import models
from tests.cpu_kernels import skip_unless_runs

VARIANTS = [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, strides=2, depth_multiplier=2, activation="relu"),
    dict(kernel_size=(3, 2), dilation_rate=2, padding="same", use_bias=False),
    dict(kernel_size=3, padding="same", data_format="channels_first"),
]


def separable_model(seed=0, shared=False, **options):
    """Conv2D+BN+ReLU, then SeparableConv2D+BN+ReLU ('sep'), pooling and a Dense head."""
    channels_first = options.get("data_format") == "channels_first"
    inputs = keras.Input((3, 12, 12) if channels_first else (12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", data_format=options.get("data_format"))(inputs)
    x = keras.layers.BatchNormalization(axis=1 if channels_first else -1)(x)
    x = keras.layers.ReLU()(x)
    separable = keras.layers.SeparableConv2D(8 if shared else 12, name="sep", **options)
    x = separable(x)
    if shared:
        x = separable(keras.layers.ReLU()(x))
    x = keras.layers.BatchNormalization(axis=1 if channels_first else -1)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D(data_format=options.get("data_format"))(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    models._randomize(model, seed)
    return model, np.random.default_rng(seed).standard_normal((16,) + tuple(inputs.shape[1:])).astype(np.float32)


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_split_computes_what_the_separable_layer_computes(variant):
    model, x = separable_model(variant, **VARIANTS[variant])
    skip_unless_runs(model.layers[1], x.shape[1:])  # the first Conv2D, in the layout on test
    graph = FlatGraph(model)
    names = [op.layer.name for op in graph.ops]
    assert "sep" not in names and names.index("sep_depthwise") + 1 == names.index("sep_pointwise")
    depthwise, pointwise = graph.ops[names.index("sep_depthwise")].layer, graph.ops[names.index("sep_pointwise")].layer
    assert type(depthwise) is keras.layers.DepthwiseConv2D and not depthwise.use_bias
    assert type(pointwise) is keras.layers.Conv2D and pointwise.kernel_size == (1, 1)
    outputs, _ = graph.evaluate([x], lambda op, args, kwargs: op.layer(*args, **kwargs))
    np.testing.assert_allclose(outputs[0], model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_a_shared_separable_layer_splits_into_shared_layers():
    model, _ = separable_model(shared=True, kernel_size=3, padding="same")
    graph = FlatGraph(model)
    parts = [op.layer for op in graph.ops if op.layer.name.startswith("sep_")]
    assert [p.name for p in parts] == ["sep_depthwise", "sep_pointwise"] * 2
    assert parts[0] is parts[2] and parts[1] is parts[3]
    _, report = kpq.convert(model, 8, 8)
    kept = {entry.name: entry.reason for entry in report.layers if entry.status != "quantized"}
    assert kept["sep_depthwise"] == kept["sep_pointwise"] == "shared layer (called more than once)"


def test_splitting_leaves_the_original_model_as_it_was():
    model, x = separable_model(kernel_size=3, padding="same")
    config = model.get_config()
    expected = model.predict(x, verbose=0)
    for _ in range(2):
        FlatGraph(model)
    assert model.get_config() == config
    assert [layer.name for layer in model.layers if layer.name.startswith("sep")] == ["sep"]
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    # The model still rebuilds from its graph (no stray nodes from the splits).
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("calibrated", [False, True])
def test_both_kernels_quantized_with_their_own_exponent(calibrated, tmp_path):
    model, x = separable_model(1, kernel_size=3, padding="same", depth_multiplier=2)
    converted, report = kpq.convert(model, 4, 4, calibration_data=x if calibrated else None)
    depthwise, pointwise = converted.get_layer("sep_depthwise"), converted.get_layer("sep_pointwise")
    assert type(depthwise) is PowerQuantDepthwiseConv2D and type(pointwise) is PowerQuantConv2D
    assert depthwise.weight_bits == pointwise.weight_bits == 4
    assert depthwise.kernel_codes.dtype == pointwise.kernel_codes.dtype == "int8"
    entries = {entry.name: entry for entry in report.layers}
    assert entries["sep_depthwise"].exponent == depthwise.weight_exponent
    assert entries["sep_pointwise"].exponent == pointwise.weight_exponent
    assert depthwise.weight_exponent != pointwise.weight_exponent
    # The BatchNorm after the separable layer folds into its pointwise part, and
    # both parts get their bias corrected (the depthwise part has no bias to correct).
    assert entries["sep_pointwise"].folded_batch_norm is not None
    assert entries["sep_pointwise"].bias_shift is not None
    # The tensor between the parts is quantized like every quantized layer's
    # input; without data, its range comes from the propagated statistics.
    quantizer = {a.name: a for a in report.activations}["sep_pointwise_input_quantizer"]
    assert quantizer.status == "quantized" and quantizer.bits == 4
    assert quantizer.rule == ("calibration" if calibrated else "propagated: depthwise (1 step from a normalization)")

    path = tmp_path / "separable.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), converted.predict(x, verbose=0))


def test_8_bit_conversion_stays_close_to_the_float_model():
    model, x = separable_model(2, kernel_size=3, strides=2, activation="relu")
    expected = model.predict(x, verbose=0)
    converted, _ = kpq.convert(model, 8, 8, calibration_data=x)
    error = np.linalg.norm(converted.predict(x, verbose=0) - expected) / np.linalg.norm(expected)
    assert error < 0.02


def test_refinement_tunes_both_parts():
    model, x = separable_model(3, kernel_size=3, padding="same")
    fast = {"refine_evaluations": 10, "refine_samples": 16, "rounding_iterations": 5}
    converted, report = kpq.convert(
        model, 4, 4, calibration_data=x, refine=["grid", "rounding"], bias_correction=False, **fast
    )
    assert [step["name"] for step in report.refinement] == ["grid", "rounding"]
    assert report.refinement[-1]["loss_after"] <= report.refinement[0]["loss_before"]
    entries = {entry.name: entry for entry in report.layers}
    assert entries["sep_depthwise"].status == entries["sep_pointwise"].status == "quantized"
    assert type(converted.get_layer("sep_pointwise")) is PowerQuantConv2D

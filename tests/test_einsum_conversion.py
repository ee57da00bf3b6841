"""EinsumDense layers that are a Dense on several trailing axes (attention projections) through the converter:
conversion with and without data, BatchNorm folding, bias correction, refinement, `.keras` and SavedModel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.export import export_model
from keras_powerquant.layers import PowerQuantEinsumDense
from tests import models

L = keras.layers
SEQUENCE, WIDTH, HEADS, HEAD_WIDTH = 6, 8, 2, 4
PROJECTIONS = ("query", "attention_output", "feed_forward")


def transformer(seed=0, query_equation="abc,cde->abde", output_equation="abcd,cde->abe"):
    """LayerNorm, a per-head projection, GELU, the heads' output projection, residual, LayerNorm, a
    feed-forward EinsumDense with its kernel reversed, average over the sequence, Dense softmax."""
    inputs = keras.Input((SEQUENCE, WIDTH), name="tokens")
    normalized = L.LayerNormalization(name="norm")(inputs)
    x = L.EinsumDense(query_equation, (None, HEADS, HEAD_WIDTH), bias_axes="de", name="query")(normalized)
    x = L.Activation("gelu")(x)
    x = L.EinsumDense(output_equation, (None, WIDTH), bias_axes="e", name="attention_output")(x)
    x = L.LayerNormalization(name="norm_2")(L.Add()([x, normalized]))
    x = L.EinsumDense("abc,dc->abd", (None, WIDTH), activation="relu", name="feed_forward")(x)
    x = L.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, L.Dense(3, activation="softmax", name="head")(x))
    models._randomize(model, seed)
    return model


def tokens(n=64, seed=0):
    return np.random.default_rng(seed).standard_normal((n, SEQUENCE, WIDTH)).astype("float32")


def _quantized_names(report):
    return {entry.name for entry in report.layers if entry.status == "quantized"}


@pytest.mark.parametrize("calibrated", [True, False])
def test_attention_projections_convert_and_stay_close_to_float(calibrated):
    model = transformer()
    data = tokens()
    quantized, report = kpq.convert(model, 8, 8, calibration_data=data if calibrated else None)
    assert {entry.name for entry in report.float_layers} == {"norm", "norm_2"}  # no kernel
    assert set(PROJECTIONS) | {"head"} <= _quantized_names(report)
    for name in PROJECTIONS:
        assert type(quantized.get_layer(name)) is PowerQuantEinsumDense, name
    # Per-channel scales over both output axes of the per-head projection.
    assert quantized.get_layer("query").kernel_scale.shape == (HEADS, HEAD_WIDTH)
    # 8-bit weights and activations: each of the five quantized layers adds an error of about
    # 1/2^7 of its input's range, so the class probabilities move by a few thousandths.
    difference = np.max(np.abs(quantized.predict(data, verbose=0) - model.predict(data, verbose=0)))
    assert difference < 0.03
    rules = {consumer: a.rule for a in report.activations if a.status == "quantized" for consumer in a.consumers}
    if not calibrated:
        # The output projection's input: through the per-head projection (its two output axes mixed
        # into per-last-axis moments) and GELU.
        assert rules["attention_output"] == (
            "propagated: dense (mixed over its output axes but the last) -> gelu (1 step from a normalization)"
        )


@pytest.mark.parametrize(
    "query_equation, output_equation",
    [("abc,ced->abde", "abcd,dce->abe"), ("abc,cde->abde", "abcd,ecd->abe")],
)
def test_kernel_letters_in_any_order_compute_the_same_model(query_equation, output_equation):
    """Kernels whose letters are not in the input/output order are permuted, not misread."""
    model = transformer(1, query_equation, output_equation)
    data = tokens(seed=1)
    quantized, _ = kpq.convert(model, 8, None, calibration_data=data, bias_correction=False)
    for name in PROJECTIONS:
        assert type(quantized.get_layer(name)) is PowerQuantEinsumDense, name
    expected = model.predict(data, verbose=0)
    assert np.max(np.abs(quantized.predict(data, verbose=0) - expected)) < 0.01


def test_keras_file_round_trip_and_saved_model(tmp_path):
    model = transformer(2)
    data = tokens(16, seed=2)
    quantized, _ = kpq.convert(model, 4, 4, calibration_data=tokens(seed=3))
    outputs = quantized.predict(data, verbose=0)
    path = tmp_path / "transformer.keras"
    quantized.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), outputs)
    for decode_weights in ("load", "call"):
        export = export_model(quantized, tmp_path / decode_weights, 1, decode_weights=decode_weights)
        signature = tf.saved_model.load(export.saved_model_dir).signatures["serving_default"]
        (served,) = signature(tokens=tf.constant(data)).values()
        np.testing.assert_allclose(served.numpy(), outputs, atol=1e-5)


def _head_model(seed, batch_norms):
    """LayerNorm, a per-head projection (BatchNorm over its last axis after it), the heads' output
    projection (BatchNorm over the head width before it), as the model's output."""
    inputs = keras.Input((SEQUENCE, WIDTH))
    x = L.LayerNormalization(name="norm")(inputs)
    x = L.EinsumDense("abc,cde->abde", (None, HEADS, HEAD_WIDTH), bias_axes="e", name="query")(x)
    if batch_norms:
        x = L.BatchNormalization(name="query_bn")(x)
    x = L.Activation("relu")(x)
    if batch_norms:
        x = L.BatchNormalization(name="output_bn")(x)
    model = keras.Model(inputs, L.EinsumDense("abcd,cde->abe", (None, WIDTH), name="attention_output")(x))
    models._randomize(model, seed)
    return model


def test_batch_norms_over_the_last_axis_fold_into_several_axis_kernels():
    model = _head_model(3, batch_norms=True)
    data = tokens(seed=3)
    quantized, report = kpq.convert(model, 8, None, calibration_data=data, bias_correction=False)
    folds = {f["batch_norm"]: f["into"] for f in report.folded_batch_norms}
    assert folds == {"query_bn": "query", "output_bn": "attention_output"}
    assert not any(type(layer) is L.BatchNormalization for layer in quantized.layers)
    expected = model.predict(data, verbose=0)
    error = np.linalg.norm(quantized.predict(data, verbose=0) - expected) / np.linalg.norm(expected)
    assert error < 0.01


def test_a_batch_norm_of_another_output_axis_stays_with_the_reason():
    inputs = keras.Input((SEQUENCE, WIDTH))
    x = L.EinsumDense("abc,cde->abde", (None, HEADS, HEAD_WIDTH), name="query")(inputs)
    x = L.BatchNormalization(axis=2, name="heads_bn")(x)
    model = keras.Model(inputs, L.EinsumDense("abcd,cde->abe", (None, WIDTH), name="attention_output")(x))
    models._randomize(model, 4)
    _, report = kpq.convert(model, 8, 8, calibration_data=tokens(seed=4))
    reasons = {entry["batch_norm"]: entry["reason"] for entry in report.unfolded_batch_norms}
    assert "not the channel axis of 'query'" in reasons["heads_bn"]


@pytest.mark.parametrize("method", ["analytic", "empirical"])
def test_bias_correction_shrinks_the_mean_output_shift(method):
    model = _head_model(5, batch_norms=False)
    data = tokens(256, seed=5)
    expected = model.predict(data, verbose=0)
    shifts = {}
    for correction in (False, method):
        calibration = data if method == "empirical" else None
        quantized, report = kpq.convert(model, 3, None, calibration_data=calibration, bias_correction=correction)
        if correction:
            entries = {entry.name: entry for entry in report.layers}
            for name in ("query", "attention_output"):
                assert entries[name].bias_correction == method and entries[name].bias_shift > 0, name
        difference = quantized.predict(data, verbose=0) - expected
        shifts[correction] = np.linalg.norm(difference.mean(axis=(0, 1)))
    assert shifts[method] < 0.5 * shifts[False]


def test_refinement_runs_on_several_axis_kernels():
    model = transformer(6)
    fast = {"refine_evaluations": 10, "refine_samples": 32}
    quantized, report = kpq.convert(model, 4, 4, calibration_data=tokens(seed=6), refine=["grid", "lapq"], **fast)
    assert [step["name"] for step in report.refinement] == ["grid", "lapq"]
    assert report.refinement[-1]["loss_after"] <= report.refinement[0]["loss_before"]
    for name in PROJECTIONS:
        assert type(quantized.get_layer(name)) is PowerQuantEinsumDense, name


def test_refinement_without_bias_correction_on_an_einsum_without_bias():
    model = _head_model(7, batch_norms=False)  # 'attention_output' has no bias
    fast = {"refine_evaluations": 10, "refine_samples": 16, "rounding_iterations": 5}
    quantized, report = kpq.convert(
        model, 4, 4, calibration_data=tokens(16, seed=7), refine=["grid", "rounding"], bias_correction=False, **fast
    )
    assert report.refinement[-1]["loss_after"] <= report.refinement[0]["loss_before"]
    assert quantized.get_layer("attention_output").bias is None


@pytest.mark.parametrize(
    "equation, output_shape, reason",
    [
        ("abc,bcd->abd", (SEQUENCE, 5), "output axes 'b' are also input axes"),
        ("ab...,bc->ac...", 5, "ellipsis is on the right"),
        ("abc,cd->abcd", (SEQUENCE, WIDTH, 5), "no contracted axis"),  # a broadcast
        ("abc,bd->acd", (WIDTH, 5), "contracted axes 'b' are not the input's trailing axes"),
        ("abc,cd->adb", (5, SEQUENCE), "kernel's output axes 'd' are not the output's trailing axes"),
    ],
)
def test_equations_that_are_not_a_dense_on_trailing_axes_stay_float(equation, output_shape, reason):
    inputs = keras.Input((SEQUENCE, WIDTH))
    x = L.EinsumDense(equation, output_shape, name="mix")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(x)))
    models._randomize(model, 8)
    quantized, report = kpq.convert(model, 8, 8, calibration_data=tokens(16, seed=8))
    reasons = {entry.name: entry.reason for entry in report.float_layers}
    assert f"'{equation}'" in reasons["mix"] and reason in reasons["mix"], reasons["mix"]
    assert type(quantized.get_layer("mix")) is L.EinsumDense
    assert linear_type(model.get_layer("mix")).channel_axis(model.get_layer("mix"), 4) is None


def test_multi_head_attention_projections_are_quantized_in_place():
    inputs = keras.Input((SEQUENCE, WIDTH))
    x = L.MultiHeadAttention(HEADS, HEAD_WIDTH, name="attention")(inputs, inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    models._randomize(model, 9)
    data = tokens(16, seed=9)
    quantized, report = kpq.convert(model, 8, 8, calibration_data=data)
    assert "attention" not in {entry.name for entry in report.float_layers}
    assert {entry.name for entry in report.quantized_layers} == {
        "head", "attention/query", "attention/key", "attention/value", "attention/attention_output"
    }
    wrapper = quantized.get_layer("attention")
    assert type(wrapper).__name__ == "PowerQuantSublayers" and type(wrapper.layer) is L.MultiHeadAttention
    assert type(wrapper.layer.query_dense.layer) is PowerQuantEinsumDense
    assert type(quantized.get_layer("head")).__name__ == "PowerQuantDense"
    expected = model.predict(data, verbose=0)
    assert np.max(np.abs(quantized.predict(data, verbose=0) - expected)) < 0.05

"""SeparableConv2D, Conv2DTranspose and EinsumDense through the converter: folding, statistics, bias
correction, refinement, and serving graphs with GPU kernels."""

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.export import export_model
from keras_powerquant.layers import PowerQuantEinsumDense
from tests import models
from tests.serving_graph import load_nodes
from tests.serving_graph import nodes_without_gpu_kernel
from tests.serving_graph import serving_nodes

QUANTIZED = {
    "sep_depthwise": "PowerQuantDepthwiseConv2D",
    "sep_pointwise": "PowerQuantConv2D",
    "up": "PowerQuantConv2DTranspose",
    "mix": "PowerQuantEinsumDense",
}


def new_layer_types_model(seed=0):
    """Conv+BN+ReLU, SeparableConv2D+BN+ReLU, Conv2DTranspose+BN+ReLU, EinsumDense over positions, Dense."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Reshape((16 * 16, 6))(x)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 4), bias_axes="d", activation="relu", name="mix")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    models._randomize(model, seed)
    return model


def converted(seed=0, **options):
    model = new_layer_types_model(seed)
    quantized, report = kpq.convert(model, **options)
    classes = {entry.name: entry.class_name for entry in report.layers if entry.status == "quantized"}
    for name, class_name in QUANTIZED.items():
        assert type(quantized.get_layer(name)).__name__ == class_name
        assert name in classes, name
    return quantized


@pytest.mark.parametrize("decode_weights", ["load", "call"])
def test_serving_ops_have_gpu_kernels(decode_weights, tmp_path):
    quantized = converted(wbits=4, abits=4)
    export = export_model(quantized, tmp_path, 1, decode_weights=decode_weights)
    nodes, at_load = serving_nodes(export.saved_model_dir), load_nodes(export.saved_model_dir)
    ops = {node.op for node in nodes}
    assert {"DepthwiseConv2dNative", "Conv2D", "Conv2DBackpropInput"} <= ops
    if decode_weights == "load":
        # Kernels decoded (and reordered for the op) once, when loaded.
        assert "GatherV2" not in ops and "GatherV2" in {node.op for node in at_load}
    else:
        assert "GatherV2" in ops
    assert nodes_without_gpu_kernel(nodes + at_load) == []


def test_batch_norms_fold_and_statistics_propagate_through_the_new_layers():
    model = new_layer_types_model(1)
    _, report = kpq.convert(model, 4, 4)
    folds = {fold["batch_norm"]: fold["into"] for fold in report.folded_batch_norms}
    assert sorted(folds.values()) == ["sep_pointwise", "stem", "up"]
    entries = {entry.name: entry for entry in report.layers}
    # Data-free bias correction reaches every layer after the first.
    for name in ("sep_depthwise", "sep_pointwise", "up", "mix", "head"):
        assert entries[name].bias_correction == "analytic" and entries[name].bias_shift is not None, name
    rules = {consumer: a.rule for a in report.activations if a.status == "quantized" for consumer in a.consumers}
    # EinsumDense's input: the ReLU after the transposed convolution's folded BatchNorm (through a Reshape).
    assert rules["mix"] == "batchnorm -> relu"
    # Dense's input: propagated through the EinsumDense kernel and its ReLU.
    assert rules["head"] == "propagated: dense -> relu (1 step from a normalization)"


def test_empirical_bias_correction_lowers_the_output_error():
    model = new_layer_types_model(2)
    x = np.random.default_rng(3).standard_normal((48, 8, 8, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    errors = {}
    for correction in (False, "empirical"):
        quantized, _ = kpq.convert(model, 4, None, calibration_data=x, bias_correction=correction)
        errors[correction] = np.linalg.norm(quantized.predict(x, verbose=0) - expected)
    assert errors["empirical"] < 0.75 * errors[False]


def test_einsum_equations_that_are_not_a_dense_on_trailing_axes_stay_float_with_the_reason():
    inputs = keras.Input((4, 6))
    x = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3), bias_axes="e", name="heads")(inputs)
    x = keras.layers.Reshape((4, 6))(x)
    x = keras.layers.EinsumDense("abc,dc->abd", (4, 5), bias_axes="d", name="reversed")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    # One kernel per position: its axis 'b' is the input's sequence axis, not a contracted one.
    x = keras.layers.EinsumDense("abc,bcd->abd", (4, 3), bias_axes="d", name="positions")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    models._randomize(model, 4)
    data = np.random.default_rng(0).standard_normal((16, 4, 6)).astype("float32")
    quantized, report = kpq.convert(model, 8, 8, calibration_data=data)
    reasons = {entry.name: entry.reason for entry in report.float_layers}
    assert set(reasons) == {"positions"}
    assert "'abc,bcd->abd'" in reasons["positions"] and "output axes 'b' are also input axes" in reasons["positions"]
    assert type(quantized.get_layer("positions")) is keras.layers.EinsumDense
    # A Dense onto two trailing axes: one scale per (head, width), the bias on both axes.
    heads = quantized.get_layer("heads")
    assert type(heads) is PowerQuantEinsumDense and heads.kernel_scale.shape == (2, 3) and heads.bias.shape == (2, 3)
    # The kernel stored as (c, d) for 'abc,dc->abd'; the BatchNorm folds into it.
    assert type(quantized.get_layer("reversed")) is PowerQuantEinsumDense
    assert quantized.get_layer("reversed")._kernel_shape == (6, 5)
    assert {f["batch_norm"]: f["into"] for f in report.folded_batch_norms} == {"bn": "reversed"}
    expected = model.predict(data, verbose=0)
    error = np.linalg.norm(quantized.predict(data, verbose=0) - expected) / np.linalg.norm(expected)
    assert error < 0.02


def test_refinement_tunes_the_new_layers():
    model = new_layer_types_model(3)
    x = np.random.default_rng(3).standard_normal((16, 8, 8, 3)).astype("float32")
    fast = {"refine_evaluations": 10, "refine_samples": 16, "rounding_iterations": 5}
    quantized, report = kpq.convert(
        model, 4, 4, calibration_data=x, refine=["grid", "rounding"], bias_correction=False, **fast
    )
    assert report.refinement[-1]["loss_after"] <= report.refinement[0]["loss_before"]
    for name, class_name in QUANTIZED.items():
        assert type(quantized.get_layer(name)).__name__ == class_name

"""Functional graphs with `keras.ops` calls that are not layers (`x + y`,
`keras.ops.mean`...): flat graph, plan, data-free statistics, build, `.keras`
round trip, export, calibration, bias correction and refinement."""

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.converter.folding import plan_folds
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.statistics import propagate_statistics
from tests import models as M

L = keras.layers
KERNEL_LAYERS = ["c1", "c2", "c3", "gate_conv", "c_signed", "c_unsigned", "classifier"]


@pytest.fixture(scope="module")
def model():
    return M.keras_ops_model()


@pytest.fixture(scope="module")
def inputs(model):
    return M.reference_inputs(model, 64, seed=5)


@pytest.fixture(scope="module")
def data_free(model):
    return kpq.convert(model, 8, 8)


def _relative_error(reference, outputs):
    return float(np.linalg.norm(outputs - reference) / np.linalg.norm(reference))


def test_flat_graph_holds_operations_that_are_not_layers(model):
    graph = FlatGraph(model)
    operations = [op for op in graph.ops if not op.is_layer]
    names = sorted(type(op.layer).__name__ for op in operations)
    assert names == ["Add", "Add", "Clip", "Gelu", "Mean", "Multiply", "Multiply", "Multiply", "Relu", "Relu"]
    # graph.layers() lists layers only: the report's per-layer table.
    assert all(isinstance(layer, L.Layer) for layer in graph.layers())
    # Running the flat graph reproduces the model, operations included.
    x = M.reference_inputs(model, 4)
    outputs, _ = graph.evaluate([x], lambda op, args, kwargs: op.run(args, kwargs, training=False))
    np.testing.assert_allclose(np.asarray(outputs[0]), M.predict(model, x)[0], rtol=1e-5, atol=1e-6)


def test_data_free_conversion_quantizes_every_kernel_around_operations(model, inputs, data_free):
    quantized, report = data_free
    assert [layer.name for layer in report.quantized_layers] == KERNEL_LAYERS
    assert report.float_layers == []
    error = _relative_error(M.predict(model, inputs)[0], M.predict(quantized, inputs)[0])
    assert error < 0.1  # W8/A8; a mis-signed or unquantized tensor gives 0.3+ (see test_convert)


def test_activation_operations_become_quantized_activations(data_free):
    quantized, report = data_free
    by_name = {a.name: a for a in report.activations}
    # keras.ops.relu and keras.ops.clip(x, 0, 6) feed quantized layers: replaced, unsigned.
    assert (by_name["relu"].kind, by_name["relu"].activation, by_name["relu"].signed) == ("activation", "relu", False)
    assert (by_name["clip"].kind, by_name["clip"].activation, by_name["clip"].signed) == ("activation", "relu6", False)
    assert by_name["clip"].rule == "propagated: add -> clip (1 step from a normalization)"
    assert isinstance(quantized.get_layer("relu"), kpq.PowerQuantActivation)
    # Signed or not from the graph: BatchNorm * gate is signed, relu * (relu6(x + 3) / 6) is not.
    assert by_name["c_signed_input_quantizer"].signed is True
    assert by_name["c_unsigned_input_quantizer"].signed is False
    assert by_name["c_unsigned_input_quantizer"].rule == "propagated: product (2 steps from a normalization)"
    # keras.ops.mean over positions and the (approximate) gelu op have data-free statistics.
    assert by_name["gate_conv_input_quantizer"].status == "quantized"
    assert by_name["classifier_input_quantizer"].rule == "batchnorm -> gelu -> average pooling"
    # Only the model input, which has no statistics without data, stays float.
    assert [a.name for a in report.activations if a.status != "quantized"] == ["c1_input_quantizer"]


def test_operation_statistics_match_sampled_values():
    inputs = keras.Input((4, 4, 6))
    a = L.BatchNormalization(name="a")(inputs)
    b = L.BatchNormalization(name="b")(inputs)
    shifted = a * 2.0 + 1.0
    product = keras.ops.multiply(a, b)
    model = keras.Model(inputs, [shifted, product])
    rng = np.random.default_rng(0)
    gammas, betas = rng.uniform(0.5, 1.5, (2, 6)), rng.normal(0.0, 1.0, (2, 6))
    for layer, gamma, beta in zip(model.layers[1:3], gammas, betas):
        layer.set_weights([gamma, beta, np.zeros(6), np.ones(6) - layer.epsilon])
    graph = FlatGraph(model)
    stats = propagate_statistics(graph, plan_folds(graph)[0])
    shifted_stats, product_stats = (stats[key].gaussians for key in graph.output_keys)
    np.testing.assert_allclose(shifted_stats.mean, 2 * betas[0] + 1, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(shifted_stats.var, 4 * gammas[0] ** 2, rtol=0.02)
    assert product_stats.rule == "propagated: product"
    np.testing.assert_allclose(product_stats.mean, betas[0] * betas[1])
    second_moments = (gammas**2 + betas**2).prod(axis=0)
    np.testing.assert_allclose(product_stats.var, second_moments - (betas[0] * betas[1]) ** 2)


def test_keras_round_trip_and_export_keep_operations(data_free, inputs, tmp_path):
    quantized, report = data_free
    path = tmp_path / "model.keras"
    quantized.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(M.predict(loaded, inputs)[0], M.predict(quantized, inputs)[0])
    kpq.export_model(quantized, tmp_path / "export", version=1, report=report)
    assert (tmp_path / "export" / "1" / "saved_model.pb").is_file()


def test_calibrated_bias_corrected_refined_conversion_runs_operations(model, inputs):
    quantized, report = kpq.convert(
        model, 4, 4, calibration_data=inputs, bias_correction="empirical", refine=["grid"],
        refine_evaluations=20, refine_samples=32,
    )
    assert [a.name for a in report.activations if a.status != "quantized"] == []
    error = _relative_error(M.predict(model, inputs)[0], M.predict(quantized, inputs)[0])
    assert error < 0.3  # W4/A4 calibrated; measured 0.09


def test_mobilenet_v3_small_converts_data_free():
    # Its hard sigmoid is `ReLU(6)(x + 3) * (1 / 6)`: `Add` and `Multiply` operations.
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=10,
        include_preprocessing=False, classifier_activation=None,
    )
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            statistics = [rng.normal(0, 0.2, c), rng.uniform(0.5, 2, c)]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c)] + statistics)
    quantized, report = kpq.convert(model, 8, 8)
    kernels = [layer.name for layer in model.layers if hasattr(layer, "kernel") or hasattr(layer, "depthwise_kernel")]
    assert sorted(layer.name for layer in report.quantized_layers) == sorted(kernels)
    x = rng.uniform(-1.0, 1.0, (8, 32, 32, 3)).astype("float32")
    error = _relative_error(M.predict(model, x)[0], M.predict(quantized, x)[0])
    assert error < 0.1  # measured 0.02

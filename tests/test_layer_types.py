"""Conv1D (causal), Conv3D, grouped Conv2D, Dense on sequences and BatchNorms folded forward, end to end.

The `layer_types` test model (tests/models.py) holds one of each. Converted,
every linear layer must be a PowerQuant layer of int8 codes, the folded
BatchNorms must be gone, data-free statistics and both bias corrections
must reach every layer whose input has statistics, and the model must
survive a `.keras` round trip and a SavedModel export served in a process
without keras_powerquant. (Accuracy against float at W8/A8, determinism and
the report are checked for every test model in test_convert.py.)
"""

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.converter.statistics import _flattened
from keras_powerquant.converter.statistics import TensorStats
from keras_powerquant.export import export_model
from keras_powerquant.quantization.statistics import ChannelGaussians
from tests import models as M
from tests.serving_graph import nodes_without_gpu_kernel
from tests.serving_graph import serving_nodes
from tests.test_export import _serve_in_fresh_process

L = keras.layers
QUANTIZED = {
    "stem": kpq.PowerQuantConv2D,
    "grouped": kpq.PowerQuantConv2D,
    "conv3d": kpq.PowerQuantConv3D,
    "causal": kpq.PowerQuantConv1D,
    "conv1d_valid": kpq.PowerQuantConv1D,
    "conv1d_same": kpq.PowerQuantConv1D,
    "seq_dense": kpq.PowerQuantDense,
    "classifier": kpq.PowerQuantDense,
}
# Layers whose input has data-free statistics: all but `stem`, which reads the model input.
CORRECTED = set(QUANTIZED) - {"stem"}


@pytest.fixture(scope="module")
def original():
    model = M.build("layer_types")
    return model, M.reference_inputs(model, 128, seed=7)


@pytest.fixture(scope="module")
def data_free(original):
    return kpq.convert(original[0], 4, 4)


def test_every_linear_layer_is_quantized_to_int8_codes(data_free):
    model, report = data_free
    classes = {name: cls.__name__.replace("PowerQuant", "") for name, cls in QUANTIZED.items()}
    assert {e.name: e.class_name for e in report.quantized_layers} == classes
    assert report.float_layers == []
    for name, cls in QUANTIZED.items():
        layer = model.get_layer(name)
        assert type(layer) is cls
        assert layer.kernel_codes.dtype == "int8"
        if layer.weight_bits <= 4:
            assert layer.kernel_codes.shape == ((int(np.prod(layer._kernel_shape)) + 1) // 2,)
    assert model.get_layer("grouped").groups == 2
    assert model.get_layer("grouped")._kernel_shape == (3, 3, 4, 8)
    assert model.get_layer("causal").padding == "causal"


def test_batch_norms_fold_forward_where_exact_and_the_others_are_reported(data_free):
    model, report = data_free
    folded = {e["batch_norm"]: e["into"] for e in report.folded_batch_norms}
    assert folded == M.EXPECTED_FOLDS["layer_types"]
    kept = {e["batch_norm"]: e["reason"] for e in report.unfolded_batch_norms}
    assert list(kept) == ["pad_bn"] and "conv1d_same" in kept["pad_bn"]
    assert [layer.name for layer in model.layers if type(layer) is L.BatchNormalization] == ["pad_bn"]
    assert report.layer("stem").folded_batch_norm == "input_bn, stem_bn"
    assert report.layer("seq_dense").folded_batch_norm == "dense_input_bn, seq_dense_bn"


@pytest.mark.parametrize("mode", ["analytic", "empirical"])
def test_data_free_statistics_and_bias_correction_reach_the_new_layer_types(original, mode):
    model, inputs = original
    calibration = inputs if mode == "empirical" else None
    quantized, report = kpq.convert(model, 8, 8, calibration_data=calibration, bias_correction=mode)
    corrected = {e.name for e in report.layers if e.bias_correction == mode}
    assert corrected == (CORRECTED if mode == "analytic" else set(QUANTIZED))
    if mode == "analytic":
        # Every activation quantizer but the model input's is fitted without data.
        fitted = {a.name for a in report.activations if a.status == "quantized"}
        assert fitted == {a.name for a in report.activations} - {"stem_input_quantizer"}
    expected = model.predict(inputs, verbose=0)
    error = np.linalg.norm(quantized.predict(inputs, verbose=0) - expected) / np.linalg.norm(expected)
    # W8/A8 on 8 quantized layers: ~1 % of noise per quantized tensor (test_convert.py's bound is 0.1).
    assert error < 0.1, error


def test_keras_file_and_saved_model_reproduce_the_quantized_model(data_free, original, tmp_path):
    model, report = data_free
    inputs = original[1][:16]
    expected = model.predict(inputs, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.predict(inputs, verbose=0), expected)
    for name in QUANTIZED:
        assert loaded.get_layer(name).get_config() == model.get_layer(name).get_config()
    saved_model_dir = export_model(model, tmp_path / "export", 1, report=report).saved_model_dir
    served = _serve_in_fresh_process(saved_model_dir, {"image": inputs}, tmp_path)
    assert np.max(np.abs(served["classifier"] - expected)) <= 1e-5
    assert nodes_without_gpu_kernel(serving_nodes(saved_model_dir)) == []


@pytest.mark.parametrize("output_shape", [(6, 6, 2, 4), (36, 16), (288,), (6, 6, 8)])
def test_channel_statistics_follow_a_reshape(output_shape):
    rng = np.random.default_rng(len(output_shape))
    gaussians = ChannelGaussians(rng.normal(0, 1, 8), rng.uniform(0.2, 2, 8), "test")
    x = gaussians.mean + np.sqrt(gaussians.var) * rng.standard_normal((4000, 6, 6, 8))
    reshaped = _flattened(TensorStats.of_gaussians(gaussians), (None, 6, 6, 8), (None,) + output_shape).gaussians
    y = x.reshape((-1, output_shape[-1]))
    n = y.shape[0]  # samples per output channel; 5-sigma tolerances
    np.testing.assert_allclose(reshaped.mean, y.mean(axis=0), atol=5 * np.sqrt(y.var(axis=0).max() / n))
    np.testing.assert_allclose(reshaped.var, y.var(axis=0), rtol=5 * np.sqrt(2 / n))


def test_channel_statistics_are_unknown_after_a_reshape_that_mixes_them():
    gaussians = ChannelGaussians(np.zeros(8), np.ones(8), "test")
    assert _flattened(TensorStats.of_gaussians(gaussians), (None, 6, 6, 8), (None, 48, 6)).gaussians is None


def test_refinement_tunes_the_new_layer_types(original):
    model, inputs = original
    steps = ["grid", "granularity", "lapq", "rounding"]
    quantized, report = kpq.convert(
        model, 4, 4, calibration_data=inputs[:48], refine=steps, bias_correction=False,
        refine_evaluations=10, refine_samples=48, rounding_iterations=10,
    )
    assert [step["name"] for step in report.refinement] == steps
    for step in report.refinement:
        assert step["loss_after"] <= step["loss_before"], step
    assert report.refinement[-1]["loss_after"] < report.refinement[0]["loss_before"]
    assert {type(quantized.get_layer(name)) for name in QUANTIZED} == set(QUANTIZED.values())

"""Weight-only quantization (`abits=None`, `kpq convert --abits float`): codes for weights, float activations."""

import json
import os

import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.export import export_model
from keras_powerquant.layers import PowerQuantActivation
from keras_powerquant.layers import QuantizedKernelLayer
from tests import models
from tests.cli_helpers import assert_one_line_error
from tests.cli_helpers import invoke
from tests.serving_graph import load_nodes
from tests.serving_graph import nodes_without_gpu_kernel
from tests.serving_graph import serving_nodes
from tests.test_export import _serve_in_fresh_process


@pytest.fixture(scope="module")
def resnet_style():
    return models.build("resnet")


@pytest.fixture(scope="module")
def weight_only(resnet_style):
    return kpq.convert(resnet_style, 4, None)


def _kernel_layers(model):
    return {layer.name: layer for layer in models.leaf_layers(model) if isinstance(layer, QuantizedKernelLayer)}


def test_weights_are_codes_and_no_activation_is_quantized(weight_only, resnet_style):
    quantized, report = weight_only
    assert not any(isinstance(layer, PowerQuantActivation) for layer in models.leaf_layers(quantized))
    kernels = _kernel_layers(quantized)
    assert sorted(kernels) == sorted(layer.name for layer in report.quantized_layers)
    assert all(layer.kernel_codes.dtype == "int8" for layer in kernels.values())
    # BatchNorms are folded away; ReLUs and Add stay the float layers they were.
    assert not models.batch_norms(quantized)
    assert len(report.folded_batch_norms) == len(models.batch_norms(resnet_style))
    assert report.activations == []
    assert all(layer.input_bits is None and layer.input_quantizer is None for layer in report.quantized_layers)
    assert report.options["abits"] is None
    assert "abits=float" in report.summary()


def test_weight_codes_equal_those_of_the_full_conversion(weight_only, resnet_style):
    """Only activations differ from W4/A4: the same weights, fitted the same way."""
    full, _ = kpq.convert(resnet_style, 4, 4)
    full_kernels = _kernel_layers(full)
    for name, layer in _kernel_layers(weight_only[0]).items():
        assert layer.weight_exponent == full_kernels[name].weight_exponent
        np.testing.assert_array_equal(layer.kernel_codes.numpy(), full_kernels[name].kernel_codes.numpy())


def test_outputs_are_the_float_model_with_dequantized_kernels(resnet_style):
    """At 8 bits the weight-only model is within weight rounding of float, and closer than W8/A8."""
    x = models.reference_inputs(resnet_style, n=32)
    (expected,) = models.predict(resnet_style, x)
    (weights_only,) = models.predict(kpq.convert(resnet_style, 8, None)[0], x)
    (both,) = models.predict(kpq.convert(resnet_style, 8, 8)[0], x)
    weight_error = np.max(np.abs(weights_only - expected))
    assert 0 < weight_error < 0.02
    assert weight_error < np.max(np.abs(both - expected))


def test_export_serves_the_same_outputs_in_a_fresh_process(weight_only, resnet_style, tmp_path):
    quantized, report = weight_only
    result = export_model(quantized, tmp_path / "out", report=report, float_model=resnet_style)
    x = models.reference_inputs(resnet_style, n=16)
    served = _serve_in_fresh_process(result.saved_model_dir, {"image": x}, tmp_path)
    (expected,) = models.predict(quantized, x)
    assert np.max(np.abs(served["classifier"] - expected)) <= 1e-5
    with open(result.report_path, encoding="utf-8") as file:
        assert json.load(file)["sizes"]["variable_ratio"] < 0.5
    # The serving graph: float ops on decoded kernels, no quantizer; every op has a GPU kernel.
    nodes = serving_nodes(result.saved_model_dir) + load_nodes(result.saved_model_dir)
    assert not {"FakeQuantWithMinMaxArgs", "Sqrt", "Exp"} & {node.op for node in nodes}
    assert nodes_without_gpu_kernel(nodes) == []


def test_callback_exports_weight_only(tmp_path):
    model = models.build("resnet")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = models.reference_inputs(model, n=16)
    callback = kpq.PowerQuantExport(str(tmp_path / "out"), wbits=8, abits=None, verbose=0)
    model.fit(x, np.zeros(16, "int32"), epochs=1, verbose=0, callbacks=[callback])
    assert callback.report.options["abits"] is None and callback.report.activations == []


def test_cli_abits_float(tmp_path):
    model = models.build("resnet")
    path = tmp_path / "model.keras"
    model.save(path)
    result = invoke("convert", path, "-o", tmp_path / "out", "--abits", "float", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["options"]["abits"] is None and report["activations"] == []
    inspected = invoke("inspect", path, "--abits", "float")
    assert inspected.exit_code == 0, inspected.output
    assert "abits=float" in inspected.stdout and "4-bit" not in inspected.stdout
    assert "fast_activations" not in inspected.stdout and "Activation exponents" not in inspected.stdout


@pytest.mark.parametrize("value", ["half", "1", "9", "float32", ""])
def test_cli_bad_abits_exit_2_and_write_nothing(tmp_path, value):
    model = models.build("resnet")
    path = tmp_path / "model.keras"
    model.save(path)
    result = invoke("convert", path, "-o", tmp_path / "out", "--abits", value)
    assert result.exit_code == 2, result.output
    assert "--abits" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_bad_abits_in_python_is_a_clear_error(resnet_style):
    with pytest.raises(ValueError, match="abits"):
        kpq.convert(resnet_style, 4, "float")
    with pytest.raises(ValueError, match="abits"):
        kpq.PowerQuantExport("out", abits=0)


def test_cli_failure_still_one_line_for_weight_only(tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_text("not a model")
    result = invoke("convert", broken, "-o", tmp_path / "out", "--abits", "float")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr)

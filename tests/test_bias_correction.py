"""Bias correction (docs/method.md §7): the padding model, and real corrections on real models.

The output means are computed here with Keras' own convolutions on recorded
layer inputs, independently of the converter's formula.
"""

import json

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.errors import UnsupportedModelError
from keras_powerquant.quantization.bias_correction import effective_kernel
from keras_powerquant.quantization.bias_correction import mean_output
from keras_powerquant.quantization.bias_correction import tap_coverage
from tests import models
from tests.cpu_kernels import skip_unless_runs


@pytest.mark.parametrize(
    "size, kernel, stride, dilation, padding, depthwise",
    [
        ((9, 9), (3, 3), 1, 1, "same", False),
        ((8, 7), (3, 3), 2, 1, "same", False),
        ((10, 10), (4, 2), 3, 1, "same", False),
        ((11, 9), (3, 3), 1, 2, "same", True),
        ((8, 8), (3, 3), 2, 1, "same", True),
        ((9, 6), (3, 2), 1, 1, "valid", False),
        ((9,), (3,), 1, 2, "causal", False),
        ((10,), (4,), 3, 1, "causal", False),
    ],
)
def test_padding_model_gives_the_exact_mean_of_a_constant_input(size, kernel, stride, dilation, padding, depthwise):
    rng = np.random.default_rng(0)
    channels, outputs = 3, 2
    means = rng.normal(size=channels)
    x = np.broadcast_to(means, (2, *size, channels)).astype(np.float32)
    if depthwise:
        weights = rng.normal(size=(*kernel, channels, outputs)).astype(np.float32)
        y = keras.ops.depthwise_conv(x, weights, stride, padding, dilation_rate=dilation)
    elif padding == "causal":  # Keras' Conv1D: zeros before the sequence, then "valid"
        weights = rng.normal(size=(*kernel, channels, outputs)).astype(np.float32)
        padded = np.pad(x, ((0, 0), ((kernel[0] - 1) * dilation, 0), (0, 0)))
        y = keras.ops.conv(padded, weights, stride, "valid", dilation_rate=dilation)
    else:
        weights = rng.normal(size=(*kernel, channels, outputs)).astype(np.float32)
        y = keras.ops.conv(x, weights, stride, padding, dilation_rate=dilation)
    expected = keras.ops.convert_to_numpy(y).reshape(-1, y.shape[-1]).mean(axis=0)
    coverage = [tap_coverage(s, k, stride, dilation, padding) for s, k in zip(size, kernel)]
    layout = "depthwise" if depthwise else "conv"
    got = mean_output(effective_kernel(weights, layout, coverage), means, layout)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_invalid_layout_and_padding_are_rejected():
    with pytest.raises(ValueError, match="layout"):
        effective_kernel(np.ones((3, 2)), "grouped")
    with pytest.raises(ValueError, match="padding"):
        tap_coverage(8, 3, padding="full")


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_mean_output_is_the_mean_of_a_grouped_convolution(groups):
    rng = np.random.default_rng(groups)
    means = rng.normal(size=8)
    x = np.broadcast_to(means, (2, 7, 7, 8)).astype(np.float32)
    weights = rng.normal(size=(3, 3, 8 // groups, 2 * groups)).astype(np.float32)
    y = keras.ops.conv(x, weights, 1, "same")
    expected = keras.ops.convert_to_numpy(y).reshape(-1, y.shape[-1]).mean(axis=0)
    coverage = [tap_coverage(7, 3, padding="same")] * 2
    got = mean_output(effective_kernel(weights, "conv", coverage), means, "conv", groups)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _output_means(layer, inputs, kernel, bias):
    """Per-channel mean of the pre-activation output `W * x + b` of a Dense/Conv layer."""
    if isinstance(layer, keras.layers.Dense):
        y = keras.ops.matmul(inputs, kernel)
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        y = keras.ops.depthwise_conv(inputs, kernel, layer.strides, layer.padding, dilation_rate=layer.dilation_rate)
    else:
        y = keras.ops.conv(inputs, kernel, layer.strides, layer.padding, dilation_rate=layer.dilation_rate)
    y = keras.ops.convert_to_numpy(y)
    return y.reshape(-1, y.shape[-1]).mean(axis=0) + (0.0 if bias is None else bias)


def _layer_inputs(model, names, x):
    probe = keras.Model(model.inputs, [model.get_layer(n).input for n in names])
    outputs = probe(keras.tree.flatten(x), training=False)
    return [keras.ops.convert_to_numpy(v) for v in keras.tree.flatten(outputs)]


def _mean_output_shifts(original, quantized, report, x):
    """Per quantized layer: `|E[quantized output] - E[float output]|` (L2 over channels) on `x`."""
    folded, _ = kpq.fold_batch_norms(original)
    names = [layer.name for layer in report.quantized_layers]
    float_inputs = _layer_inputs(folded, names, x)
    quantized_inputs = _layer_inputs(quantized, names, x)
    shifts = {}
    for name, xf, xq in zip(names, float_inputs, quantized_inputs):
        float_layer, layer = folded.get_layer(name), quantized.get_layer(name)
        float_bias = float_layer.bias.numpy() if float_layer.use_bias else None
        expected = _output_means(float_layer, xf, float_layer.kernel.numpy(), float_bias)
        got = _output_means(float_layer, xq, layer.dequantized_kernel().numpy(), layer.bias.numpy())
        shifts[name] = float(np.linalg.norm(got - expected))
    return shifts


@pytest.fixture(scope="module")
def resnet8_corrections(resnet8_model, cifar_calibration, cifar_test):
    """Shifts on 200 test images without, with empirical and with analytic correction, W4/A4."""
    x = cifar_test[0][:200]
    results = {}
    for name, options in [
        ("none", {"bias_correction": False, "calibration_data": cifar_calibration[:256]}),
        ("empirical", {"bias_correction": "empirical", "calibration_data": cifar_calibration[:256]}),
        ("analytic", {"bias_correction": "analytic", "calibration_data": cifar_calibration[:256]}),
    ]:
        quantized, report = kpq.convert(resnet8_model, 4, 4, **options)
        results[name] = (report, _mean_output_shifts(resnet8_model, quantized, report, x))
    return results


def test_empirical_correction_shrinks_every_layers_mean_output_shift(resnet8_corrections):
    _, without = resnet8_corrections["none"]
    report, corrected = resnet8_corrections["empirical"]
    assert [layer.bias_correction for layer in report.quantized_layers] == ["empirical"] * 10
    for name in without:
        # Measured on test images the correction never saw.
        assert corrected[name] < without[name], name
    assert sum(corrected.values()) < 0.5 * sum(without.values())


def test_analytic_correction_shrinks_the_total_mean_output_shift(resnet8_corrections):
    _, without = resnet8_corrections["none"]
    report, corrected = resnet8_corrections["analytic"]
    first = report.quantized_layers[0]
    assert first.bias_correction == "none: no data-free statistics of its input"
    assert first.bias_shift is None
    assert sum(corrected.values()) < 0.7 * sum(without.values())


def test_analytic_and_empirical_shifts_agree_in_sign(resnet8_model, cifar_calibration):
    """Sign agreement per channel, where the empirical shift is large.

    Each shift is read back from the converted models: the folded float bias
    minus the corrected bias. The empirical shift also carries what arrives
    from upstream (activation quantization, earlier layers), which the
    analytic one ignores, so small shifts may disagree. Definition: among the
    channels whose empirical shift is at or above its layer's median
    magnitude. A run at W4/A4 (256 calibration images) gave 97.6% agreement
    over all layers, 93.8% to 100% per conv layer, and 60% on the 10-channel
    Dense layer, whose shift comes mostly from upstream (its own weights are
    8-bit); the thresholds leave a margin.
    """
    folded, _ = kpq.fold_batch_norms(resnet8_model)
    empirical, _ = kpq.convert(resnet8_model, 4, 4, calibration_data=cifar_calibration[:256])
    analytic, report = kpq.convert(resnet8_model, 4, 4, bias_correction="analytic")
    agree, total = 0, 0
    for layer in report.quantized_layers:
        if layer.bias_shift is None:
            continue
        float_bias = folded.get_layer(layer.name).bias.numpy()
        shift_e = float_bias - empirical.get_layer(layer.name).bias.numpy()
        shift_a = float_bias - analytic.get_layer(layer.name).bias.numpy()
        large = np.abs(shift_e) >= np.median(np.abs(shift_e))
        same = np.sign(shift_e[large]) == np.sign(shift_a[large])
        if layer.class_name == "Conv2D":
            assert same.mean() >= 0.8, layer.name
        agree, total = agree + same.sum(), total + same.size
    assert total >= 150
    assert agree / total >= 0.9


# ---------------------------------------------------------------------------
# Models without biases, depthwise layers, bad options.


def test_layers_without_bias_get_one_and_depthwise_shifts_shrink():
    model = models.build("mobilenet", seed=3)
    x = models.reference_inputs(model, n=128, seed=7)
    calibration = models.reference_inputs(model, n=256, seed=8)
    results = {}
    for mode in (False, "empirical"):
        quantized, report = kpq.convert(model, 3, 4, bias_correction=mode, calibration_data=calibration)
        results[mode] = (quantized, report, _mean_output_shifts(model, quantized, report, x))
    quantized, report, corrected = results["empirical"]
    # dw1 has neither bias nor BatchNorm before folding: its folded form has a bias; the
    # classifier keeps its own. Every quantized layer holds its correction in a bias.
    assert all(layer.bias is not None for layer in (quantized.get_layer(n) for n in corrected))
    without = results[False][2]
    for name in ("dw1", "dw2"):
        assert corrected[name] < without[name], name
    assert sum(corrected.values()) < sum(without.values())


@pytest.mark.parametrize("value", ["yes", "Analytic", 1, None, "auto"])
def test_invalid_bias_correction_values(value):
    model = models.build("sequential")
    with pytest.raises(ValueError, match="`bias_correction` must be True, False, 'analytic' or 'empirical'"):
        kpq.convert(model, 4, 4, bias_correction=value)


def test_empirical_correction_needs_calibration_data():
    model = models.build("sequential")
    with pytest.raises(ValueError, match="needs calibration data"):
        kpq.convert(model, 4, 4, bias_correction="empirical")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_invalid_weight_clipping_values(value):
    model = models.build("sequential")
    with pytest.raises(ValueError, match="`weight_clipping` must be True or False"):
        kpq.convert(model, 4, 4, weight_clipping=value)


def test_cli_options_and_usage_errors(tmp_path):
    from tests.cli_helpers import invoke
    from tests.cli_helpers import save_small_model

    _, paths = save_small_model(tmp_path)
    out = tmp_path / "out"
    result = invoke("convert", paths["keras"], "-o", out, "--bias-correction", "empirical")
    assert result.exit_code == 2
    assert "--bias-correction empirical needs --calibration-data" in result.stderr
    result = invoke("convert", paths["keras"], "-o", out, "--bias-correction", "sometimes")
    assert result.exit_code == 2 and "Invalid value for '--bias-correction'" in result.stderr
    assert not out.exists()
    result = invoke(
        "convert", paths["keras"], "-o", out, "--weight-clipping", "--bias-correction", "analytic", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["options"]["weight_clipping"] is True
    assert report["options"]["bias_correction"] == "analytic"
    assert all(0.05 <= layer["weight_clip"] <= 1.0 for layer in report["layers"] if layer["status"] == "quantized")


def test_channels_first_layers_are_left_uncorrected_with_a_reason():
    inputs = keras.Input((3, 8, 8))
    convolution = keras.layers.Conv2D(4, 3, padding="same", data_format="channels_first", name="conv_cf")
    skip_unless_runs(convolution, (3, 8, 8))
    x = convolution(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    model = keras.Model(inputs, outputs)
    calibration = np.random.default_rng(0).random((16, 3, 8, 8)).astype("float32")
    _, report = kpq.convert(model, 4, 4, calibration_data=calibration)
    assert report.layer("conv_cf").bias_correction == "none: channels_first layout"
    assert report.layer("head").bias_correction == "empirical"


@pytest.mark.parametrize("options", [{"bias_correction": "sometimes"}, {"weight_clipping": "yes"}])
def test_callback_rejects_bad_options_at_construction(tmp_path, options):
    with pytest.raises(ValueError, match="must be"):
        kpq.PowerQuantExport(tmp_path / "export", **options)


class _RefusedOnThisDevice(keras.layers.Layer):
    """Fails as TensorFlow's plain CPU kernels fail a channels_first Conv2D: an InvalidArgumentError from an op."""

    def call(self, x):
        import tensorflow as tf

        tf.debugging.assert_less(x, -1.0, message="The Conv2D op currently only supports the NHWC tensor format")
        return x


def test_a_float_layer_this_machine_cannot_run_is_named_in_a_clear_error():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = _RefusedOnThisDevice(name="refused")(x)
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(x))
    calibration = np.random.default_rng(0).random((4, 8, 8, 3)).astype("float32")
    with pytest.raises(UnsupportedModelError) as raised:
        kpq.convert(keras.Model(inputs, outputs), 4, 4, calibration_data=calibration)
    message = str(raised.value)
    assert message.startswith("Layer 'refused' (_RefusedOnThisDevice) cannot run on this machine's TensorFlow kernels")
    assert "only supports the NHWC tensor format" in message and "\n" not in message

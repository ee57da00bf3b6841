"""`convert` on the built test models (tests/models.py): graph rewriting,
the report, options, calibration, determinism, saving, and errors.

Conversions are cached per module: each (model, options) pair is converted
once and shared by the tests that look at it.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant import convert
from keras_powerquant import fold_batch_norms
from keras_powerquant.converter.calibration import record_samples
from keras_powerquant.converter.calibration import ReservoirSampler
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.separable import DEPTHWISE_SUFFIX
from keras_powerquant.converter.separable import is_separable
from keras_powerquant.converter.separable import POINTWISE_SUFFIX
from keras_powerquant.errors import CalibrationDataError
from keras_powerquant.errors import InvalidModelError
from keras_powerquant.errors import ModelLoadError
from keras_powerquant.errors import UnsupportedModelError
from keras_powerquant.report import ConversionReport
from tests import models as M

L = keras.layers
NAMES = sorted(M.BUILDERS)
CONFIGS = [(8, 8, "powerquant"), (8, 8, "uniform"), (4, 4, "powerquant"), (4, 4, "uniform")]
QUANTIZED_CLASS = {
    "Conv1D": kpq.PowerQuantConv1D,
    "Conv2D": kpq.PowerQuantConv2D,
    "Conv3D": kpq.PowerQuantConv3D,
    "DepthwiseConv2D": kpq.PowerQuantDepthwiseConv2D,
    "Dense": kpq.PowerQuantDense,
}

# W8/A8 against float, on 256 uniform [0, 1) inputs (the data the models'
# BatchNorm statistics were taken on). Measured worst cases, data-free:
# relative L2 error of the outputs 0.049 (powerquant) / 0.063 (uniform), both
# on mobilenet, whose fc_bn divides by the small spread of pooled features and
# so magnifies quantization noise ~5x; the others are 0.004-0.032. An 8-bit
# quantizer adds ~0.5-1 % relative noise per tensor and these models chain up
# to 12 of them, so 0.1 bounds them with margin while a mistake (a dropped
# BatchNorm, a wrong clip, signed data in an unsigned quantizer) gives 0.3+.
W8A8_RELATIVE_ERROR = 0.1
# Argmax agreement, measured >= 0.957 (powerquant) / 0.887 (uniform, mobilenet):
# random models have many near-ties. Disagreements must be near-ties.
W8A8_AGREEMENT = 0.85
NEAR_TIE = 0.15


class Original:
    def __init__(self, name):
        self.name = name
        self.model = M.build(name)
        self.inputs = M.reference_inputs(self.model, 256, seed=99)
        self.outputs = M.predict(self.model, self.inputs)
        self.weights = M.weights_of(self.model)


@pytest.fixture(scope="module")
def originals():
    return {name: Original(name) for name in NAMES}


@pytest.fixture(scope="module")
def converted(originals):
    """`converted(name, wbits, abits, method, **options)` -> (model, report), cached."""
    cache = {}

    def get(name, wbits=4, abits=4, method="powerquant", **options):
        key = (name, wbits, abits, method, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = convert(originals[name].model, wbits, abits, method, **options)
        return cache[key]

    return get


def _activation_report(report, name):
    for activation in report.activations:
        if activation.name == name:
            return activation
    raise KeyError(name)


def _relative_error(expected, got):
    return float(np.linalg.norm(expected - got) / np.linalg.norm(expected))


# ---------------------------------------------------------------------------
# Every model converts, and the converted graph matches the report.


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"W{c[0]}A{c[1]}-{c[2]}")
@pytest.mark.parametrize("name", NAMES)
def test_model_converts_and_matches_its_report(originals, converted, name, config):
    original = originals[name]
    model, report = converted(name, *config)
    outputs = M.predict(model, original.inputs)
    assert [o.shape for o in outputs] == [o.shape for o in original.outputs]
    assert all(np.all(np.isfinite(o)) for o in outputs)
    keras.tree.assert_same_structure(model(original.inputs), original.model(original.inputs))

    weighted = [
        layer for layer in M.leaf_layers(original.model)
        if layer.weights and type(layer) is not L.BatchNormalization
    ]
    # A SeparableConv2D is reported as the two layers it is split into.
    names = [
        [layer.name + DEPTHWISE_SUFFIX, layer.name + POINTWISE_SUFFIX] if is_separable(layer) else [layer.name]
        for layer in weighted
    ]
    assert sorted(r.name for r in report.layers) == sorted(sum(names, []))
    assert report.quantized_layers, "nothing was quantized"
    for entry in report.quantized_layers:
        layer = model.get_layer(entry.name)
        assert type(layer) is QUANTIZED_CLASS[entry.class_name]
        assert layer.weight_bits == entry.weight_bits
        assert layer.weight_exponent == entry.exponent
        assert entry.weight_bits in (config[0], 8)
        assert math.isfinite(entry.error) and math.isfinite(entry.uniform_error)
        assert entry.error <= entry.uniform_error
    for entry in report.float_layers:
        assert entry.reason
        assert type(model.get_layer(entry.name)) is type(M.find_layer(original.model, entry.name))
    for entry in report.activations:
        if entry.status != "quantized":
            assert entry.reason and entry.clip is None
            continue
        layer = model.get_layer(entry.name)
        assert type(layer) is kpq.PowerQuantActivation
        q = layer.quantizer
        assert (q.bits, q.clip, q.exponent, q.signed) == (entry.bits, entry.clip, entry.exponent, entry.signed)
        assert entry.bits in (config[1], 8)
        assert entry.clip > 0 and entry.rule
        assert entry.error <= entry.uniform_error
        if config[2] == "uniform":
            assert entry.exponent == 1.0
    if config[2] == "uniform":
        assert {entry.exponent for entry in report.quantized_layers} == {1.0}
    assert str(report)  # the summary renders


@pytest.mark.parametrize("method", ["powerquant", "uniform"])
@pytest.mark.parametrize("name", NAMES)
def test_w8a8_is_close_to_float(originals, converted, name, method):
    original = originals[name]
    model, _ = converted(name, 8, 8, method)
    for expected, got in zip(original.outputs, M.predict(model, original.inputs)):
        error = _relative_error(expected, got)
        assert error < W8A8_RELATIVE_ERROR, f"{name}/{method}: relative error {error:.4f}"
        if expected.shape[-1] > 1:
            agree = expected.argmax(-1) == got.argmax(-1)
            assert agree.mean() >= W8A8_AGREEMENT, f"{name}/{method}: agreement {agree.mean():.3f}"
            top2 = np.sort(expected, axis=-1)[:, -2:]
            margins = (top2[:, 1] - top2[:, 0])[~agree]
            assert np.all(margins < NEAR_TIE), f"{name}/{method}: disagreement at margins {margins}"


@pytest.mark.parametrize("name", NAMES)
def test_input_model_is_not_modified(originals, converted, name):
    original = originals[name]
    converted(name, 4, 4)
    converted(name, 8, 8)
    after = M.weights_of(original.model)
    assert len(after) == len(original.weights)
    for before, now in zip(original.weights, after):
        np.testing.assert_array_equal(before, now)
    for before, now in zip(original.outputs, M.predict(original.model, original.inputs)):
        np.testing.assert_array_equal(before, now)


def test_quantized_kernels_carry_the_folded_batch_norm(originals, converted):
    """Dequantized W8 kernels are close to the folded kernels, not the raw ones."""
    model, report = converted("mobilenet", 8, 8)
    folded, _ = fold_batch_norms(originals["mobilenet"].model)
    for entry in report.quantized_layers:
        reference = folded.get_layer(entry.name).kernel.numpy()
        raw = M.find_layer(originals["mobilenet"].model, entry.name).kernel.numpy()
        kernel = model.get_layer(entry.name).dequantized_kernel().numpy()
        assert _relative_error(reference, kernel) < 0.02, entry.name
        if entry.folded_batch_norm:
            assert _relative_error(raw, kernel) > 0.1, entry.name


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_reported_error_is_the_kernel_reconstruction_error(originals, converted, p):
    """report.error = sum |W_folded - W_hat|^p with W_hat the layer's own kernel."""
    model, report = converted("resnet", 4, 4, p=p)
    assert report.options["p"] == p
    folded, _ = fold_batch_norms(originals["resnet"].model)
    for entry in report.quantized_layers:
        reference = folded.get_layer(entry.name).kernel.numpy().astype(np.float64)
        kernel = model.get_layer(entry.name).dequantized_kernel().numpy().astype(np.float64)
        error = np.sum(np.abs(reference - kernel) ** p)
        assert error == pytest.approx(entry.error, rel=1e-3), entry.name


# ---------------------------------------------------------------------------
# What stays float, and why.


def test_unsupported_layers_stay_float_with_reasons(originals, converted):
    model, report = converted("unsupported", 4, 4)
    reasons = {entry.name: entry.reason for entry in report.float_layers}
    assert set(reasons) == {"scale", "dw1d"}
    assert "ChannelScale" in reasons["scale"]
    assert "compute dtype float16" in reasons["dw1d"]
    assert {e.name for e in report.quantized_layers} == {
        "stem", "sep_depthwise", "sep_pointwise", "grouped", "after_scale", "branch_conv", "classifier"
    }
    kept = {e["batch_norm"] for e in report.unfolded_batch_norms}
    assert kept == {"bn_after_relu", "branch_bn"}
    remaining = {layer.name for layer in model.layers if type(layer) is L.BatchNormalization}
    assert remaining == kept
    # The custom layers are kept as they are.
    assert type(model.get_layer("scale")) is M.ChannelScale
    assert type(model.get_layer("shift")) is M.Shifted
    np.testing.assert_array_equal(
        model.get_layer("scale").scale.numpy(),
        originals["unsupported"].model.get_layer("scale").scale.numpy(),
    )
    # The input of after_scale (the custom layer's output) has no data-free statistics.
    quantizer = _activation_report(report, "after_scale_input_quantizer")
    assert quantizer.status == "float" and "ChannelScale" in quantizer.reason
    assert report.layer("after_scale").input_bits is None


def test_float_layers_keep_their_folded_batch_norm(originals, converted):
    """dw1d_bn folds into a layer that stays float: its folded weights must be used."""
    model, report = converted("unsupported", 4, 4)
    folded_into = {e["batch_norm"]: e["into"] for e in report.folded_batch_norms}
    assert folded_into["dw1d_bn"] == "dw1d"
    folded, _ = fold_batch_norms(originals["unsupported"].model)
    weights = model.get_layer("dw1d").get_weights()
    assert len(weights) == 2
    for got, expected in zip(weights, folded.get_layer("dw1d").get_weights()):
        np.testing.assert_array_equal(got, expected)


def test_layer_whose_config_does_not_round_trip_is_reused():
    model = M.with_opaque_layer()
    x = M.reference_inputs(model, 64, seed=2)
    quantized, report = convert(model, 8, 8)
    assert quantized.get_layer("opaque") is model.get_layer("opaque")
    assert any("opaque" in note for note in report.notes)
    error = _relative_error(M.predict(model, x)[0], M.predict(quantized, x)[0])
    assert error < W8A8_RELATIVE_ERROR


def test_nested_models_are_flattened_and_shared_ones_stay_float(converted):
    model, report = converted("nested", 4, 4)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert report.layer("shared_conv").status == "float"
    assert "shared" in report.layer("shared_conv").reason
    for name in ("stem_conv", "bb_conv1", "inner_conv", "head_conv", "classifier"):
        assert report.layer(name).status == "quantized", name
    assert report.layer("inner_conv").folded_batch_norm == "inner_bn"
    assert {e["batch_norm"] for e in report.unfolded_batch_norms} == {"shared_conv_bn"}
    # The shared block is rebuilt once and called twice.
    assert sum(layer.name == "shared_conv" for layer in model.layers) == 1
    assert len(model.get_layer("shared_conv")._inbound_nodes) == 2


# ---------------------------------------------------------------------------
# Activation quantizers.


def test_every_activation_form_becomes_the_right_quantizer(converted):
    model, report = converted("activations", 4, 4)
    expected = {
        # name: (kind, activation, signed, relu arguments)
        "relu_layer": ("activation", "relu", False, {}),
        "c_fused_relu_relu": ("fused", "relu", False, {}),
        "relu6": ("activation", "relu6", False, {}),
        "relu_max3": ("activation", "relu", False, {"max_value": 3.0}),
        "leaky": ("activation", "relu", True, {"negative_slope": 0.1}),
        "sigmoid": ("activation", "sigmoid", False, {}),
        "tanh": ("activation", "tanh", True, {}),
        "swish": ("activation", "silu", True, {}),
        "after_add_input_quantizer": ("input", "linear", True, {}),
        "fc_fused_relu_relu": ("fused", "relu", False, {}),
    }
    for name, (kind, activation, signed, arguments) in expected.items():
        entry = _activation_report(report, name)
        assert (entry.kind, entry.status, entry.signed) == (kind, "quantized", signed), name
        layer = model.get_layer(name)
        assert layer.activation == activation, name
        for key, value in arguments.items():
            assert getattr(layer, key) == pytest.approx(value), (name, key)
    # The fused activation is split out of its layer.
    assert keras.activations.serialize(model.get_layer("c_fused_relu").activation) == "linear"
    after_add = _activation_report(report, "after_add_input_quantizer")
    assert after_add.rule == "propagated: add (1 step from a normalization)"
    assert _activation_report(report, "relu_layer").rule == "batchnorm -> relu"
    assert _activation_report(report, "c_fused_relu_relu").rule.startswith("propagated")


def test_rules_name_where_statistics_come_from(converted, calibration):
    _, report = converted("resnet", 4, 4)
    rules = {a.name: a.rule for a in report.activations}
    assert rules["stem_relu"] == "batchnorm -> relu"
    assert rules["block1_relu1"] == "batchnorm -> relu"
    assert rules["block1_relu2"] == "propagated: add -> relu (1 step from a normalization)"
    # The model input has no data-free statistics: the first layer reads float.
    stem = _activation_report(report, "stem_input_quantizer")
    assert stem.status == "float" and "calibration" in stem.reason
    assert report.layer("stem").input_bits is None
    _, (_, calibrated) = calibration
    assert {a.rule for a in calibrated.activations} == {"calibration"}
    assert all(a.status == "quantized" for a in calibrated.activations)


def test_first_and_last_layers(converted):
    _, report = converted("resnet", 4, 4)
    positions = {e.name: e.position for e in report.quantized_layers}
    assert positions["stem"] == "first" and positions["classifier"] == "last"
    assert report.layer("stem").weight_bits == 8
    assert report.layer("classifier").weight_bits == 8
    assert report.layer("classifier").input_bits == 8
    assert {e.weight_bits for e in report.quantized_layers if e.position is None} == {4}
    _, both = converted("resnet", 4, 4, quantize_first_last=True)
    assert {e.weight_bits for e in both.quantized_layers} == {4}
    assert both.layer("classifier").input_bits == 4
    _, six = converted("resnet", 4, 4, first_last_bits=6)
    assert six.layer("stem").weight_bits == six.layer("classifier").weight_bits == 6
    # Two outputs: both last layers keep the wide width.
    _, multi = converted("multi_io", 4, 4)
    for name in ("label", "score"):
        assert multi.layer(name).position == "last" and multi.layer(name).weight_bits == 8
    for name in ("img_conv", "feat_dense"):
        assert multi.layer(name).position == "first" and multi.layer(name).weight_bits == 8


def test_default_activation_exponents_are_square_roots_only(converted, originals):
    from keras_powerquant.quantization.search import FAST_ACTIVATION_EXPONENTS

    model, report = converted("activations", 4, 4)
    _, fitted = converted("activations", 4, 4, fast_activations=False)
    assert fitted.options["fast_activations"] is False
    assert set(a.exponent for a in fitted.activations if a.status == "quantized") - set(FAST_ACTIVATION_EXPONENTS)
    exponents = [a.exponent for a in report.activations if a.status == "quantized"]
    assert exponents and set(exponents) <= set(FAST_ACTIVATION_EXPONENTS)
    assert report.options["fast_activations"] is True
    # Weight exponents are still fitted on the whole interval.
    assert [layer.exponent for layer in report.quantized_layers] == [
        layer.exponent for layer in fitted.quantized_layers
    ]
    for act in report.activations:
        if act.status == "quantized":
            assert act.error <= act.uniform_error * (1 + 1e-9)
    inputs = M.reference_inputs(originals["activations"].model)
    assert np.all(np.isfinite(M.predict(model, inputs)))


def test_report_round_trips_through_json(converted):
    _, report = converted("unsupported", 4, 4)
    data = json.loads(report.to_json())
    assert ConversionReport.from_dict(data) == report
    assert data["options"]["wbits"] == 4 and data["options"]["method"] == "powerquant"
    for entry in data["layers"]:
        if entry["status"] == "quantized":
            assert {"exponent", "error", "uniform_error"} <= set(entry)
    summary = report.summary()
    for entry in report.layers:
        assert entry.name in summary


# ---------------------------------------------------------------------------
# Options.


def test_network_scope_shares_one_exponent(converted):
    _, network = converted("activations", 4, 4, scope="network")
    _, layer = converted("activations", 4, 4)
    weight_exponents = {e.exponent for e in network.quantized_layers}
    activation_exponents = {a.exponent for a in network.activations if a.status == "quantized"}
    assert len(weight_exponents) == 1 and len(activation_exponents) == 1
    assert len({e.exponent for e in layer.quantized_layers}) > 1
    # One exponent per layer can only fit better than one for all.
    assert sum(e.error for e in layer.quantized_layers) <= sum(e.error for e in network.quantized_layers)


def test_per_tensor_scales(originals, converted):
    model, report = converted("mobilenet", 4, 4, per_channel=False)
    assert report.options["per_channel"] is False
    for entry in report.quantized_layers:
        assert tuple(model.get_layer(entry.name).kernel_scale.shape) == ()
    per_channel, _ = converted("mobilenet", 4, 4)
    assert tuple(per_channel.get_layer("dw2").kernel_scale.shape) == (12, 2)
    assert all(np.all(np.isfinite(o)) for o in M.predict(model, originals["mobilenet"].inputs))


@pytest.mark.parametrize(
    "options",
    [
        {"wbits": 1},
        {"wbits": 9},
        {"abits": 1},
        {"abits": 9},
        {"wbits": 4.5},
        {"method": "foo"},
        {"scope": "x"},
        {"p": 0},
        {"exponent_bounds": (0.0, 2.0)},
        {"exponent_bounds": (2.0, 0.5)},
        {"first_last_bits": 16},
    ],
    ids=str,
)
def test_invalid_options_raise_before_any_work(options):
    # A path that does not exist: loading it would raise ModelLoadError.
    with pytest.raises(ValueError) as info:
        convert("/nonexistent/model.keras", **options)
    assert not isinstance(info.value, ModelLoadError)


# ---------------------------------------------------------------------------
# Calibration.


def _all_weights(model):
    return [w.numpy() for w in model.weights]


def _assert_same_conversion(a, b):
    (model_a, report_a), (model_b, report_b) = a, b
    weights_a, weights_b = _all_weights(model_a), _all_weights(model_b)
    assert len(weights_a) == len(weights_b)
    for x, y in zip(weights_a, weights_b):
        np.testing.assert_array_equal(x, y)
    assert [(a.name, a.clip, a.exponent) for a in report_a.activations] == [
        (a.name, a.clip, a.exponent) for a in report_b.activations
    ]


@pytest.fixture(scope="module")
def calibration(originals):
    """Calibration images for resnet (not the evaluation inputs) and the reference conversion."""
    x = M.reference_inputs(originals["resnet"].model, 96, seed=5)
    return x, convert(originals["resnet"].model, 4, 4, calibration_data=x)


def test_calibrated_conversion_fits_every_quantizer_on_data(originals, calibration):
    x, (model, report) = calibration
    assert report.options["calibrated"] is True
    assert all(a.status == "quantized" and a.rule == "calibration" for a in report.activations)
    stem = _activation_report(report, "stem_input_quantizer")
    assert stem.signed is True  # a float input: images in [0, 1) here say nothing of served inputs
    assert stem.clip <= float(x.max()) + 1e-6
    assert report.layer("stem").input_bits == 8
    original = originals["resnet"]
    error = _relative_error(original.outputs[0], M.predict(model, original.inputs)[0])
    assert error < 0.2, f"W4/A4 calibrated relative error {error:.3f}"


def test_dataset_generator_and_array_give_the_same_conversion(originals, calibration):
    x, reference = calibration
    labels = np.zeros(len(x), "int64")
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(32)
    model = originals["resnet"].model
    _assert_same_conversion(reference, convert(model, 4, 4, calibration_data=dataset))
    batches = (x[i : i + 32] for i in range(0, len(x), 32))
    _assert_same_conversion(reference, convert(model, 4, 4, calibration_data=batches))


def test_multi_input_calibration_as_dict_list_and_dataset(originals):
    model = originals["multi_io"].model
    x = M.reference_inputs(model, 64, seed=8)
    by_dict = convert(model, 4, 4, calibration_data=x)
    assert all(a.status == "quantized" for a in by_dict[1].activations)
    flat = [x["features"], x["image"]]  # model input order: keras.tree.flatten of the dict
    assert [t.name for t in FlatGraph(model).input_tensors] == ["features", "image"]
    _assert_same_conversion(by_dict, convert(model, 4, 4, calibration_data=flat))
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(64))).batch(32)
    _assert_same_conversion(by_dict, convert(model, 4, 4, calibration_data=dataset))
    list_model = M.build("multi_io", structure="list")
    xl = M.reference_inputs(list_model, 64, seed=8)
    quantized, report = convert(list_model, 4, 4, calibration_data=xl)
    assert all(a.status == "quantized" for a in report.activations)
    assert isinstance(quantized(xl), list)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 12, 12, 4), "float32"),
        np.zeros((4, 12, 12), "float32"),
        np.full((4, 12, 12, 3), "a"),
        np.where(np.arange(4 * 12 * 12 * 3).reshape(4, 12, 12, 3) == 7, np.nan, 0.5).astype("float32"),
        np.zeros((0, 12, 12, 3), "float32"),
        [],
        iter([]),
    ],
    ids=["channels", "rank", "strings", "nan", "no-samples", "empty-list", "empty-generator"],
)
def test_bad_calibration_data_is_rejected(originals, bad):
    with pytest.raises(CalibrationDataError) as info:
        convert(originals["resnet"].model, 4, 4, calibration_data=bad)
    message = str(info.value)
    assert "expected" in message and "got" in message, message


def test_wrong_number_of_inputs_is_rejected(originals):
    model = originals["multi_io"].model
    x = M.reference_inputs(model, 8)
    with pytest.raises(CalibrationDataError):
        convert(model, 4, 4, calibration_data=x["image"])
    with pytest.raises(CalibrationDataError, match="features"):
        convert(model, 4, 4, calibration_data={"image": x["image"]})


def test_calibration_steps_bounds_the_batches_read(originals):
    pulled = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield M.reference_inputs(originals["resnet"].model, 8, seed=i)

    _, report = convert(originals["resnet"].model, 4, 4, calibration_data=batches(), calibration_steps=2)
    assert report.options["calibrated"] is True
    assert len(pulled) <= 3


def test_reservoir_sampler_keeps_a_bounded_uniform_sample():
    capacity, total = 5000, 200_000
    sampler = ReservoirSampler(capacity, seed=0)
    stream = np.arange(total, dtype=np.float32)
    for start in range(0, total, 7919):  # uneven chunks
        sampler.add(stream[start : start + 7919])
        assert sampler.values.size <= capacity
    values = sampler.values
    assert sampler.seen == total and values.size == capacity
    assert np.unique(values).size == capacity  # without replacement
    # A uniform sample of 0..total-1: mean and quantiles within ~4 standard errors.
    standard_error = total / math.sqrt(12 * capacity)
    assert abs(values.mean() - (total - 1) / 2) < 4 * standard_error
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        quantile_error = total * math.sqrt(q * (1 - q) / capacity)
        assert abs(np.quantile(values, q) - q * total) < 4 * quantile_error, q
    # The late stream is represented as well as the early one.
    assert abs(np.mean(values < total / 2) - 0.5) < 4 * 0.5 / math.sqrt(capacity)


def test_recorded_samples_stay_within_capacity(originals):
    model = originals["resnet"].model
    graph = FlatGraph(model)
    keys = [op.output_key for op in graph.ops if type(op.layer) in (L.ReLU, L.Activation)]
    x = M.reference_inputs(model, 64, seed=3)
    batches = ([x[i : i + 16]] for i in range(0, 64, 16))
    samples = record_samples(graph, batches, keys, capacity=1000)
    assert set(samples) == set(keys)
    for values in samples.values():
        assert values.shape == (1000,) and np.all(values >= 0)


@pytest.mark.parametrize("calibrated", [False, True], ids=["data-free", "calibrated"])
def test_conversion_is_deterministic(originals, calibrated):
    model = originals["nested"].model
    data = M.reference_inputs(model, 48, seed=4) if calibrated else None
    first = convert(model, 4, 4, calibration_data=data)
    second = convert(model, 4, 4, calibration_data=data)
    _assert_same_conversion(first, second)


# ---------------------------------------------------------------------------
# Saving, loading, errors.


@pytest.mark.parametrize("name", NAMES)
def test_keras_file_round_trip_reproduces_outputs(originals, converted, tmp_path, name):
    model, _ = converted(name, 4, 4)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    inputs = originals[name].inputs
    for expected, got in zip(M.predict(model, inputs), M.predict(loaded, inputs)):
        np.testing.assert_array_equal(expected, got)


def test_converting_a_keras_file_equals_converting_the_model(originals, converted, tmp_path):
    path = tmp_path / "resnet_float.keras"
    originals["resnet"].model.save(path)
    _assert_same_conversion(converted("resnet", 4, 4), convert(str(path), 4, 4))


def test_subclassed_and_unbuilt_models_are_unsupported():
    model = M.subclassed()
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        convert(model)
    with pytest.raises(UnsupportedModelError, match="input shape"):
        convert(keras.Sequential([L.Dense(2)]))


@pytest.mark.parametrize("layer_name", ["block1_conv2", "block2_proj_bn"])
def test_nan_weight_is_reported_with_its_layer(layer_name):
    model = M.build("resnet")
    weight = model.get_layer(layer_name).weights[0]
    value = weight.numpy()
    value.flat[0] = np.nan
    weight.assign(value)
    with pytest.raises(InvalidModelError, match=f"'{layer_name}'"):
        convert(model)


def test_nan_weight_in_a_nested_model_is_found():
    model = M.build("nested")
    kernel = model.get_layer("backbone").get_layer("inner_block").get_layer("inner_conv").kernel
    value = kernel.numpy()
    value[0, 0, 0, 0] = np.inf
    kernel.assign(value)
    with pytest.raises(InvalidModelError, match="'inner_conv'"):
        convert(model)

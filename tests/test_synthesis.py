"""Synthetic calibration inputs: `synthesize_inputs`, `convert(calibration_data="synthetic")`, `kpq synthesize`.

Generation runs few samples and steps on small models, so these tests stay
fast; the accuracy of synthetic calibration is measured in
benchmarks/synthetic_calibration.py.
"""

import json
import os

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.errors import UnsupportedModelError
from keras_powerquant.synthesis import DEFAULT_NUM_SAMPLES
from keras_powerquant.synthesis import synthesize
from tests import models as M
from tests.cli_helpers import invoke
from tests.cli_helpers import save_small_model

L = keras.layers

# Root mean square over channels of |batch mean - moving mean| / sigma and of
# |batch std / sigma - 1|, per BatchNorm layer, that 30 Adam steps on the
# BatchNorm term alone must reach on 16 samples (measured: below 0.03).
BATCHNORM_TOLERANCE = 0.05
RESNET8_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def resnet_style():
    return M.build("resnet")


def _batchnorm_errors(model, inputs):
    """Per BatchNorm layer: (RMS relative error of the channel means, of the channel stds)."""
    layers = M.batch_norms(model)
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    errors = []
    for value, layer in zip(probe(inputs), layers):
        value = keras.ops.convert_to_numpy(value)
        axes = tuple(range(value.ndim - 1))
        sigma = np.sqrt(keras.ops.convert_to_numpy(layer.moving_variance) + layer.epsilon)
        mean_error = (value.mean(axes) - keras.ops.convert_to_numpy(layer.moving_mean)) / sigma
        std_error = value.std(axes) / sigma - 1
        errors.append((np.sqrt(np.mean(mean_error**2)), np.sqrt(np.mean(std_error**2))))
    return np.array(errors)


def _mlp_classifier(logits=False):
    inputs = keras.Input((6,), name="features")
    x = L.Dense(16, activation="relu", name="hidden")(inputs)
    outputs = L.Dense(4, activation=None if logits else "softmax", name="head")(x)
    keras.utils.set_random_seed(3)
    return keras.Model(inputs, outputs, name="mlp")


def test_same_seed_same_inputs_other_seed_other_inputs(resnet_style):
    first = kpq.synthesize_inputs(resnet_style, 6, seed=4, steps=5)
    again = kpq.synthesize_inputs(resnet_style, 6, seed=4, steps=5)
    other = kpq.synthesize_inputs(resnet_style, 6, seed=5, steps=5)
    assert first.shape == (6, 12, 12, 3) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("input_range", [None, (0.0, 1.0)], ids=["unbounded", "range"])
def test_batchnorm_statistics_match_after_the_steps(resnet_style, input_range):
    start = kpq.synthesize_inputs(resnet_style, 16, steps=0, input_range=input_range, class_term=False)
    inputs = kpq.synthesize_inputs(resnet_style, 16, steps=30, input_range=input_range, class_term=False)
    errors = _batchnorm_errors(resnet_style, inputs)
    assert errors.shape == (len(M.batch_norms(resnet_style)), 2)
    assert np.all(errors <= BATCHNORM_TOLERANCE), errors
    # The optimisation did the matching, not the initialisation.
    assert _batchnorm_errors(resnet_style, start).max() > 2 * BATCHNORM_TOLERANCE
    if input_range is not None:
        assert inputs.min() >= 0.0 and inputs.max() <= 1.0


def test_batchnorm_statistics_of_the_real_resnet8(resnet8_model, cifar_calibration):
    # The first BatchNorm's standard deviation converges slowest: after 100
    # steps it is as close as a batch of 16 real training images gets
    # (measured: 0.21 synthetic, 0.25 real; every other layer below 0.07).
    inputs = kpq.synthesize_inputs(resnet8_model, 16, steps=100, input_range=(0, 255), class_term=False)
    errors = _batchnorm_errors(resnet8_model, inputs)
    assert np.all(errors <= RESNET8_TOLERANCE), errors
    assert np.all(errors[1:] <= 0.1), errors
    assert errors.max() <= _batchnorm_errors(resnet8_model, cifar_calibration[:16]).max()
    assert 0 <= inputs.min() and inputs.max() <= 255


def test_class_term_yields_the_requested_classes(resnet_style):
    result = synthesize(resnet_style, 10, steps=100, input_range=(0, 1))
    np.testing.assert_array_equal(np.sort(result.classes), np.arange(10))  # spread evenly: each class once
    predicted = np.argmax(keras.ops.convert_to_numpy(resnet_style(result.inputs[0])), axis=1)
    np.testing.assert_array_equal(predicted, result.classes)
    requested = np.array([7, 7, 7, 2, 2, 2])
    inputs = kpq.synthesize_inputs(resnet_style, 6, steps=100, input_range=(0, 1), classes=requested)
    np.testing.assert_array_equal(np.argmax(keras.ops.convert_to_numpy(resnet_style(inputs)), axis=1), requested)


def test_several_inputs_follow_shapes_and_dtypes():
    model = M.build("multi_io", structure="list")
    inputs = kpq.synthesize_inputs(model, 5, steps=3)
    assert isinstance(inputs, list) and len(inputs) == 2
    assert [x.shape for x in inputs] == [(5, 8, 8, 3), (5, 6)]
    assert all(x.dtype == np.float32 and np.all(np.isfinite(x)) for x in inputs)
    image = keras.Input((4,), dtype="float64", name="wide")
    x = L.BatchNormalization(name="bn")(L.Dense(3, name="dense")(image))
    wide = keras.Model(image, L.Dense(2, activation="softmax", name="head")(x))
    assert kpq.synthesize_inputs(wide, 3, steps=2).dtype == np.float64


def test_model_without_batchnorm_uses_the_class_term_and_the_report_says_so():
    model = _mlp_classifier(logits=True)
    result = synthesize(model, 8, steps=40)
    assert result.batch_norms == 0 and result.batchnorm_loss is None
    assert result.classifier_outputs == ["head"]
    predicted = np.argmax(keras.ops.convert_to_numpy(model(result.inputs[0])), axis=1)
    assert np.mean(predicted == result.classes) >= 0.75
    _, report = kpq.convert(model, 8, 8, calibration_data=kpq.SyntheticData(num_samples=8, steps=5))
    assert any("no BatchNorm layer" in note and "class term alone" in note for note in report.notes)
    assert "no BatchNorm layer" in report.summary()


def test_model_with_neither_batchnorm_nor_classifier_is_a_clear_error():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, L.Dense(1, name="regression")(L.Dense(8, activation="relu")(inputs)))
    for call in (
        lambda: kpq.synthesize_inputs(model, 4),
        lambda: kpq.convert(model, 8, 8, calibration_data="synthetic"),
    ):
        with pytest.raises(UnsupportedModelError, match="no BatchNormalization layer and no classifier output"):
            call()
    with pytest.raises(UnsupportedModelError, match="class term is off"):
        kpq.synthesize_inputs(_mlp_classifier(), 4, class_term=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"steps": -1}, "steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"input_range": (1.0, 0.0)}, "input_range"),
        ({"input_range": 255}, "input_range"),
    ],
)
def test_invalid_options_are_value_errors(resnet_style, options, message):
    with pytest.raises(ValueError, match=message):
        kpq.synthesize_inputs(resnet_style, **{"num_samples": 2, **options})
    with pytest.raises(ValueError, match=message):
        kpq.SyntheticData(**{"num_samples": 2, **options})


def test_progress_reports_steps_and_loss(resnet_style):
    calls = []
    kpq.synthesize_inputs(resnet_style, 6, steps=10, batch_size=4, progress=lambda *call: calls.append(call))
    assert [done for _, done, _ in calls] == list(range(1, 21))  # two batches of 10 steps
    assert {total for _, _, total in calls} == {20}
    assert all(stage.startswith("synthesis") for stage, _, _ in calls)
    assert "loss" in calls[-1][0]


def test_convert_with_synthetic_calibration(resnet_style):
    quantized, report = kpq.convert(resnet_style, 8, 8, calibration_data="synthetic")
    assert report.options["calibrated"] and report.options["synthetic"]["num_samples"] == DEFAULT_NUM_SAMPLES
    assert "synthesis" in report.seconds
    assert all(a.rule == "calibration" and a.status == "quantized" for a in report.activations)
    assert any(f"synthetic inputs: {DEFAULT_NUM_SAMPLES} samples" in note for note in report.notes)
    x = M.reference_inputs(resnet_style, 32)
    float_top1 = np.argmax(M.predict(resnet_style, x)[0], axis=1)
    assert np.mean(np.argmax(M.predict(quantized, x)[0], axis=1) == float_top1) >= 0.9
    with pytest.raises(ValueError, match='"synthetic"'):
        kpq.convert(resnet_style, 8, 8, calibration_data="synthetc")


def _corrections(report):
    """How the layers' biases were corrected (those that were)."""
    methods = {layer.bias_correction for layer in report.layers}
    return {m for m in methods if m is not None and not m.startswith("none")}


def test_synthetic_data_corrects_biases_from_batch_norm_statistics(resnet_style):
    """Shifts measured on synthetic inputs are not real data's; where BatchNorm gives them, they are computed."""
    synthetic = kpq.SyntheticData(num_samples=8, steps=5, batch_size=8)
    _, report = kpq.convert(resnet_style, 4, 8, calibration_data=synthetic, refine=["grid"])
    assert report.options["bias_correction"] == "analytic"
    assert _corrections(report) == {"analytic"}
    _, data_free = kpq.convert(resnet_style, 4, 8)
    assert data_free.options["bias_correction"] == "analytic"
    # Asked for by name, or on a model without BatchNorm, the shifts are measured on the synthetic samples.
    _, asked = kpq.convert(resnet_style, 4, 8, calibration_data=synthetic, bias_correction="empirical")
    assert _corrections(asked) == {"empirical"}
    _, plain = kpq.convert(_mlp_classifier(), 8, 8, calibration_data=synthetic)
    assert plain.options["bias_correction"] == "empirical"


# ---------------------------------------------------------------------------
# Command line.


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("small"))


def test_cli_synthesize_writes_a_loadable_npy(small, tmp_path):
    model, paths = small
    out = tmp_path / "inputs.npy"
    result = invoke("synthesize", paths["h5"], "-o", out, "-n", "5", "--seed", "2", "--steps", "4")
    assert result.exit_code == 0, result.output
    inputs = np.load(out)
    assert inputs.shape == (5, 8, 8, 3) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs, kpq.synthesize_inputs(model, 5, seed=2, steps=4))
    assert f"Wrote {out}" in result.stdout and "synthesis" in result.stderr
    assert os.listdir(tmp_path) == ["inputs.npy"]
    again = invoke("synthesize", paths["h5"], "-o", out, "-n", "3")
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    assert np.load(out).shape == (5, 8, 8, 3)
    replaced = invoke("synthesize", paths["h5"], "-o", out, "-n", "3", "--steps", "2", "--overwrite")
    assert replaced.exit_code == 0 and np.load(out).shape == (3, 8, 8, 3)


def test_cli_synthesize_several_inputs_need_npz(tmp_path):
    model = M.build("multi_io", structure="list")
    model.save(tmp_path / "multi.keras")
    bad = invoke("synthesize", tmp_path / "multi.keras", "-o", tmp_path / "x.npy", "-n", "2", "--steps", "1")
    assert bad.exit_code == 2 and ".npz" in bad.stderr
    good = invoke("synthesize", tmp_path / "multi.keras", "-o", tmp_path / "x.npz", "-n", "2", "--steps", "1")
    assert good.exit_code == 0, good.output
    arrays = np.load(tmp_path / "x.npz")
    assert {name: arrays[name].shape for name in arrays.files} == {"image": (2, 8, 8, 3), "features": (2, 6)}


@pytest.mark.parametrize(
    "args",
    [["-n", "0"], ["-n", "many"], ["--seed", "-1"], ["--seed", "x"], ["--steps", "-2"], ["--input-range", "1"]],
    ids=lambda a: " ".join(a),
)
def test_cli_synthesize_bad_options_exit_2(small, tmp_path, args):
    result = invoke("synthesize", small[1]["keras"], "-o", tmp_path / "x.npy", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("Error: ")
    assert os.listdir(tmp_path) == []


def test_cli_synthesize_bad_range_or_suffix_exit_2(small, tmp_path):
    for args in (["-o", tmp_path / "x.npy", "--input-range", "1", "0"], ["-o", tmp_path / "x.txt"]):
        result = invoke("synthesize", small[1]["keras"], *args)
        assert result.exit_code == 2, result.output
    assert os.listdir(tmp_path) == []


def test_cli_convert_with_synthetic_calibration(small, tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", small[1]["keras"], "-o", out, "--calibration-data", "synthetic",
                    "--synthetic-samples", "8", "--input-range", "0", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["options"]["synthetic"]["num_samples"] == 8
    assert report["options"]["synthetic"]["input_range"] == [0.0, 1.0]
    assert any("synthetic inputs: 8 samples" in note for note in report["notes"])
    assert os.path.isdir(out / "1")


def test_cli_synthetic_options_need_synthetic_calibration(small, tmp_path):
    for args in (["--synthetic-samples", "8"], ["--input-range", "0", "1"]):
        result = invoke("convert", small[1]["keras"], "-o", tmp_path / "out", *args)
        assert result.exit_code == 2 and "--calibration-data synthetic" in result.stderr, result.output
    result = invoke("convert", small[1]["keras"], "-o", tmp_path / "out", "--calibration-data", "missing.npy")
    assert result.exit_code == 2 and "missing.npy" in result.stderr
    result = invoke("convert", small[1]["keras"], "-o", tmp_path / "out", "--calibration-data", "synthetic",
                    "--synthetic-samples", "0")
    assert result.exit_code == 2
    assert os.listdir(tmp_path) == []


def test_the_synthesis_module_imports_first_in_a_fresh_process():
    """keras_powerquant.synthesis and the converter import each other: either may come first."""
    import subprocess
    import sys

    code = "from keras_powerquant.synthesis import SyntheticData; import keras_powerquant as kpq; print(kpq.convert)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "function convert" in result.stdout

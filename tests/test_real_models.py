"""`convert` on the real MLPerf Tiny models (shared data; skipped when absent).

ResNet-8 is evaluated on the first 932 CIFAR-10 test images (raw 0-255
float32, no scaling), the same images for every model (paired). Each
conversion is done once per module and shared.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_powerquant import convert
from keras_powerquant.loading import load_model_with_notes
from tests import models as M

# Documented in shared/data/README.md: 818 of the 932 images.
RESNET8_FLOAT_TOP1 = 0.8777
CHANCE = 0.1


def _top1(model, x, y):
    outputs = np.concatenate([M.predict(model, x[i : i + 256])[0] for i in range(0, len(x), 256)])
    return float(np.mean(outputs.argmax(-1) == y))


@pytest.fixture(scope="module")
def resnet8(resnet8_model, cifar_test, cifar_calibration):
    """Conversions of ResNet-8 and their top-1 accuracies, computed once."""
    x, y = cifar_test
    results = {"float": (resnet8_model, None, _top1(resnet8_model, x, y))}
    for key, args, options in [
        ("w8a8", (8, 8, "powerquant"), {}),
        ("w4a4", (4, 4, "powerquant"), {}),
        ("w4a4_uniform", (4, 4, "uniform"), {}),
        ("w4a4_calibrated", (4, 4, "powerquant"), {"calibration_data": cifar_calibration}),
    ]:
        model, report = convert(resnet8_model, *args, **options)
        results[key] = (model, report, _top1(model, x, y))
    return results


def _accuracies(results):
    return ", ".join(f"{key} {100 * acc:.2f}%" for key, (_, _, acc) in results.items())


def test_resnet8_float_accuracy_is_the_documented_one(resnet8):
    assert abs(resnet8["float"][2] - RESNET8_FLOAT_TOP1) < 0.0006, _accuracies(resnet8)


def test_resnet8_w8a8_data_free_within_one_point_of_float(resnet8):
    _, report, accuracy = resnet8["w8a8"]
    assert accuracy >= resnet8["float"][2] - 0.01, _accuracies(resnet8)
    assert len(report.quantized_layers) == 10 and not report.float_layers
    assert len(report.folded_batch_norms) == 7 and not report.unfolded_batch_norms


@pytest.mark.parametrize("key", ["w4a4", "w4a4_uniform", "w4a4_calibrated"])
def test_resnet8_w4a4_converts_and_beats_chance(resnet8, key):
    _, report, accuracy = resnet8[key]
    assert accuracy > 2 * CHANCE, f"{key}: {_accuracies(resnet8)}"
    assert accuracy <= resnet8["float"][2] + 0.02, f"{key}: {_accuracies(resnet8)}"
    middle = [e for e in report.quantized_layers if e.position is None]
    assert middle and {e.weight_bits for e in middle} == {4}


def test_resnet8_calibrated_quantizes_the_input_too(resnet8):
    _, report, _ = resnet8["w4a4_calibrated"]
    assert report.options["calibrated"] is True
    assert all(a.status == "quantized" and a.rule == "calibration" for a in report.activations)
    first = [a for a in report.activations if a.consumers == ["conv2d"]]
    assert len(first) == 1 and first[0].bits == 8 and first[0].signed is True  # float input: signed
    assert 0 < first[0].clip <= 255.0


@pytest.mark.parametrize("key", ["w8a8", "w4a4"])
def test_resnet8_powerquant_weight_error_below_uniform(resnet8, key):
    _, report, _ = resnet8[key]
    _, uniform_report, _ = resnet8["w4a4_uniform"]
    differing = [e for e in report.quantized_layers if e.exponent != 1.0]
    assert differing, "every exponent is 1"
    for entry in differing:
        assert entry.error < entry.uniform_error, (entry.name, entry.exponent, entry.error_ratio)
    if key == "w4a4":
        # The uniform baseline's own errors are the ones the report compares to.
        for entry in report.quantized_layers:
            baseline = uniform_report.layer(entry.name)
            assert baseline.exponent == 1.0
            assert entry.uniform_error == pytest.approx(baseline.error, rel=1e-9)


def test_resnet8_from_its_file_equals_from_the_loaded_model(resnet8, resnet8_path):
    model, report = convert(resnet8_path, 8, 8)
    reference, reference_report, _ = resnet8["w8a8"]
    for a, b in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert [e.exponent for e in report.layers] == [e.exponent for e in reference_report.layers]


# ---------------------------------------------------------------------------
# VWW MobileNetV1 (no evaluation data: compare with the float model).


@pytest.fixture(scope="module")
def vww(vww_path):
    model, notes = load_model_with_notes(vww_path)
    quantized, report = convert(model, 8, 8)
    return model, notes, quantized, report


def test_vww_loads_and_converts(vww):
    model, notes, quantized, report = vww
    assert any("groups" in note for note in notes)
    assert len(report.quantized_layers) == 28 and not report.float_layers
    assert len(report.folded_batch_norms) == 27 and not report.unfolded_batch_norms
    classes = {type(quantized.get_layer(e.name)).__name__ for e in report.quantized_layers}
    assert classes == {"PowerQuantConv2D", "PowerQuantDepthwiseConv2D", "PowerQuantDense"}


def test_vww_w8a8_agrees_with_float_on_random_inputs(vww):
    model, _, quantized, _ = vww
    x = np.random.default_rng(0).random((256, 96, 96, 3)).astype("float32")  # already x / 255
    expected, got = M.predict(model, x)[0], M.predict(quantized, x)[0]
    agreement = float(np.mean(expected.argmax(-1) == got.argmax(-1)))
    assert agreement >= 0.95, f"argmax agreement {agreement:.3f}"
    # Noise images are all "no person" with high confidence, which makes the
    # argmax test easy: the probabilities themselves must stay close too
    # (measured mean |difference| 0.018).
    difference = float(np.mean(np.abs(expected - got)))
    assert difference < 0.05, f"mean |p_quantized - p_float| = {difference:.4f}"


def test_vww_w8a8_close_to_float_on_natural_images(vww, cifar_test):
    """CIFAR-10 test images resized to 96x96: natural images, unlike noise."""
    model, _, quantized, _ = vww
    x = tf.image.resize(cifar_test[0][:128] / 255.0, (96, 96)).numpy()
    expected, got = M.predict(model, x)[0], M.predict(quantized, x)[0]
    agreement = float(np.mean(expected.argmax(-1) == got.argmax(-1)))
    difference = float(np.mean(np.abs(expected - got)))
    assert agreement >= 0.95, f"argmax agreement {agreement:.3f}"
    assert difference < 0.05, f"mean |p_quantized - p_float| = {difference:.4f}"

"""What `convert` accepts and decides from its inputs: calibration data forms, option checks,
input quantizer signedness, and progress as the activation fits happen."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.errors import CalibrationDataError
from keras_powerquant.errors import InvalidModelError
from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.quantization.search import fit_activation_models
from tests.cli_helpers import build_small_model
from tests.cli_helpers import random_images


@pytest.fixture(scope="module")
def small():
    return build_small_model()


@pytest.fixture(scope="module")
def images():
    return random_images(16, seed=3).astype("float32") / 255


def _clips(report):
    return {a.name: (a.clip, a.exponent) for a in report.activations if a.status == "quantized"}


def _two_input_model():
    keras.utils.set_random_seed(0)
    pixels = keras.Input((6,), name="pixels")
    meta = keras.Input((2,), name="meta")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(
        keras.layers.Concatenate(name="joined")([pixels, meta])
    )
    return keras.Model([pixels, meta], keras.layers.Dense(3, name="scores")(hidden))


# ---------------------------------------------------------------------------
# Calibration data in the forms Model.fit and Model.predict take.


def test_single_input_calibration_forms_all_give_the_same_fit(small, images):
    labels = np.arange(len(images)) % 10
    _, expected = kpq.convert(small, 4, 4, calibration_data=images)
    forms = {
        "[x]": [images],
        "(x,)": (images,),
        "(x, y)": (images, labels),
        "(x, y, sample_weight)": (images, labels, np.ones(len(images))),
        "dict": {"image": images},
        "tensor": tf.constant(images),
        "dataset of (x, y)": tf.data.Dataset.from_tensor_slices((images, labels)).batch(8),
        "dataset of x": tf.data.Dataset.from_tensor_slices(images).batch(8),
        "list of batches": [images[:8], images[8:]],
        "generator of ([x], y)": (([images[i : i + 4]], labels[i : i + 4]) for i in range(0, 16, 4)),
    }
    for name, data in forms.items():
        _, report = kpq.convert(small, 4, 4, calibration_data=data)
        got = _clips(report)
        assert got.keys() == _clips(expected).keys(), name
        for key, (clip, exponent) in _clips(expected).items():
            np.testing.assert_allclose(got[key], (clip, exponent), rtol=1e-5, err_msg=f"{name}: {key}")


def test_two_input_calibration_forms_all_give_the_same_fit():
    model = _two_input_model()
    rng = np.random.default_rng(0)
    pixels, meta = rng.normal(size=(12, 6)).astype("float32"), rng.normal(size=(12, 2)).astype("float32")
    labels = np.zeros(12)
    _, expected = kpq.convert(model, 6, 6, calibration_data=[pixels, meta])
    for data in ((pixels, meta), ([pixels, meta], labels), ({"meta": meta, "pixels": pixels}, labels),
                 tf.data.Dataset.from_tensor_slices(((pixels, meta), labels)).batch(5)):
        _, report = kpq.convert(model, 6, 6, calibration_data=data)
        for key, value in _clips(expected).items():
            np.testing.assert_allclose(_clips(report)[key], value, rtol=1e-5)


@pytest.mark.parametrize(
    "data, fragments",
    [
        (lambda x: (x, x, x, x), ["1 input(s)", "(None, 8, 8, 3) ('image'), [x] or (x, y)", "a tuple of 4 (array)"]),
        (lambda x: [x, "labels.npy"], ["[x] or (x, y)", "got a str"]),
    ],
    ids=["four-arrays", "string-batch"],
)
def test_calibration_structure_that_does_not_fit_says_what_is_expected(small, images, data, fragments):
    with pytest.raises(CalibrationDataError) as info:
        kpq.convert(small, 4, 4, calibration_data=data(images))
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# Options refused before any work.


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(calibration_steps=0), "`calibration_steps` must be an integer >= 1; got 0"),
        (dict(calibration_steps=-1), "`calibration_steps` must be an integer >= 1; got -1"),
        (dict(calibration_steps=1.5), "`calibration_steps` must be an integer >= 1"),
        (dict(calibration_batch_size=0), "`calibration_batch_size` must be an integer >= 1; got 0"),
        (dict(calibration_batch_size=True), "`calibration_batch_size` must be an integer >= 1"),
        (dict(p=float("inf")), "`p` must be a finite number > 0; got inf"),
        (dict(p=float("nan")), "`p` must be a finite number > 0"),
        (dict(exponent_bounds=(0.5, float("inf"))), "0 < low < high < inf"),
    ],
)
def test_bad_calibration_and_norm_options_are_refused(small, images, options, message):
    with pytest.raises(ValueError) as info:
        kpq.convert(small, 4, 4, calibration_data=images, **options)
    assert message in str(info.value)


def test_numpy_integer_calibration_options_are_accepted(small, images):
    _, report = kpq.convert(small, 4, 4, calibration_data=images, calibration_steps=np.int64(1),
                            calibration_batch_size=np.int32(4))
    assert report.options["calibrated"]


def test_batch_norm_with_negative_moving_variance_is_named(small):
    model = keras.models.clone_model(small)
    model.set_weights(small.get_weights())
    bn = model.get_layer("bn_c")
    variance = np.array(bn.moving_variance)
    variance[2] = -0.5
    bn.moving_variance.assign(variance)
    with pytest.raises(InvalidModelError, match="Layer 'bn_c' has a negative moving variance in 1 of 6 channels"):
        kpq.convert(model, 4, 4)


# ---------------------------------------------------------------------------
# Input quantizer signedness comes from the graph, not from the samples.


def test_input_quantizer_is_signed_even_when_calibration_inputs_are_not_negative():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="features")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="scores")(hidden))
    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 1, (64, 8)).astype("float32")
    quantized, report = kpq.convert(model, 8, 8, calibration_data=calibration)
    (first,) = [a for a in report.activations if a.consumers == ["hidden"]]
    assert first.signed
    # Served inputs below zero are quantized, not clamped to 0.
    served = -rng.uniform(0, 1, (16, 8)).astype("float32")
    expected = model.predict(served, verbose=0)
    error = np.abs(quantized.predict(served, verbose=0) - expected).max()
    clamped_error = np.abs(model.predict(np.zeros_like(served), verbose=0) - expected).max()
    assert error < 0.1 * clamped_error


def test_unsigned_integer_inputs_get_an_unsigned_quantizer():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    hidden = keras.layers.Conv2D(4, 3, name="conv")(scaled)
    model = keras.Model(inputs, keras.layers.Dense(2, name="scores")(keras.layers.Flatten()(hidden)))
    _, report = kpq.convert(model, 4, 4, calibration_data=random_images(8))
    (first,) = [a for a in report.activations if a.consumers == ["conv"]]
    assert first.status == "quantized" and not first.signed


# ---------------------------------------------------------------------------
# Progress.


def test_activation_fit_progress_is_reported_as_each_fit_completes():
    events = []

    class Logged(ActivationErrorModel):
        def __init__(self, index, samples):
            super().__init__(samples, 4, signed=True)
            self.index = index

        def best_clip(self, exponent):
            events.append(("fit", self.index))
            return super().best_clip(exponent)

    rng = np.random.default_rng(0)
    models = [Logged(i, rng.normal(size=500)) for i in range(3)]
    fit_activation_models(models, progress=lambda done, total: events.append(("done", done, total)))
    done_at = [i for i, event in enumerate(events) if event[0] == "done"]
    assert [events[i] for i in done_at] == [("done", 1, 3), ("done", 2, 3), ("done", 3, 3)]
    for k, position in enumerate(done_at):
        start = done_at[k - 1] if k else -1
        assert {event[1] for event in events[start + 1 : position]} == {k}, events


def test_convert_reports_activation_progress_per_quantizer(small, images):
    stages = []
    _, report = kpq.convert(small, 4, 4, calibration_data=images, progress=lambda *event: stages.append(event))
    fitted = [a for a in report.activations if a.status == "quantized"]
    activations = [event for event in stages if event[0] == "activations"]
    assert activations == [("activations", i + 1, len(fitted)) for i in range(len(fitted))]

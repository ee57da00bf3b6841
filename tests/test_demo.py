"""Tests of the generated demo dataset, model and output folder."""

import json
import os

import keras
import numpy as np
import pytest

from keras_powerquant import demo


def test_make_dataset_is_deterministic():
    x1, y1 = demo.make_dataset(300, seed=3)
    x2, y2 = demo.make_dataset(300, seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)

    x3, y3 = demo.make_dataset(300, seed=4)
    assert not np.array_equal(x1, x3)
    assert not np.array_equal(y1, y3)


def test_make_dataset_shapes_dtypes_and_range():
    # More images than one rendering chunk, so chunking is exercised.
    n = demo._CHUNK + 37
    x, y = demo.make_dataset(n, seed=1)
    assert x.shape == (n, 32, 32, 3)
    assert x.dtype == np.uint8
    assert y.shape == (n,)
    assert y.dtype == np.int64
    # Noise reaches both ends of the pixel range; the bulk sits mid-range.
    assert x.min() == 0 and x.max() == 255
    assert 80 < x.mean() < 170


def test_make_dataset_classes_are_balanced():
    _, y = demo.make_dataset(1003, seed=2)
    counts = np.bincount(y, minlength=10)
    assert len(counts) == 10
    assert counts.min() >= 100
    assert counts.max() - counts.min() <= 1


def test_make_dataset_colour_does_not_reveal_the_class():
    # Colours are drawn independently of the class, so per-class mean
    # colours agree to within sampling noise (a few grey levels).
    x, y = demo.make_dataset(2000, seed=5)
    class_means = np.array(
        [x[y == c].mean(axis=(0, 1, 2)) for c in range(10)]
    )
    assert np.ptp(class_means, axis=0).max() < 20


def test_build_demo_model_layers():
    model = demo.build_demo_model()
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 10)
    assert 20_000 <= model.count_params() <= 60_000
    assert isinstance(model.layers[1], keras.layers.Rescaling)

    kinds = {type(layer) for layer in model.layers}
    for kind in (
        keras.layers.Conv2D,
        keras.layers.BatchNormalization,
        keras.layers.Add,
        keras.layers.DepthwiseConv2D,
        keras.layers.GlobalAveragePooling2D,
    ):
        assert kind in kinds, kind.__name__

    relu6 = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.ReLU) and layer.max_value == 6
    ]
    assert relu6

    head = model.layers[-1]
    assert isinstance(head, keras.layers.Dense)
    assert head.activation is keras.activations.softmax

    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert not layer.use_bias, layer.name


def test_build_demo_model_num_classes():
    assert demo.build_demo_model(num_classes=3).output_shape == (None, 3)


def test_write_atomically_leaves_no_partial_file(tmp_path):
    target = tmp_path / "calibration.npy"

    def fail(path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo._write_atomically(str(target), fail)
    assert list(tmp_path.iterdir()) == []

    demo._write_atomically(str(target), lambda p: np.save(p, np.arange(3)))
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.npy"]
    np.testing.assert_array_equal(np.load(target), np.arange(3))


# Reduced sizes: about 10 s of training on 2 CPU cores instead of ~45 s.
SMALL = dict(num_train=3000, num_test=500, num_calibration=64, epochs=3)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    result = demo.prepare_demo(str(out_dir), seed=0, verbose=False, **SMALL)
    return out_dir, result


def test_prepare_demo_writes_a_usable_demo(small_demo):
    out_dir, result = small_demo
    assert sorted(os.listdir(out_dir)) == sorted(
        [
            demo.MODEL_FILE,
            demo.TEST_FILE,
            demo.CALIBRATION_FILE,
            demo.METADATA_FILE,
        ]
    )

    with np.load(result["test"]) as data:
        x_test, y_test = data["x"], data["y"]
    assert x_test.shape == (500, 32, 32, 3) and x_test.dtype == np.uint8
    assert y_test.shape == (500,) and y_test.dtype == np.int64

    calibration = np.load(result["calibration"])
    assert calibration.shape == (64, 32, 32, 3)
    assert calibration.dtype == np.uint8

    model = keras.saving.load_model(result["model"])
    probabilities = model.predict(x_test, batch_size=250, verbose=0)
    accuracy = np.mean(np.argmax(probabilities, axis=-1) == y_test)
    assert accuracy > 0.5
    assert accuracy == pytest.approx(result["accuracy"], abs=1e-6)

    with open(result["metadata"]) as f:
        metadata = json.load(f)
    assert metadata["settings"] == dict(seed=0, **SMALL)


def test_prepare_demo_test_set_is_held_out(small_demo):
    out_dir, result = small_demo
    x_train, _ = demo.make_dataset(SMALL["num_train"], seed=0)
    with np.load(result["test"]) as data:
        x_test = data["x"]
    train_rows = {image.tobytes() for image in x_train}
    assert not any(image.tobytes() in train_rows for image in x_test)
    np.testing.assert_array_equal(
        np.load(result["calibration"]), x_train[: SMALL["num_calibration"]]
    )


def test_prepare_demo_reuses_its_output(small_demo, capsys):
    out_dir, result = small_demo
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}

    again = demo.prepare_demo(str(out_dir), seed=0, force=False, **SMALL)

    assert again == result
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == mtimes
    assert "reusing" in capsys.readouterr().out


def test_prepare_demo_rebuilds_for_other_settings(tmp_path):
    tiny = dict(num_train=256, num_test=50, num_calibration=16, epochs=1)
    first = demo.prepare_demo(str(tmp_path), seed=0, verbose=False, **tiny)
    model_mtime = os.stat(first["model"]).st_mtime_ns

    demo.prepare_demo(str(tmp_path), seed=1, verbose=False, **tiny)

    assert os.stat(first["model"]).st_mtime_ns != model_mtime
    with open(first["metadata"]) as f:
        assert json.load(f)["settings"]["seed"] == 1
    x_test, _ = demo.make_dataset(50, seed=3)
    with np.load(first["test"]) as data:
        np.testing.assert_array_equal(data["x"], x_test)

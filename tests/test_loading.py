"""Tests of keras_powerquant.loading on real files (no mocks).

Legacy fixtures are real HDF5 files: a small Keras 3 model is saved as .h5
and its `model_config` attribute is rewritten with h5py into the form
Keras 2.2 / tf.keras 2.x wrote, so the weights in the file are the Keras 3
model's and the loaded model must reproduce its outputs exactly.
"""

import copy
import hashlib
import json
import os
import zipfile

import h5py
import keras
import numpy as np
import pytest

from keras_powerquant.errors import ModelLoadError
from keras_powerquant.errors import UnsupportedModelError
from keras_powerquant.loading import check_convertible
from keras_powerquant.loading import load_model
from keras_powerquant.loading import load_model_with_notes

# ---------------------------------------------------------------------------
# Helpers and fixtures.


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_one_line_naming(exc_info, path):
    message = str(exc_info.value)
    assert str(path) in message
    assert "\n" not in message
    assert "Traceback" not in message


def _glorot():
    return {
        "class_name": "VarianceScaling",
        "config": {
            "scale": 1.0,
            "mode": "fan_avg",
            "distribution": "uniform",
            "seed": None,
        },
    }


def _zeros():
    return {"class_name": "Zeros", "config": {}}


def _dense(name, units, activation="linear", **extra):
    """A Dense layer entry as Keras 2.2 wrote it."""
    config = {
        "name": name,
        "trainable": True,
        "dtype": "float32",
        "units": units,
        "activation": activation,
        "use_bias": True,
        "kernel_initializer": _glorot(),
        "bias_initializer": _zeros(),
        "kernel_regularizer": None,
        "bias_regularizer": None,
        "activity_regularizer": None,
        "kernel_constraint": None,
        "bias_constraint": None,
    }
    config.update(extra)
    return {"class_name": "Dense", "config": config}


def _input_layer(name, batch_shape):
    return {
        "class_name": "InputLayer",
        "config": {
            "batch_input_shape": batch_shape,
            "dtype": "float32",
            "sparse": False,
            "name": name,
        },
    }


def _node(layer_entry, inbound):
    """A functional-model layer entry with Keras 2 inbound_nodes."""
    entry = dict(layer_entry)
    entry["name"] = entry["config"]["name"]
    entry["inbound_nodes"] = [[[inbound, 0, 0, {}]]] if inbound else []
    return entry


def _functional_config(class_name, **dw_extra):
    """Keras 2 config of Input -> DepthwiseConv2D -> Conv2D(1x1) -> GAP."""
    dw = {
        "class_name": "DepthwiseConv2D",
        "config": {
            "name": "dw",
            "trainable": True,
            "dtype": "float32",
            "kernel_size": [3, 3],
            "strides": [1, 1],
            "padding": "same",
            "data_format": "channels_last",
            "dilation_rate": [1, 1],
            "activation": "linear",
            "use_bias": True,
            "bias_initializer": _zeros(),
            "bias_regularizer": None,
            "activity_regularizer": None,
            "bias_constraint": None,
            "depth_multiplier": 1,
            "depthwise_initializer": _glorot(),
            "depthwise_regularizer": None,
            "depthwise_constraint": None,
            **dw_extra,
        },
    }
    pw = {
        "class_name": "Conv2D",
        "config": {
            "name": "pw",
            "trainable": True,
            "dtype": "float32",
            "filters": 4,
            "kernel_size": [1, 1],
            "strides": [1, 1],
            "padding": "valid",
            "data_format": "channels_last",
            "dilation_rate": [1, 1],
            "activation": "linear",
            "use_bias": True,
            "kernel_initializer": _glorot(),
            "bias_initializer": _zeros(),
            "kernel_regularizer": None,
            "bias_regularizer": None,
            "activity_regularizer": None,
            "kernel_constraint": None,
            "bias_constraint": None,
        },
    }
    gap = {
        "class_name": "GlobalAveragePooling2D",
        "config": {
            "name": "gap",
            "trainable": True,
            "dtype": "float32",
            "data_format": "channels_last",
        },
    }
    return {
        "class_name": class_name,
        "config": {
            "name": "model_1",
            "layers": [
                _node(_input_layer("input_1", [None, 8, 8, 3]), None),
                _node(dw, "input_1"),
                _node(pw, "dw"),
                _node(gap, "pw"),
            ],
            "input_layers": [["input_1", 0, 0]],
            "output_layers": [["gap", 0, 0]],
        },
    }


def _write_legacy_h5(path, model, model_config):
    """Saves `model` as .h5, then rewrites its config as Keras 2 did."""
    model.save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = json.dumps(model_config)
        f.attrs["keras_version"] = "2.2.4"
    return path


@pytest.fixture(scope="module")
def seq_model():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="relu", name="d1"),
            keras.layers.Dense(3, name="d2"),
        ]
    )
    # Non-zero biases, so a weight mix-up cannot go unnoticed.
    for layer in model.layers:
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, np.linspace(-0.5, 0.5, bias.size)])
    return model


@pytest.fixture(scope="module")
def func_model():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3), name="input_1")
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(inputs)
    x = keras.layers.Conv2D(4, 1, name="pw")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, outputs)
    dw = model.get_layer("dw")
    dw.set_weights([dw.get_weights()[0], np.full(3, 0.25, "float32")])
    return model


@pytest.fixture(scope="module")
def seq_input():
    return np.random.default_rng(0).normal(size=(5, 6)).astype("float32")


@pytest.fixture(scope="module")
def func_input():
    return np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")


def _seq_layers():
    return [
        _dense("d1", 4, "relu", batch_input_shape=[None, 6]),
        _dense("d2", 3),
    ]


@pytest.fixture(scope="module")
def vww_loaded(vww_path):
    return load_model_with_notes(vww_path)


@pytest.fixture(scope="module")
def resnet8_loaded(resnet8_path):
    return load_model_with_notes(resnet8_path)


# ---------------------------------------------------------------------------
# Real shared models.


def test_vww_loads_with_groups_repaired(vww_loaded):
    model, notes = vww_loaded
    depthwise = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.DepthwiseConv2D)
    ]
    assert len(depthwise) == 13
    assert len(notes) == 13
    assert all("groups=1" in note and "DepthwiseConv2D" in note for note in notes)
    assert "'depthwise_conv2d'" in notes[0]
    assert model.input_shape == (None, 96, 96, 3)
    assert model.output_shape == (None, 2)
    assert model.count_params() == 221794
    check_convertible(model)


def test_vww_outputs_finite_and_reproducible(vww_loaded, vww_path):
    model, _ = vww_loaded
    before = _sha256(vww_path)
    again = load_model(vww_path)
    assert _sha256(vww_path) == before
    x = np.random.default_rng(0).uniform(size=(4, 96, 96, 3)).astype("float32")
    y1 = np.asarray(model(x, training=False))
    y2 = np.asarray(again(x, training=False))
    assert np.all(np.isfinite(y1))
    np.testing.assert_array_equal(y1, y2)
    # Softmax outputs: the weights really were loaded into a working model.
    np.testing.assert_allclose(y1.sum(axis=1), 1.0, atol=1e-5)


def test_resnet8_reaches_documented_accuracy(resnet8_loaded, shared_data):
    model, notes = resnet8_loaded
    assert notes == []
    check_convertible(model)
    data_path = shared_data / "cifar10" / "test_first932.npz"
    if not data_path.is_file():
        pytest.skip(f"{data_path} not found")
    with np.load(data_path) as data:
        x = data["x"].astype("float32")  # raw 0-255, no scaling
        y = data["y"]
    assert len(y) == 932
    predictions = np.asarray(model(x, training=False)).argmax(axis=1)
    accuracy = float(np.mean(predictions == y))
    assert abs(accuracy - 0.8777) <= 0.01, accuracy


def test_truncated_real_file(tmp_path, vww_path):
    data = vww_path.read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        load_model(path)
    _assert_one_line_naming(info, path)


# ---------------------------------------------------------------------------
# Legacy Keras 2 fixtures.


def test_keras22_list_style_sequential(tmp_path, seq_model, seq_input):
    config = {"class_name": "Sequential", "config": _seq_layers()}
    path = _write_legacy_h5(tmp_path / "list.h5", seq_model, config)
    model, notes = load_model_with_notes(path)
    assert len(notes) == 2
    assert "list" in notes[0]
    assert "batch_input_shape" in notes[1] and "'d1'" in notes[1]
    assert model.input_shape == (None, 6)
    np.testing.assert_allclose(model(seq_input), seq_model(seq_input), atol=1e-6)
    check_convertible(model)


def test_keras22_batch_input_shape_on_first_layer(
    tmp_path, seq_model, seq_input
):
    # Keras 3 alone loads this, but with input shape (None, None, 6).
    config = {
        "class_name": "Sequential",
        "config": {"name": "sequential_1", "layers": _seq_layers()},
    }
    path = _write_legacy_h5(tmp_path / "bis.h5", seq_model, config)
    model, notes = load_model_with_notes(path)
    assert len(notes) == 1 and "InputLayer" in notes[0]
    assert model.input_shape == (None, 6)
    np.testing.assert_allclose(model(seq_input), seq_model(seq_input), atol=1e-6)


def test_input_shape_on_first_layer_is_left_to_keras(
    tmp_path, seq_model, seq_input
):
    layers = _seq_layers()
    del layers[0]["config"]["batch_input_shape"]
    layers[0]["config"]["input_shape"] = [6]
    config = {
        "class_name": "Sequential",
        "config": {"name": "sequential_1", "layers": layers},
    }
    path = _write_legacy_h5(tmp_path / "input_shape.h5", seq_model, config)
    with pytest.warns(UserWarning, match="input_shape"):
        model, notes = load_model_with_notes(path)
    assert notes == []
    assert model.input_shape == (None, 6)
    np.testing.assert_allclose(model(seq_input), seq_model(seq_input), atol=1e-6)


def test_tf_keras_sequential_with_input_layer_needs_no_repair(
    tmp_path, seq_model, seq_input
):
    # tf.keras 2.x: explicit InputLayer, redundant batch_input_shape on d1.
    layers = [_input_layer("d1_input", [None, 6])] + _seq_layers()
    config = {
        "class_name": "Sequential",
        "config": {"name": "sequential", "layers": layers},
    }
    path = _write_legacy_h5(tmp_path / "tfkeras_seq.h5", seq_model, config)
    model, notes = load_model_with_notes(path)
    assert notes == []
    np.testing.assert_allclose(model(seq_input), seq_model(seq_input), atol=1e-6)


def test_keras22_model_class_name(tmp_path, func_model, func_input):
    path = _write_legacy_h5(
        tmp_path / "model.h5", func_model, _functional_config("Model")
    )
    model, notes = load_model_with_notes(path)
    assert notes == []  # Keras 3 maps "Model" to Functional by itself.
    np.testing.assert_allclose(model(func_input), func_model(func_input), atol=1e-6)
    check_convertible(model)


def test_depthwise_groups_1_is_dropped(tmp_path, func_model, func_input):
    path = _write_legacy_h5(
        tmp_path / "groups1.h5",
        func_model,
        _functional_config("Functional", groups=1),
    )
    model, notes = load_model_with_notes(path)
    assert notes == [
        "dropped unsupported argument groups=1 from DepthwiseConv2D 'dw'"
    ]
    np.testing.assert_allclose(model(func_input), func_model(func_input), atol=1e-6)


def test_repairs_are_logged(tmp_path, func_model, caplog):
    path = _write_legacy_h5(
        tmp_path / "logged.h5",
        func_model,
        _functional_config("Functional", groups=1),
    )
    with caplog.at_level("INFO", logger="keras_powerquant"):
        load_model(path)
    assert any(
        r.name == "keras_powerquant" and "groups=1" in r.getMessage()
        for r in caplog.records
    )


def test_input_file_is_never_modified(tmp_path, func_model):
    path = _write_legacy_h5(
        tmp_path / "untouched.h5",
        func_model,
        _functional_config("Model", groups=1),
    )
    digest, mtime = _sha256(path), os.stat(path).st_mtime_ns
    _, notes = load_model_with_notes(path)
    assert notes  # the repair path (in-memory copy) was taken
    assert _sha256(path) == digest
    assert os.stat(path).st_mtime_ns == mtime


def test_depthwise_groups_2_is_an_error(tmp_path, func_model):
    path = _write_legacy_h5(
        tmp_path / "groups2.h5",
        func_model,
        _functional_config("Functional", groups=2),
    )
    with pytest.raises(UnsupportedModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "'dw'" in message and "groups=2" in message
    assert "DepthwiseConv2D" in message
    _assert_one_line_naming(info, path)


def test_unknown_argument_is_an_error(tmp_path, seq_model):
    # Not a known legacy argument: Keras' own check reports it, wrapped.
    layers = [_input_layer("in", [None, 6])] + _seq_layers()
    layers[2]["config"]["frobnicate"] = 3
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": layers}}
    path = _write_legacy_h5(tmp_path / "unknown_arg.h5", seq_model, config)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert "frobnicate" in str(info.value)
    _assert_one_line_naming(info, path)


def test_tf_keras_lstm_time_major_is_dropped(tmp_path):
    keras.utils.set_random_seed(3)
    original = keras.Sequential(
        [keras.Input((5, 4)), keras.layers.LSTM(3, name="lstm")]
    )
    config = json.loads(json.dumps(original.get_config()))
    lstm = {"class_name": "LSTM", "config": copy.deepcopy(
        config["layers"][1]["config"]
    )}
    lstm["config"]["dtype"] = "float32"
    lstm["config"].update(time_major=False, implementation=2)
    legacy = {
        "class_name": "Sequential",
        "config": {
            "name": "sequential",
            "layers": [_input_layer("lstm_input", [None, 5, 4]), lstm],
        },
    }
    path = _write_legacy_h5(tmp_path / "lstm.h5", original, legacy)
    model, notes = load_model_with_notes(path)
    assert notes == [
        "dropped unsupported argument time_major=False from LSTM 'lstm'"
    ]
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
    np.testing.assert_allclose(model(x), original(x), atol=1e-6)


def test_weights_mismatch_is_wrapped(tmp_path, seq_model):
    layers = [_input_layer("in", [None, 6])] + _seq_layers()
    layers.append(_dense("d3", 2))
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": layers}}
    path = _write_legacy_h5(tmp_path / "mismatch.h5", seq_model, config)
    with pytest.raises(ModelLoadError, match="Keras 3 cannot rebuild") as info:
        load_model(path)
    assert isinstance(info.value.__cause__, Exception)
    _assert_one_line_naming(info, path)


# ---------------------------------------------------------------------------
# .keras archives and content-based format detection.


def test_keras_archive_and_unusual_extensions(tmp_path, seq_model, seq_input):
    keras_path = tmp_path / "model.keras"
    seq_model.save(keras_path)
    h5_path = tmp_path / "model.h5"
    seq_model.save(h5_path)
    odd_zip = tmp_path / "model.bin"
    odd_zip.write_bytes(keras_path.read_bytes())
    odd_h5 = tmp_path / "model.weights"
    odd_h5.write_bytes(h5_path.read_bytes())
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(keras_path) as zf:
        zf.extractall(folder)
    for path in (keras_path, h5_path, odd_zip, odd_h5, folder):
        model, notes = load_model_with_notes(str(path))
        assert notes == []
        assert not model.compiled
        np.testing.assert_allclose(
            model(seq_input), seq_model(seq_input), atol=1e-6
        )


def test_truncated_keras_archive(tmp_path, seq_model):
    whole = tmp_path / "whole.keras"
    seq_model.save(whole)
    data = whole.read_bytes()
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated") as info:
        load_model(path)
    _assert_one_line_naming(info, path)


def test_lambda_layer_needs_unsafe_mode(tmp_path):
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    model = keras.Model(inputs, outputs)
    for name in ("lambda.keras", "lambda.h5"):
        path = tmp_path / name
        model.save(path)
        with pytest.raises(ModelLoadError, match="safe_mode=False") as info:
            load_model(path)
        assert "Lambda" in str(info.value)
        _assert_one_line_naming(info, path)


# ---------------------------------------------------------------------------
# Inputs that are not models.


def test_missing_path(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(path)
    _assert_one_line_naming(info, path)


def test_savedmodel_directory(tmp_path):
    import tensorflow as tf

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def __call__(self, x):
            return 2.0 * x

    path = tmp_path / "saved_model_dir"
    tf.saved_model.save(Doubler(), str(path))
    for target in (path, path / "saved_model.pb"):
        with pytest.raises(ModelLoadError) as info:
            load_model(target)
        message = str(info.value)
        assert "SavedModel" in message and "Keras 3 cannot rebuild" in message
        assert 'model.save("model.keras")' in message
        assert "tf_keras.models.load_model" in message
        _assert_one_line_naming(info, path)


def test_plain_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory") as info:
        load_model(tmp_path)
    _assert_one_line_naming(info, tmp_path)


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.h5", b"", "empty"),
        ("notes.txt", b"hello, not a model\n", "not a Keras model file"),
        ("text.h5", b"hello, not a model\n", "not a Keras model file"),
        ("text.keras", b"hello, not a model\n", "not a Keras model file"),
        ("model.unknown", b"\x00\x01\x02" * 50, "not a Keras model file"),
    ],
)
def test_files_that_are_not_models(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=words) as info:
        load_model(path)
    _assert_one_line_naming(info, path)


def test_npz_and_other_zip_archives(tmp_path):
    npz = tmp_path / "arrays.npz"
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(ModelLoadError, match="NumPy .npz") as info:
        load_model(npz)
    _assert_one_line_naming(info, npz)
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="zip archive without config.json") as info:
        load_model(other)
    _assert_one_line_naming(info, other)


def test_weights_only_files(tmp_path, seq_model):
    from keras.src.legacy.saving import legacy_h5_format

    keras3_weights = tmp_path / "model.weights.h5"
    seq_model.save_weights(keras3_weights)
    keras2_weights = tmp_path / "keras2_weights.h5"
    with h5py.File(keras2_weights, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, seq_model)
    for path in (keras3_weights, keras2_weights):
        with pytest.raises(ModelLoadError, match="contains only weights") as info:
            load_model(path)
        assert "code that defines the model" in str(info.value)
        _assert_one_line_naming(info, path)


def test_hdf5_that_is_not_a_keras_model(tmp_path):
    plain = tmp_path / "data.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ModelLoadError, match="not a Keras model") as info:
        load_model(plain)
    _assert_one_line_naming(info, plain)
    bad_json = tmp_path / "bad_json.h5"
    with h5py.File(bad_json, "w") as f:
        f.attrs["model_config"] = "{not json"
    with pytest.raises(ModelLoadError, match="not valid JSON") as info:
        load_model(bad_json)
    _assert_one_line_naming(info, bad_json)


def test_path_must_be_a_path():
    with pytest.raises(TypeError):
        load_model(42)


# ---------------------------------------------------------------------------
# check_convertible.


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, inputs):
        return self.dense(inputs) * 2.0


def test_check_convertible_rejects_subclassed_model():
    model = _Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(UnsupportedModelError, match="subclassed") as info:
        check_convertible(model)
    assert "functional API" in str(info.value)


def test_check_convertible_functional_subclass_depends_on_call():
    class Plain(keras.Model):
        def __init__(self):
            inputs = keras.Input((3,))
            super().__init__(inputs, keras.layers.Dense(2)(inputs))

    class CustomCall(Plain):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    assert check_convertible(Plain()) is None
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        check_convertible(CustomCall())


def test_check_convertible_rejects_unbuilt_sequential():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(UnsupportedModelError) as info:
        check_convertible(model)
    assert "keras.Input(shape=...)" in str(info.value)
    assert "call it once on a batch of data" in str(info.value)


@pytest.mark.parametrize("obj", [object(), "model.h5", keras.layers.Dense(2)])
def test_check_convertible_rejects_non_models(obj):
    with pytest.raises(UnsupportedModelError, match="keras.Model"):
        check_convertible(obj)


def test_check_convertible_accepts_graph_models(func_model, seq_model):
    assert check_convertible(func_model) is None
    assert check_convertible(seq_model) is None
    called = keras.Sequential([keras.layers.Dense(2)])
    called(np.zeros((1, 3), "float32"))
    assert check_convertible(called) is None

"""Bad input, through `kpq` where users meet it and through the library where they do not.

Every case checks the message, the exit status or exception type, that no
output was written, and that the inputs were left as they were.
"""

import json
import os
import shutil

import numpy as np
import pytest

import keras_powerquant as kpq  # noqa: E402
from keras_powerquant.errors import CalibrationDataError  # noqa: E402
from keras_powerquant.errors import InvalidModelError  # noqa: E402
from keras_powerquant.errors import ModelLoadError  # noqa: E402
from keras_powerquant.errors import UnsupportedModelError  # noqa: E402
from tests.cli_helpers import assert_one_line_error
from tests.cli_helpers import build_small_model
from tests.cli_helpers import INPUT_SHAPE
from tests.cli_helpers import invoke
from tests.cli_helpers import kpq_stderr_lines
from tests.cli_helpers import random_images
from tests.cli_helpers import run_kpq
from tests.cli_helpers import save_small_model
from tests.cli_helpers import sha256
from tests.cli_helpers import snapshot

EXPECTED_SHAPE = "(None, " + ", ".join(map(str, INPUT_SHAPE)) + ")"
SHAPE_MESSAGE = f"expected shape {EXPECTED_SHAPE}"
DTYPE_MESSAGE = f"expected a numeric array of shape {EXPECTED_SHAPE}"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("small"))


@pytest.fixture
def model_copy(small, tmp_path):
    """A private copy of the small .keras file, to hash before and after."""
    path = tmp_path / "model.keras"
    shutil.copyfile(small[1]["keras"], path)
    return path


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_same_weights(before, model):
    after = model.get_weights()
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def _convert_fails(model_path, out, *options, fragments=()):
    """`kpq convert` exits 1 with one error line and writes nothing; returns the line."""
    before = snapshot(out)
    model_hash = sha256(model_path) if os.path.isfile(model_path) else None
    result = invoke("convert", model_path, "-o", out, *options)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    line = assert_one_line_error(result.stderr, *fragments)
    assert snapshot(out) == before
    if model_hash is not None:
        assert sha256(model_path) == model_hash
    return line


# ---------------------------------------------------------------------------
# Files that are not (usable) models.


def test_missing_model_file(tmp_path):
    missing = tmp_path / "missing.h5"
    for command, extra in (("convert", ["-o", tmp_path / "out"]), ("inspect", [])):
        result = invoke(command, missing, *extra)
        assert result.exit_code == 2
        assert f"Path '{missing}' does not exist" in result.stderr
    with pytest.raises(ModelLoadError, match="does not exist"):
        kpq.convert(missing)
    with pytest.raises(ModelLoadError, match="does not exist"):
        kpq.inspect_model(missing)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("notes.txt", b"just some text\n", "not a Keras model file"),
        ("model.h5", b"just some text\n", "not a Keras model file"),
        ("empty.keras", b"", "is empty"),
    ],
)
def test_file_that_is_not_a_model(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    _convert_fails(path, tmp_path / "out", fragments=(name, fragment))
    result = invoke("inspect", path)
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, fragment)
    with pytest.raises(ModelLoadError, match=fragment):
        kpq.convert(path)
    assert path.read_bytes() == content


def test_npz_archive_is_not_a_model(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, x=random_images(2))
    _convert_fails(path, tmp_path / "out", fragments=("images.npz", "NumPy .npz archive", "not a Keras"))


def test_saved_model_folder_is_not_a_convertible_model(small, tmp_path):
    out = tmp_path / "out"
    assert invoke("convert", small[1]["keras"], "-o", out).exit_code == 0
    _convert_fails(out / "1", tmp_path / "out2", fragments=("TensorFlow SavedModel", ".keras or .h5"))


def test_folder_that_is_neither_model_nor_export(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    result = invoke("inspect", folder)
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "neither a model nor a kpq export folder")
    assert snapshot(folder) == {"readme.txt": sha256(folder / "readme.txt")}


def _truncate(source, target):
    data = open(source, "rb").read()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_truncated_h5_built(small, tmp_path):
    path = _truncate(small[1]["h5"], tmp_path / "half.h5")
    _convert_fails(path, tmp_path / "out", fragments=("half.h5", "truncated or corrupt"))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        kpq.load_model(path)


def test_truncated_keras_archive(small, tmp_path):
    path = _truncate(small[1]["keras"], tmp_path / "half.keras")
    _convert_fails(path, tmp_path / "out", fragments=("half.keras", "corrupt or truncated"))


def test_truncated_real_resnet8_in_a_real_process(resnet8_path, tmp_path):
    path = _truncate(resnet8_path, tmp_path / "resnet8-half.h5")
    digest = sha256(path)
    process = run_kpq("convert", path, "-o", tmp_path / "out")
    assert process.returncode == 1
    assert process.stdout == ""
    assert_one_line_error(process.stderr, "resnet8-half.h5", "truncated or corrupt")
    # Nothing but kpq's progress and its error (no HDF5 diagnostics, no traceback).
    assert [line for line in kpq_stderr_lines(process.stderr) if not line.startswith("Loading ")] == [
        process.stderr.strip().splitlines()[-1]
    ]
    assert not (tmp_path / "out").exists()
    assert sha256(path) == digest


# ---------------------------------------------------------------------------
# Models the converter refuses.


def test_subclassed_model_is_unsupported():
    import keras

    class TwoDense(keras.Model):
        def __init__(self):
            super().__init__(name="two_dense")
            self.hidden = keras.layers.Dense(4, activation="relu")
            self.out = keras.layers.Dense(2)

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    model = TwoDense()
    model(np.zeros((1, 3), "float32"))
    before = _weights(model)
    for function in (kpq.convert, kpq.inspect_model):
        with pytest.raises(UnsupportedModelError, match="subclassed") as info:
            function(model)
        assert "two_dense" in str(info.value) and "functional API" in str(info.value)
    _assert_same_weights(before, model)


def _poisoned(layer_name, weight_index, value):
    model = build_small_model()
    layer = model.get_layer(layer_name)
    weights = layer.get_weights()
    weights[weight_index].flat[0] = value
    layer.set_weights(weights)
    return model


def test_nan_kernel_in_a_keras_file_names_the_layer(tmp_path):
    path = tmp_path / "nan.keras"
    _poisoned("conv_c", 0, np.nan).save(path)
    _convert_fails(path, tmp_path / "out", fragments=("'conv_c'", "NaN or Inf"))


@pytest.mark.parametrize(
    "layer_name, weight_index, value",
    [("logits", 0, np.inf), ("conv_a", 0, -np.inf), ("bn_c", 3, np.nan)],
    ids=["inf-dense-kernel", "-inf-conv-kernel", "nan-batchnorm-variance"],
)
def test_non_finite_weights_in_memory(layer_name, weight_index, value):
    model = _poisoned(layer_name, weight_index, value)
    before = _weights(model)
    with pytest.raises(InvalidModelError, match=f"Layer '{layer_name}' has NaN or Inf"):
        kpq.convert(model)
    _assert_same_weights(before, model)


# ---------------------------------------------------------------------------
# Options.


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"wbits": 1}, "wbits"),
        ({"wbits": 9}, "wbits"),
        ({"wbits": 4.5}, "wbits"),
        ({"wbits": True}, "wbits"),
        ({"wbits": "4"}, "wbits"),
        ({"abits": 0}, "abits"),
        ({"abits": 16}, "abits"),
        ({"first_last_bits": 9}, "first_last_bits"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_library_bit_widths_outside_2_to_8(small, kwargs, name):
    model = small[0]
    before = _weights(model)
    with pytest.raises(ValueError, match=f"`{name}` must be") as info:
        kpq.convert(model, **kwargs)
    assert "2" in str(info.value) and "8" in str(info.value)
    _assert_same_weights(before, model)


@pytest.mark.parametrize("command", ["convert", "inspect"])
@pytest.mark.parametrize("option, value", [("--wbits", "1"), ("--wbits", "9"), ("--abits", "0"), ("--abits", "12")])
def test_cli_bit_widths_outside_2_to_8(model_copy, tmp_path, command, option, value):
    digest = sha256(model_copy)
    extra = ["-o", tmp_path / "out"] if command == "convert" else []
    result = invoke(command, model_copy, *extra, option, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}': {value} is not in the range 2<=x<=8" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]
    assert sha256(model_copy) == digest


# ---------------------------------------------------------------------------
# Calibration data.


@pytest.mark.parametrize(
    "array, fragments",
    [
        (np.zeros((4, 9, 9, 3), "float32"), ["Calibration input", SHAPE_MESSAGE, "got (4, 9, 9, 3)"]),
        (np.zeros((4, 8, 8), "float32"), ["Calibration input", SHAPE_MESSAGE, "got (4, 8, 8)"]),
        (np.full((4,) + INPUT_SHAPE, "a"), ["Calibration input", DTYPE_MESSAGE, "got dtype <U1"]),
        (np.zeros((4,) + INPUT_SHAPE, bool), ["Calibration input", DTYPE_MESSAGE, "got dtype bool"]),
        (np.zeros((0,) + INPUT_SHAPE, "float32"), ["calibration data is empty"]),
        (np.full((4,) + INPUT_SHAPE, np.nan, "float32"), ["Calibration input", "expected finite values", "NaN or Inf"]),
    ],
    ids=["spatial-shape", "rank", "strings", "bool", "empty", "nan"],
)
def test_cli_calibration_data_that_does_not_fit(model_copy, tmp_path, array, fragments):
    data = tmp_path / "calib.npy"
    np.save(data, array)
    digest = sha256(data)
    _convert_fails(model_copy, tmp_path / "out", "--calibration-data", data, fragments=fragments)
    assert sha256(data) == digest


def test_library_calibration_data_that_does_not_fit(small):
    model = small[0]
    before = _weights(model)
    with pytest.raises(CalibrationDataError, match=r"expected shape \(None, 8, 8, 3\); got \(2, 8, 8, 4\)"):
        kpq.convert(model, calibration_data=np.zeros((2, 8, 8, 4), "float32"))
    with pytest.raises(CalibrationDataError, match="expected a numeric array .* got dtype complex64"):
        kpq.convert(model, calibration_data=np.zeros((2,) + INPUT_SHAPE, "complex64"))
    with pytest.raises(CalibrationDataError, match="numpy array, a tf.data.Dataset or an iterable"):
        kpq.convert(model, calibration_data=42)
    _assert_same_weights(before, model)


@pytest.mark.parametrize(
    "arrays, options, fragments",
    [
        ({"a": 1, "b": 2}, [], ["holds arrays ['a', 'b']", "--calibration-key"]),
        ({"x": 1}, ["--calibration-key", "images"], ["has no array 'images'", "['x']"]),
    ],
    ids=["ambiguous", "missing-key"],
)
def test_cli_calibration_npz_keys(model_copy, tmp_path, arrays, options, fragments):
    data = tmp_path / "calib.npz"
    np.savez(data, **{k: random_images(2).astype("float32") for k in arrays})
    _convert_fails(model_copy, tmp_path / "out", "--calibration-data", data, *options, fragments=fragments)


def test_cli_calibration_file_that_is_not_numpy(model_copy, tmp_path):
    data = tmp_path / "calib.npy"
    data.write_text("not numpy")
    _convert_fails(model_copy, tmp_path / "out", "--calibration-data", data,
                   fragments=["Cannot read calibration data", "calib.npy"])


# ---------------------------------------------------------------------------
# Output folders.


def test_output_path_that_is_a_file(model_copy, tmp_path):
    target = tmp_path / "out"
    target.write_text("keep me")
    _convert_fails(model_copy, target, fragments=("not a folder",))
    assert target.read_text() == "keep me"


def test_output_path_inside_a_file(model_copy, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    _convert_fails(model_copy, blocker / "out", fragments=(f"'{blocker}' exists and is not a folder",))
    assert blocker.read_text() == "keep me"


@pytest.fixture
def export_v1(model_copy, tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", model_copy, "-o", out, "--format", "both")
    assert result.exit_code == 0, result.output
    return out


def _no_leftovers(out):
    leftovers = [name for name in os.listdir(out) if name.startswith(".") or name.endswith(".old")]
    assert leftovers == []


@pytest.mark.parametrize("output_format", ["savedmodel", "keras", "both"])
def test_existing_version_is_kept_without_overwrite(model_copy, export_v1, output_format):
    before = snapshot(export_v1)
    result = invoke("convert", model_copy, "-o", export_v1, "--format", output_format, "--method", "uniform")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "Version 1 already exists", "--overwrite")
    # Refused before any work is done.
    assert "Loading" not in result.stderr
    assert snapshot(export_v1) == before


def test_overwrite_replaces_the_version(model_copy, export_v1):
    before = snapshot(export_v1)
    result = invoke("convert", model_copy, "-o", export_v1, "--format", "both", "--method", "uniform", "--overwrite")
    assert result.exit_code == 0, result.output
    after = snapshot(export_v1)
    assert sorted(after) == sorted(before)
    with open(export_v1 / "1" / "kpq-report.json", encoding="utf-8") as file:
        assert json.load(file)["report"]["options"]["method"] == "uniform"
    variables = os.path.join("1", "variables", "variables.data-00000-of-00001")
    for name in (os.path.join("1", "kpq-report.json"), os.path.join("1", "kpq-model.keras"), variables):
        assert after[name] != before[name], name
    _no_leftovers(export_v1)


def test_overwrite_with_fewer_formats_leaves_no_stale_artifact(model_copy, export_v1):
    """Replacing version 1 (SavedModel + .keras) by a SavedModel alone must not keep the old .keras."""
    result = invoke("convert", model_copy, "-o", export_v1, "--method", "uniform", "--overwrite")
    assert result.exit_code == 0, result.output
    assert os.listdir(export_v1) == ["1"]
    assert "kpq-model.keras" not in os.listdir(export_v1 / "1")


def test_failed_conversion_adds_nothing_to_the_export_folder(model_copy, export_v1, tmp_path):
    data = tmp_path / "bad.npy"
    np.save(data, np.zeros((4, 3, 3, 3), "float32"))
    _convert_fails(model_copy, export_v1, "--version", "2", "--calibration-data", data,
                   fragments=("expected shape",))
    _convert_fails(model_copy, export_v1, "--overwrite", "--calibration-data", data, fragments=("expected shape",))


def test_failed_export_adds_nothing_to_the_export_folder(model_copy, export_v1, monkeypatch):
    import keras_powerquant.export as export

    original = export.save_serving_model

    def save_then_fail(*args, **kwargs):
        original(*args, **kwargs)  # a complete SavedModel in the staging folder...
        raise OSError("disk full")  # ...then the export fails

    monkeypatch.setattr(export, "save_serving_model", save_then_fail)
    _convert_fails(model_copy, export_v1, "--version", "2", fragments=("disk full",))
    _convert_fails(model_copy, export_v1, "--overwrite", "--format", "both", fragments=("disk full",))
    _no_leftovers(export_v1)


# ---------------------------------------------------------------------------
# Inputs are read, never written.


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_model_file_is_unchanged_by_a_successful_conversion(small, tmp_path, kind):
    path = tmp_path / f"model.{kind}"
    shutil.copyfile(small[1][kind], path)
    data = tmp_path / "calib.npy"
    np.save(data, random_images(8).astype("float32"))
    digests = (sha256(path), sha256(data))
    stat = os.stat(path)
    result = invoke("convert", path, "-o", tmp_path / "out", "--calibration-data", data, "--format", "both")
    assert result.exit_code == 0, result.output
    assert (sha256(path), sha256(data)) == digests
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns


def test_real_resnet8_file_is_unchanged_by_a_conversion(resnet8_path, tmp_path):
    path = tmp_path / "resnet8.h5"
    shutil.copyfile(resnet8_path, path)
    digest = sha256(path)
    result = invoke("convert", path, "-o", tmp_path / "out", "--format", "keras")
    assert result.exit_code == 0, result.output
    assert sha256(path) == digest


def test_model_object_is_unchanged_by_conversion(small):
    model = small[0]
    before = _weights(model)
    kpq.convert(model, 4, 4, calibration_data=random_images(8).astype("float32"))
    kpq.convert(model, 3, 3, "uniform", scope="network", quantize_first_last=True)
    _assert_same_weights(before, model)


# ---------------------------------------------------------------------------
# Evaluation data.


@pytest.mark.parametrize(
    "name, write, fragments",
    [
        ("data.npy", lambda p: np.save(p, random_images(2)), ["Cannot read", "as an .npz archive"]),
        ("data.npz", lambda p: p.write_text("not numpy"), ["Cannot read", "as an .npz archive"]),
        (
            "data.npz",
            lambda p: np.savez(p, x=random_images(3), y=np.zeros(2, np.int64)),
            ["3 inputs but 2 labels"],
        ),
    ],
    ids=["npy", "text", "length-mismatch"],
)
def test_evaluate_data_that_does_not_fit(model_copy, tmp_path, name, write, fragments):
    data = tmp_path / name
    write(data)
    digest = sha256(data)
    result = invoke("evaluate", model_copy, "--data", data)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert_one_line_error(result.stderr, name, *fragments)
    assert sha256(data) == digest

"""Export folders under concurrency and failure: versions are claimed, published and replaced whole.

Concurrency is tested with real `kpq convert` processes racing for one
export folder; failures with real file-system errors (an immutable file,
a rename that fails) and real killed processes.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
import keras_powerquant.export as export
from keras_powerquant.errors import ExportError
from keras_powerquant.export import export_model
from tests.cli_helpers import assert_one_line_error
from tests.cli_helpers import invoke
from tests.cli_helpers import run_kpq
from tests.cli_helpers import save_small_model
from tests.cli_helpers import snapshot


@pytest.fixture(scope="module")
def small_keras(tmp_path_factory):
    return save_small_model(tmp_path_factory.mktemp("small"))[1]["keras"]


def _dense_model(units=3, input_name="features"):
    inputs = keras.Input((6,), name=input_name)
    return keras.Model(inputs, keras.layers.Dense(units, name="scores")(inputs))


def _report(version_dir):
    with open(os.path.join(version_dir, "kpq-report.json"), encoding="utf-8") as file:
        return json.load(file)


def _race(*commands):
    """Starts the `kpq` commands at once; returns their CompletedProcess in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: run_kpq(*args), commands))


def _wbits(version_dir):
    return _report(version_dir)["report"]["options"]["wbits"]


# ---------------------------------------------------------------------------
# Concurrent writers.


def test_two_processes_writing_one_version_never_replace_each_other(small_keras, tmp_path):
    out = tmp_path / "race"
    first, second = _race(
        ("convert", small_keras, "-o", out, "--wbits", "3", "--format", "both"),
        ("convert", small_keras, "-o", out, "--wbits", "5", "--format", "both"),
    )
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 1], (first.stderr[-2000:], second.stderr[-2000:])
    winner, loser = (first, second) if first.returncode == 0 else (second, first)
    assert_one_line_error(loser.stderr, "Version 1 already exists")
    # The folder holds the winner's version, whole; nothing of the loser.
    assert os.listdir(out) == ["1"]
    assert _wbits(out / "1") == (3 if winner is first else 5)
    assert f"SavedModel: {out / '1'}" in winner.stdout


def test_two_processes_asking_for_the_next_version_get_one_each(small_keras, tmp_path):
    out = tmp_path / "race"
    first, second = _race(
        ("convert", small_keras, "-o", out, "--wbits", "3", "--version", "next"),
        ("convert", small_keras, "-o", out, "--wbits", "5", "--version", "next"),
    )
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert sorted(os.listdir(out)) == ["1", "2"]
    assert sorted([_wbits(out / "1"), _wbits(out / "2")]) == [3, 5]
    for process in (first, second):
        (line,) = [line for line in process.stdout.splitlines() if line.startswith("SavedModel: ")]
        version_dir = line.split(": ", 1)[1]
        assert _wbits(version_dir) == (3 if process is first else 5)


@contextlib.contextmanager
def _another_writer_takes_version_1(export_dir):
    """While the export is staged, before it publishes, another export writes version 1."""
    original = export._write_version

    def write_then_lose_the_race(model, folder, *args):
        original(model, folder, *args)
        export._write_version = original
        export_model(_dense_model(4), export_dir, 1)

    export._write_version = write_then_lose_the_race
    try:
        yield
    finally:
        export._write_version = original


def test_api_next_version_skips_a_version_claimed_meanwhile(tmp_path):
    """`version=None` takes the next free number even if another writer claimed it after the scan."""
    with _another_writer_takes_version_1(tmp_path):
        result = export_model(_dense_model(3), tmp_path, None)
    assert result.version == 2
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert _report(tmp_path / "2")["signature"]["inputs"] == {"features": [None, 6]}


def test_api_explicit_version_claimed_meanwhile_fails_clearly(tmp_path):
    with _another_writer_takes_version_1(tmp_path):
        with pytest.raises(ExportError, match="Version 1 already exists .*another export wrote it"):
            export_model(_dense_model(3), tmp_path, 1)
    assert os.listdir(tmp_path) == ["1"]
    assert tf.saved_model.load(str(tmp_path / "1")).signatures["serving_default"].structured_outputs[
        "scores"
    ].shape[-1] == 4


# ---------------------------------------------------------------------------
# Replacing a version.


def _immutable(path):
    return subprocess.run(["chattr", "+i", os.fspath(path)], capture_output=True).returncode == 0


def test_overwrite_with_an_undeletable_old_file_never_mixes_versions(small_keras, tmp_path):
    """The issue's repro: the old report cannot be moved or deleted (chattr +i)."""
    out = tmp_path / "out"
    assert invoke("convert", small_keras, "-o", out, "--wbits", "3", "--format", "both").exit_code == 0
    probe = tmp_path / "probe"
    probe.write_text("")
    if shutil.which("chattr") is None or not _immutable(probe):
        pytest.skip("chattr +i is not permitted here")
    try:
        assert _immutable(out / "1" / "kpq-report.json")
        result = invoke("convert", small_keras, "-o", out, "--wbits", "5", "--format", "both", "--overwrite")
        files = os.listdir(out / "1")
        keras_model = keras.saving.load_model(out / "1" / "kpq-model.keras")
        served_bits = {layer.quantizer.bits for layer in keras_model.layers if hasattr(layer, "quantizer")}
        report_bits = _wbits(out / "1")
    finally:
        for root, _, names in os.walk(tmp_path):
            for name in names:
                subprocess.run(["chattr", "-i", os.path.join(root, name)], capture_output=True)
    # The new version is in place whole: its report and its models agree.
    assert result.exit_code == 0, result.output
    assert {"saved_model.pb", "kpq-model.keras", "kpq-report.json"} <= set(files)
    assert report_bits == 5 and 5 in served_bits


@pytest.mark.parametrize("failing_rename", [1, 2])
def test_failed_replacement_keeps_the_old_version_whole(tmp_path, monkeypatch, failing_rename):
    """Without an atomic exchange the old version is renamed aside; a failure puts it back."""
    first = export_model(_dense_model(3), tmp_path, 1, formats="both")
    before = snapshot(tmp_path)
    monkeypatch.setattr(export, "_exchange", lambda first, second: False)
    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append((source, target))
        if len(calls) == failing_rename:
            raise OSError("simulated I/O error")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        export_model(_dense_model(5), tmp_path, 1, formats="both", overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert snapshot(tmp_path) == before
    assert keras.saving.load_model(first.keras_path).output_shape == (None, 3)


def test_overwrite_swaps_the_whole_version(tmp_path):
    export_model(_dense_model(3), tmp_path, 1, formats="both")
    result = export_model(_dense_model(5), tmp_path, 1, formats="savedmodel", overwrite=True)
    assert os.listdir(tmp_path) == ["1"]
    assert "kpq-model.keras" not in os.listdir(result.version_dir)
    outputs = tf.saved_model.load(result.saved_model_dir).signatures["serving_default"].structured_outputs
    assert outputs["scores"].shape[-1] == 5


# ---------------------------------------------------------------------------
# Leftovers.


def _dead_pid():
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_killed_export_leftovers_are_cleaned_by_the_next_export(tmp_path):
    host = export._host()
    dead = tmp_path / f".kpq-tmp-{_dead_pid()}@{host}-abc123"
    alive = tmp_path / f".kpq-tmp-{os.getpid()}@{host}-def456"
    other_host_recent = tmp_path / ".kpq-tmp-1@some.other.host-ghi789"
    other_host_old = tmp_path / ".kpq-tmp-1@some.other.host-jkl012"
    for folder in (dead, alive, other_host_recent, other_host_old):
        (folder / "variables").mkdir(parents=True)
        (folder / "saved_model.pb").write_bytes(b"partial")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(other_host_old, (day_ago, day_ago))
    export_model(_dense_model(), tmp_path, 1)
    assert sorted(os.listdir(tmp_path)) == sorted(["1", alive.name, other_host_recent.name])


def test_version_renamed_aside_by_a_killed_overwrite_is_restored(tmp_path):
    export_model(_dense_model(3), tmp_path, 1)
    aside = tmp_path / f".kpq-old-1-{_dead_pid()}@{export._host()}-abc123"
    os.rename(tmp_path / "1", aside)  # killed between its two renames
    before = snapshot(aside)
    export_model(_dense_model(4), tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert snapshot(tmp_path / "1") == before


def test_empty_output_path_is_refused(small_keras, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", small_keras, "-o", "")
    assert result.exit_code == 2
    assert "must not be empty" in result.stderr
    with pytest.raises(ExportError, match="empty"):
        export_model(_dense_model(), "", 1)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Versions and models export_model accepts.


def test_numpy_integer_versions_are_accepted(tmp_path):
    assert export_model(_dense_model(), tmp_path, np.int64(2)).version == 2
    assert export_model(_dense_model(), tmp_path, np.uint8(3)).version == 3
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]


@pytest.mark.parametrize("version", [0, -1, 2**63, True, 1.0, "1"])
def test_versions_outside_tf_serving_int64_are_refused(tmp_path, version):
    with pytest.raises(ExportError, match="integer from 1 to 9223372036854775807"):
        export_model(_dense_model(), tmp_path / "out", version)
    assert os.listdir(tmp_path) == []


def test_cli_version_above_int64_is_a_usage_error(small_keras, tmp_path):
    result = invoke("convert", small_keras, "-o", tmp_path / "out", "--version", str(2**63))
    assert result.exit_code == 2
    assert "9223372036854775807" in result.stderr
    result = invoke("convert", small_keras, "-o", tmp_path / "out", "--version", "next", "--overwrite")
    assert result.exit_code == 2
    assert os.listdir(tmp_path) == []


def test_subclassed_model_export_is_a_clear_error(tmp_path):
    class Scores(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Scores()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(ExportError, match="subclassed"):
        export_model(model, tmp_path / "out", 1)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Signature keys.


def _two_input_model():
    spaced = keras.Input((4,), name="my input")
    accented = keras.Input((3,), name="données")
    joined = keras.layers.Concatenate(name="joined")([spaced, accented])
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(joined)
    return keras.Model([spaced, accented], keras.layers.Dense(2, name="scores")(hidden))


def test_input_names_with_spaces_or_non_ascii_get_valid_signature_keys(tmp_path):
    model = _two_input_model()
    x = [np.random.default_rng(0).normal(size=(5, 4)).astype("float32"),
         np.random.default_rng(1).normal(size=(5, 3)).astype("float32")]
    quantized, report = kpq.convert(model, 8, 8, calibration_data=x)
    result = export_model(quantized, tmp_path / "out", 1, report=report)
    signature = tf.saved_model.load(result.saved_model_dir).signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["donn_es", "my_input"]
    served = signature(my_input=tf.constant(x[0]), donn_es=tf.constant(x[1]))["scores"].numpy()
    np.testing.assert_allclose(served, quantized.predict(x, verbose=0), atol=1e-5)
    recorded = _report(result.version_dir)["signature"]
    assert recorded["input_names"] == {"my_input": "my input", "donn_es": "données"}
    assert recorded["inputs"] == {"my_input": [None, 4], "donn_es": [None, 3]}
    inspected = invoke("inspect", result.version_dir)
    assert inspected.exit_code == 0, inspected.output
    assert "Signature input 'my_input': model input 'my input', shape [None, 4]" in inspected.stdout
    assert "Signature input 'donn_es': model input 'données', shape [None, 3]" in inspected.stdout


def test_signature_keys_are_unique_and_valid():
    assert export.signature_keys(["a b", "a_b", "a.b", "_x", "", "ß"]) == [
        "a_b", "a_b_2", "a.b", "input__x", "input", "input__"
    ]


def test_layer_name_tensorflow_cannot_trace_is_refused_before_conversion(tmp_path):
    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(2, name="my scores")(inputs))
    path = tmp_path / "spaced.keras"
    model.save(path)
    result = invoke("convert", path, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "Layer 'my scores'", "rename it")
    assert "Converting" not in result.stderr
    assert not (tmp_path / "out").exists()

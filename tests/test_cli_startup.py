"""The `kpq` command starts fast (no TensorFlow before a command runs) and quietly (no start-up log lines)."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.cli_helpers import build_small_model
from tests.cli_helpers import kpq_stderr_lines
from tests.cli_helpers import run_kpq

# Parses `kpq --help` and `kpq convert --help`, then lists the heavy modules imported.
_HELP_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import sys

    import keras_powerquant
    import keras_powerquant.cli.main as cli
    imported = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    assert not imported, "importing the CLI imported " + ", ".join(imported[:5])
    for args in (["--help"], ["convert", "--help"], ["inspect", "--help"], ["evaluate", "--help"]):
        cli.main.main(args, prog_name="kpq", standalone_mode=False)
    imported = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    assert not imported, "--help imported " + ", ".join(imported[:5])
    print("no tensorflow")
    """
)

# TensorFlow's own start-up, as a user's script sees it.
_TENSORFLOW_STARTUP = "import tensorflow as tf; tf.config.list_logical_devices()"


def _python(code):
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def _runtime_lines(stderr):
    kpq_lines = set(kpq_stderr_lines(stderr))
    return [line for line in stderr.splitlines() if line.strip() and line not in kpq_lines]


def test_cli_and_help_do_not_import_tensorflow():
    result = _python(_HELP_WITHOUT_TENSORFLOW)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no tensorflow" in result.stdout
    assert "Usage: kpq convert [OPTIONS] MODEL" in result.stdout


def test_package_names_load_keras_on_first_use():
    result = _python(
        "import sys, keras_powerquant as kpq\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n"
        "import keras\n"
        "assert kpq.PowerQuantDense is keras.saving.get_registered_object('keras_powerquant>PowerQuantDense')\n"
        "print(set(dir(kpq)) >= {'convert', 'export_model', 'load_model', 'ConversionReport'})"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "True"


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("startup")
    path = folder / "small.keras"
    build_small_model().save(path)
    return path


def test_conversion_shows_kpq_warnings_and_no_tensorflow_startup_lines(small_model_file, tmp_path):
    process = run_kpq("convert", small_model_file, "-o", tmp_path / "out", tf_log_level=None)
    assert process.returncode == 0, process.stderr[-3000:]
    assert _runtime_lines(process.stderr) == [], process.stderr
    for noise in ("oneDNN", "cuda", "absl", "cpu_feature_guard"):
        assert noise.lower() not in process.stderr.lower(), process.stderr
    # What the user must know still shows: the layer kept float, the input without statistics.
    assert "Warning: layer 'norm_b' (LayerNormalization) kept float" in process.stderr
    assert any(
        line.startswith("Warning: activation ") and "no statistics" in line for line in process.stderr.splitlines()
    ), process.stderr


def test_verbose_shows_tensorflow_startup_lines(small_model_file):
    reference = _python(_TENSORFLOW_STARTUP)
    assert reference.returncode == 0, reference.stderr[-3000:]
    # Log lines start with a level, a date and a time stamp: compare what follows them.
    expected = {line.split("]", 1)[-1] for line in _runtime_lines(reference.stderr)}
    if not expected:
        pytest.skip("TensorFlow prints no start-up lines on this machine")
    verbose = run_kpq("--verbose", "inspect", small_model_file, tf_log_level=None)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    shown = {line.split("]", 1)[-1] for line in _runtime_lines(verbose.stderr)}
    assert expected <= shown, (expected - shown, verbose.stderr)


def test_converted_keras_files_load_after_import_keras_then_keras_powerquant(tmp_path):
    import keras

    import keras_powerquant as kpq

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])
    quantized, _ = kpq.convert(model, 4, 4)
    path = tmp_path / "quantized.keras"
    quantized.save(path)
    loads = f"model = keras.saving.load_model({str(path)!r}); print(type(model.layers[-1]).__name__)"
    # A script that imports Keras first needs nothing but `import keras_powerquant`.
    result = _python(f"import keras\nimport keras_powerquant\n{loads}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "PowerQuantDense"
    # Without keras_powerquant the layers are unknown: the import above is what registers them.
    result = _python(f"import keras\n{loads}")
    assert result.returncode != 0 and "PowerQuantDense" in result.stderr

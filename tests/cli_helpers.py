"""Small models, file snapshots and `kpq` runners shared by the CLI, bad-input and callback tests."""

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

# Lines TensorFlow's C++ runtime (absl logging) writes to stderr by itself,
# before and whatever kpq prints; they are not kpq's messages.
_RUNTIME_LOG_LINE = re.compile(
    r"^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog|"
    r"To enable the following instructions: .* rebuild TensorFlow|WARNING:absl:)"
)

INPUT_SHAPE = (8, 8, 3)
NUM_CLASSES = 10


def build_small_model(seed=0, name="small"):
    """A functional CNN covering each conversion decision the CLI reports.

    conv_a + bn_a (folded, first layer), sep_b (SeparableConv2D: quantized as
    sep_b_depthwise and sep_b_pointwise), bn_b after a ReLU (kept: not
    foldable), norm_b (LayerNormalization: kept float), conv_c + bn_c (folded, 4-bit
    middle layer), logits (Dense, last layer). BatchNorm statistics are
    random so folding changes the kernels.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, name="image")
    h = layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv_a")(inputs)
    h = layers.BatchNormalization(name="bn_a")(h)
    h = layers.ReLU(name="relu_a")(h)
    h = layers.SeparableConv2D(6, 3, padding="same", name="sep_b")(h)
    h = layers.ReLU(name="relu_b")(h)
    h = layers.BatchNormalization(name="bn_b")(h)
    h = layers.LayerNormalization(name="norm_b")(h)
    h = layers.Conv2D(6, 3, padding="same", name="conv_c")(h)
    h = layers.BatchNormalization(name="bn_c")(h)
    h = layers.ReLU(name="relu_c")(h)
    h = layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="logits")(h)
    model = keras.Model(inputs, outputs, name=name)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, channels).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.3, channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
    return model


# Expected decisions for build_small_model, from how it is built.
SMALL_FOLDS = {"bn_a": "conv_a", "bn_c": "conv_c"}
SMALL_QUANTIZED = ["conv_a", "sep_b_depthwise", "sep_b_pointwise", "conv_c", "logits"]
SMALL_FLOAT = {"norm_b": "LayerNormalization"}
SMALL_KEPT_BN = {"bn_b": "relu_b"}


def save_small_model(folder):
    """`(model, {"keras": path, "h5": path})`: the small model saved both ways in `folder`."""
    model = build_small_model()
    paths = {"keras": folder / "small.keras", "h5": folder / "small.h5"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    return model, paths


def random_images(count, seed=1):
    """uint8 images of the small model's input shape."""
    return np.random.default_rng(seed).integers(0, 256, (count,) + INPUT_SHAPE, dtype=np.uint8)


def sha256(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def snapshot(folder):
    """{relative path: sha256 or "<dir>"} of everything under `folder` (hidden entries included)."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        return None
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            state[os.path.relpath(os.path.join(root, name), folder)] = "<dir>"
        for name in files:
            path = os.path.join(root, name)
            state[os.path.relpath(path, folder)] = sha256(path)
    return state


def invoke(*args):
    """Runs `kpq ARGS` in-process; returns click's Result (stdout and stderr apart)."""
    from click.testing import CliRunner

    from keras_powerquant.cli.main import main

    return CliRunner().invoke(main, [os.fspath(a) for a in args])


def run_kpq(*args, cwd=None, timeout=300, tf_log_level="2"):
    """Runs the installed `kpq` command as a real process; returns subprocess.CompletedProcess (text).

    `tf_log_level` is TF_CPP_MIN_LOG_LEVEL unless already set; None runs
    with the variable unset, as on a user's machine.
    """
    executable = shutil.which("kpq", path=str(pathlib.Path(sys.executable).parent))
    if executable is None:
        pytest.skip("the kpq command is not installed next to this Python (pip install -e .)")
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "tensorflow")
    if tf_log_level is None:
        env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    else:
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", tf_log_level)
    command = [executable, *[os.fspath(a) for a in args]]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def kpq_stderr_lines(stderr):
    """Non-empty stderr lines that kpq wrote (TensorFlow runtime log lines dropped)."""
    return [line for line in stderr.splitlines() if line.strip() and not _RUNTIME_LOG_LINE.match(line)]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_one_line_error(stderr, *fragments):
    """kpq's failure report: exactly one "Error:" line, last, with the fragments, no traceback."""
    lines = kpq_stderr_lines(stderr)
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert lines and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]

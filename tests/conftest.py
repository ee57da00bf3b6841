"""Shared pytest fixtures: the location of the real models and data.

The real models and evaluation data live outside the repository, by default
in `<repo root>/../shared/data`; set `KPQ_SHARED_DATA` to point elsewhere.
Tests that need them are skipped, with the reason, when they are absent.
"""

import os
import pathlib

import pytest
from hypothesis import settings

# Local runs explore new examples each time; CI replays a fixed sequence so a
# submission's result does not depend on the draw.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_DEFAULT_SHARED_DATA = _REPO_ROOT.parent / "shared" / "data"

RESNET8_FILE = "models/mlperf_tiny_resnet8_cifar10.h5"
VWW_FILE = "models/mlperf_tiny_vww_mobilenetv1_96.h5"


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder (pathlib.Path); skips if it is absent."""
    folder = pathlib.Path(
        os.environ.get("KPQ_SHARED_DATA", _DEFAULT_SHARED_DATA)
    ).resolve()
    if not folder.is_dir():
        pytest.skip(
            f"shared data folder {folder} not found; set KPQ_SHARED_DATA to "
            "the folder holding models/ and cifar10/"
        )
    return folder


def _shared_file(shared_data, relative):
    path = shared_data / relative
    if not path.is_file():
        pytest.skip(f"{relative} not found in shared data folder {shared_data}")
    return path


@pytest.fixture(scope="session")
def resnet8_path(shared_data):
    """Path of the MLPerf Tiny ResNet-8 CIFAR-10 .h5 (tf.keras 2.4)."""
    return _shared_file(shared_data, RESNET8_FILE)


@pytest.fixture(scope="session")
def vww_path(shared_data):
    """Path of the MLPerf Tiny VWW MobileNetV1 .h5 (tf.keras 2.4)."""
    return _shared_file(shared_data, VWW_FILE)


@pytest.fixture(scope="session")
def resnet8_model(resnet8_path):
    """The real ResNet-8, loaded once per session (do not modify it)."""
    from keras_powerquant.loading import load_model

    return load_model(resnet8_path)


@pytest.fixture(scope="session")
def cifar_test(shared_data):
    """`(x, y)`: the first 932 CIFAR-10 test images as float32 0..255, and labels."""
    import numpy as np

    data = np.load(_shared_file(shared_data, "cifar10/test_first932.npz"))
    return data["x"].astype("float32"), data["y"]


@pytest.fixture(scope="session")
def cifar_calibration(shared_data):
    """512 CIFAR-10 training images (never test images), float32 0..255."""
    import numpy as np

    data = np.load(_shared_file(shared_data, "cifar10/train_4660.npz"))
    return data["x"][:512].astype("float32")


@pytest.fixture(scope="session")
def cpp_loader():
    """The TensorFlow C++ SavedModel loader (tests/cpp), built once and cached in build/test-cpp."""
    from tests.cpp_loader import build_loader
    from tests.cpp_loader import LoaderUnavailable

    try:
        return build_loader(_REPO_ROOT / "build" / "test-cpp")
    except LoaderUnavailable as exc:
        pytest.skip(str(exc))

"""Builds and runs tests/cpp/load_saved_model.cc: SavedModels served by TensorFlow's C++ loader.

TF Serving restores a SavedModel with `tensorflow::LoadSavedModel` (tag
"serve") and runs a SignatureDef by its tensor names; a SavedModel that
loads in Python can still fail there (keras-team/keras#20095,
tensorflow/serving#2250). The program is compiled against the installed
TensorFlow wheel (its headers and its libtensorflow_cc /
libtensorflow_framework), once per source, compiler and TensorFlow version:
the binary is cached under `cache_dir`. Only the tests need a compiler.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

SOURCE = pathlib.Path(__file__).resolve().parent / "cpp" / "load_saved_model.cc"
_LIBRARIES = ("libtensorflow_framework.so.2", "libtensorflow_cc.so.2")


class LoaderUnavailable(Exception):
    """This machine cannot build the loader (no compiler, headers or libraries); the message says why."""


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise LoaderUnavailable("no C++ compiler found ($CXX, g++ or c++) to build the TensorFlow C++ loader")


def build_loader(cache_dir):
    """Path of the compiled loader, built into `cache_dir` unless already there.

    Raises:
        LoaderUnavailable: no compiler, or the TensorFlow wheel ships no C++
            headers or libraries.
        RuntimeError: the compiler failed (its output in the message).
    """
    import tensorflow as tf

    compiler = _compiler()
    include_dir = pathlib.Path(tf.sysconfig.get_include())
    if not (include_dir / "tensorflow" / "cc" / "saved_model" / "loader.h").is_file():
        raise LoaderUnavailable(f"TensorFlow's C++ headers are not in {include_dir}")
    lib_dir = tf.sysconfig.get_lib()
    missing = [name for name in _LIBRARIES if not os.path.isfile(os.path.join(lib_dir, name))]
    if missing:
        raise LoaderUnavailable(f"TensorFlow's C++ libraries {missing} are not in {lib_dir}")
    command = [
        compiler,
        "-O1",
        "-w",  # TensorFlow's own headers warn (deprecations, Eigen)
        *tf.sysconfig.get_compile_flags(),
        str(SOURCE),
        # Kernels and the session factory register themselves when
        # libtensorflow_cc is loaded, though no symbol of it is called by name.
        "-Wl,--no-as-needed",
        *tf.sysconfig.get_link_flags(),
        "-l:libtensorflow_cc.so.2",
        f"-Wl,-rpath,{lib_dir}",
    ]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, tf.__version__, *command]).encode()).hexdigest()
    binary = pathlib.Path(cache_dir) / key[:16] / "load_saved_model"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent sessions never run half a binary.
    with tempfile.TemporaryDirectory(dir=binary.parent) as scratch:
        staged = os.path.join(scratch, binary.name)
        result = subprocess.run(command + ["-o", staged], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{' '.join(command)}\n{result.stderr[-5000:]}")
        os.replace(staged, binary)
    return binary


def serve(loader, requests, workdir):
    """Runs each `(saved_model_dir, {input key: float32 array})` through the C++ loader, in one process.

    Returns:
        One `(signature, outputs)` per request: the line the loader printed
        ("<method name> inputs=<keys> outputs=<keys>") and
        `{output key: array}`.
    """
    args, folders = [], []
    for index, (saved_model_dir, inputs) in enumerate(requests):
        inputs_dir, outputs_dir = pathlib.Path(workdir, f"in{index}"), pathlib.Path(workdir, f"out{index}")
        inputs_dir.mkdir(parents=True)
        outputs_dir.mkdir(parents=True)
        for key, value in inputs.items():
            np.save(inputs_dir / f"{key}.npy", np.ascontiguousarray(value, dtype="<f4"))
        args += [os.fspath(saved_model_dir), os.fspath(inputs_dir), os.fspath(outputs_dir)]
        folders.append(outputs_dir)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([os.fspath(loader), *args], capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0:
        raise AssertionError(f"the C++ loader failed (exit {result.returncode}):\n{result.stderr[-5000:]}")
    lines = result.stdout.splitlines()
    assert len(lines) == len(requests), result.stdout
    return [
        (line, {path.stem: np.load(path) for path in sorted(folder.glob("*.npy"))})
        for line, folder in zip(lines, folders)
    ]

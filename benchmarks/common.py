"""Helpers shared by the benchmark scripts: models, data, exports, timing, output.

Importing this module puts the repository root first on `sys.path`, so the
benchmarks always measure the `keras_powerquant` of the checkout they live
in, whatever copy is installed, and selects Keras' TensorFlow backend.

The real models and data are read from the shared data folder,
`KPQ_SHARED_DATA` or `<repo root>/../shared/data` by default (the same rule
as the test suite). A benchmark that needs a missing file raises `Skip`;
callers record the reason instead of a result.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_powerquant as kpq  # noqa: E402
from keras_powerquant.export import SERVING_SIGNATURE  # noqa: E402

RESNET8_FILE = "models/mlperf_tiny_resnet8_cifar10.h5"
VWW_FILE = "models/mlperf_tiny_vww_mobilenetv1_96.h5"
CIFAR_TEST_FILE = "cifar10/test_first932.npz"
CIFAR_TRAIN_FILE = "cifar10/train_4660.npz"
SEED = 0


class Skip(Exception):
    """A benchmark (or one of its models) cannot run here; the message says why."""


def shared_data_dir():
    """The shared data folder (`pathlib.Path`), whether or not it exists."""
    return pathlib.Path(os.environ.get("KPQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


def shared_file(relative):
    """Path of a file of the shared data folder; raises `Skip` if it is missing."""
    folder = shared_data_dir()
    if not folder.is_dir():
        raise Skip(f"shared data folder {folder} not found (set KPQ_SHARED_DATA)")
    path = folder / relative
    if not path.is_file():
        raise Skip(f"{relative} not found in the shared data folder {folder}")
    return path


def cifar_test():
    """`(x, y)`: the first 932 CIFAR-10 test images as raw float32 0..255, and labels."""
    data = np.load(shared_file(CIFAR_TEST_FILE))
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def cifar_calibration(count=512):
    """The first `count` CIFAR-10 training images (never test images), float32 0..255."""
    return np.load(shared_file(CIFAR_TRAIN_FILE))["x"][:count].astype(np.float32)


def _application(constructor):
    def build():
        keras.utils.set_random_seed(SEED)
        return constructor(weights=None, input_shape=(224, 224, 3))

    return build


# name -> (description, builder, (low, high) range of the model's inputs)
MODELS = {
    "resnet8": (
        "MLPerf Tiny ResNet-8 (CIFAR-10, 32x32x3)",
        lambda: kpq.load_model(shared_file(RESNET8_FILE)),
        (0.0, 255.0),
    ),
    "vww": (
        "MLPerf Tiny VWW MobileNetV1 0.25 (96x96x3)",
        lambda: kpq.load_model(shared_file(VWW_FILE)),
        (0.0, 1.0),
    ),
    "mobilenetv2": (
        "keras.applications MobileNetV2, weights=None (224x224x3)",
        _application(keras.applications.MobileNetV2),
        (-1.0, 1.0),
    ),
    "resnet50": (
        "keras.applications ResNet50, weights=None (224x224x3)",
        _application(keras.applications.ResNet50),
        (-128.0, 128.0),
    ),
}


def load_benchmark_model(name):
    """The float `keras.Model` called `name` in `MODELS`; raises `Skip` if unavailable."""
    return MODELS[name][1]()


def random_inputs(name, model, batch, seed=SEED):
    """A deterministic float32 batch spanning the model's input range."""
    low, high = MODELS[name][2]
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# Conversion variants the benchmarks compare: name -> convert() arguments.
# "powerquant" is the default (activation exponents among 1, 1/2, 1/4);
# "powerquant-continuous" fits activation exponents anywhere (the default
# before version 0.2).
VARIANTS = {
    "uniform": {"method": "uniform"},
    "powerquant": {"method": "powerquant"},
    "powerquant-continuous": {"method": "powerquant", "fast_activations": False},
}


def convert_variant(model, wbits, abits, variant, **options):
    """`kpq.convert` with the arguments of a named variant (see VARIANTS)."""
    return kpq.convert(model, wbits, abits, **VARIANTS[variant], **options)


def top1_hits(model, x, y, batch_size=32):
    """Per image: is the in-memory Keras model's top-1 class the label `y`.

    Batches of 32: an eager call holds its intermediate tensors, and 256
    EfficientNet-Lite2 images at 224x224 took over 24 GB.
    """
    batches = (x[i : i + batch_size] for i in range(0, len(x), batch_size))
    scores = np.concatenate([np.asarray(model(batch, training=False)) for batch in batches])
    return np.argmax(scores, axis=1) == y


def bits_label(wbits, abits):
    return f"W{wbits}/A{'float' if abits is None else abits}"


def export_saved_model(model, folder, report=None, float_model=None, decode_weights="load"):
    """Exports `model` with `kpq.export_model`; returns the SavedModel (version) folder."""
    return kpq.export_model(
        model, folder, report=report, float_model=float_model, decode_weights=decode_weights
    ).saved_model_dir


def serving_function(saved_model_dir):
    """`f(batch_tensor) -> output tensor` calling the SavedModel's serving signature.

    The loaded object is kept alive by the returned function.
    """
    loaded = tf.saved_model.load(saved_model_dir)
    signature = loaded.signatures[SERVING_SIGNATURE]
    (input_name,) = signature.structured_input_signature[1]
    (output_name,) = signature.structured_outputs

    def call(batch):
        return signature(**{input_name: batch})[output_name]

    call.loaded = loaded
    return call


def interleaved_timings(functions, iterations, warmup=3):
    """Wall times of `functions` (name -> no-argument callable), interleaved.

    Each iteration calls every function once; the order rotates by one
    position per iteration, so no function always runs first or after the
    same neighbour. Returns name -> list of seconds, `iterations` each.
    """
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times = {name: [] for name in names}
    for i in range(iterations):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def time_summary(seconds):
    """Median, quartiles (ms) and count of a list of wall times."""
    ms = np.asarray(seconds) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p25_ms": float(np.percentile(ms, 25)),
        "p75_ms": float(np.percentile(ms, 75)),
        "count": int(ms.size),
    }


def load_average():
    """The 1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    return [round(value, 2) for value in os.getloadavg()]


def _cpu_model():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("Model name")
    if name is None:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        name = names[0] if names else platform.processor() or "unknown"
    details = [f"{key} {fields[key]}" for key in ("CPU family", "Model", "Hypervisor vendor") if key in fields]
    return f"{name} ({', '.join(details)})" if details else name


def _memory_gib():
    with open("/proc/meminfo", encoding="utf-8") as file:
        for line in file:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _os_name():
    try:
        with open("/etc/os-release", encoding="utf-8") as file:
            for line in file:
                if line.startswith("PRETTY_NAME="):
                    return f"{line.split('=', 1)[1].strip().strip(chr(34))} ({platform.platform()})"
    except OSError:
        pass
    return platform.platform()


def _git_commit():
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_description():
    """The machine and software the numbers come from."""
    import scipy

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "os": _os_name(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "keras_powerquant": kpq.__version__,
        "keras_powerquant_path": str(pathlib.Path(kpq.__file__).parent),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": load_average(),
        "shared_data": str(shared_data_dir()),
    }


def pyplot():
    """matplotlib's pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(header, rows):
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(module):
    """Command line of one benchmark module: run it, print its markdown section.

    `python benchmarks/<name>.py [--quick] [--json PATH] [--plots DIR]`.
    """
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repeats")
    parser.add_argument("--json", help="write the raw results to this file")
    parser.add_argument("--plots", help="write the plot(s) into this folder")
    args = parser.parse_args()
    result = module.run(quick=args.quick)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=1)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        for path in module.plot(result, args.plots):
            print(f"plot: {path}")
    print(module.markdown(result))

"""Calibrated conversion time against data-free and TensorFlow Lite's int8 converter (issue 19).

What is measured, per model, in one process on the same machine:
- `kpq.convert(model, W, A)` data-free, then with `CALIBRATION_IMAGES`
  calibration images (defaults otherwise: empirical bias correction),
  wall time, `report.seconds` per stage and the peak resident memory of
  each stage (VmRSS polled every 20 ms);
- TensorFlow Lite's full-int8 conversion of the float model
  (`TFLiteConverter.from_concrete_functions`, `Optimize.DEFAULT`,
  `representative_dataset` of the same images, `TFLITE_BUILTINS_INT8`).

Models: EfficientNet-Lite2 (shared/data/imagenet; calibrated on the first
256 of the 650 validation images, top-1 on the other 394, paired with the
float model and TFLite's) and keras.applications ResNet50 (weights=None,
random inputs: time only). The machine has 2 cores that other work may
share: the load average is recorded before and after.

`python benchmarks/calibration_time.py [--quick] [--json benchmarks/calibration_time.json]`
(`--quick`: EfficientNet-Lite2 only, W8/A8 only.)
"""

import os
import threading
import time

import common
from common import keras
from common import kpq
from common import np
from common import tf

CALIBRATION_IMAGES = 256


def imagenet():
    """`(x, y)`: the 650 validation images, central 224 crop, (x - 127) / 128, labels."""
    folder = common.shared_file("imagenet/val_650/labels.txt").parent
    xs, ys = [], []
    for line in (folder / "labels.txt").read_text().split():
        name, label = line.split(",")
        image = tf.io.decode_jpeg(tf.io.read_file(str(folder / name)), channels=3)
        image = tf.image.resize_with_crop_or_pad(image, 224, 224)
        xs.append((tf.cast(image, tf.float32).numpy() - 127.0) / 128.0)
        ys.append(int(label))
    return np.stack(xs), np.asarray(ys)


class _PeakMemory:
    """Polls this process's resident memory; `peaks(bounds)` gives the peak within each interval."""

    def __init__(self, every=0.02):
        self.samples, self._every, self._stop = [], every, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def rss_gib():
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
        return float("nan")

    def _poll(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.rss_gib()))
            time.sleep(self._every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak(self, start, end):
        values = [rss for t, rss in self.samples if start <= t <= end]
        return round(max(values), 3) if values else None


def _timed_convert(model, wbits, abits, **options):
    with _PeakMemory() as memory:
        started = time.perf_counter()
        quantized, report = kpq.convert(model, wbits, abits, **options)
        wall = time.perf_counter() - started
    stages, mark = {}, started
    for stage, seconds in report.seconds.items():
        if stage == "total":
            continue
        stages[stage] = {"seconds": round(seconds, 3), "peak_rss_gib": memory.peak(mark, mark + seconds)}
        mark += seconds
    return quantized, {"seconds": round(wall, 3), "peak_rss_gib": memory.peak(started, started + wall),
                       "stages": stages}


def _tflite_int8(model, images):
    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec((1,) + images.shape[1:], tf.float32))
    started = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([images[i : i + 1]] for i in range(len(images)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    flatbuffer = converter.convert()
    return flatbuffer, round(time.perf_counter() - started, 3)


def _tflite_hits(flatbuffer, x, y):
    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
    hits = []
    for image, label in zip(x, y):
        interpreter.set_tensor(entry["index"], image[None])
        interpreter.invoke()
        hits.append(int(np.argmax(interpreter.get_tensor(exit_["index"])[0])) == label)
    return np.asarray(hits)


def _measure(name, model, calibration, test, bit_widths):
    result = {"model": name, "params": int(model.count_params()), "calibration_images": len(calibration),
              "load_average_before": common.load_average(), "conversions": []}
    if test is not None:
        result["test_images"] = len(test[0])
        result["float_top1"] = float(np.mean(common.top1_hits(model, *test, batch_size=64)))
    for wbits, abits in bit_widths:
        entry = {"bits": common.bits_label(wbits, abits)}
        for mode, options in (("data_free", {}), ("calibrated", {"calibration_data": calibration})):
            quantized, entry[mode] = _timed_convert(model, wbits, abits, **options)
            if test is not None:
                entry[mode]["top1"] = float(np.mean(common.top1_hits(quantized, *test, batch_size=64)))
        entry["ratio"] = round(entry["calibrated"]["seconds"] / entry["data_free"]["seconds"], 2)
        result["conversions"].append(entry)
    try:
        flatbuffer, seconds = _tflite_int8(model, calibration)
        result["tflite_int8"] = {"seconds": seconds}
        if test is not None:
            result["tflite_int8"]["top1"] = float(np.mean(_tflite_hits(flatbuffer, *test)))
    except Exception as exc:  # noqa: BLE001 - recorded: why TFLite could not convert
        result["tflite_int8"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    result["load_average_after"] = common.load_average()
    return result


def run(quick=False):
    results = {"machine": common.machine_description(), "models": []}
    x, y = imagenet()
    model = kpq.load_model(common.shared_file("imagenet/efficientnet_lite2_imagenet.h5"))
    calibration, test = x[:CALIBRATION_IMAGES], (x[CALIBRATION_IMAGES:], y[CALIBRATION_IMAGES:])
    bit_widths = [(8, 8)] if quick else [(8, 8), (4, 8)]
    results["models"].append(_measure("EfficientNet-Lite2", model, calibration, test, bit_widths))
    if not quick:
        keras.backend.clear_session()
        model = common.load_benchmark_model("resnet50")
        calibration = common.random_inputs("resnet50", model, CALIBRATION_IMAGES)
        results["models"].append(_measure("ResNet50 (weights=None)", model, calibration, None, [(8, 8)]))
    return results


def markdown(result):
    rows = []
    for entry in result["models"]:
        tflite = entry["tflite_int8"]
        for conversion in entry["conversions"]:
            free, calibrated = conversion["data_free"], conversion["calibrated"]
            slowest = max(calibrated["stages"].items(), key=lambda item: item[1]["seconds"])
            rows.append([
                entry["model"], conversion["bits"], f"{free['seconds']:.1f}", f"{calibrated['seconds']:.1f}",
                f"{conversion['ratio']:.1f}x", f"{tflite.get('seconds', float('nan')):.1f}",
                f"{slowest[0]} {slowest[1]['seconds']:.1f} s", f"{calibrated['peak_rss_gib']:.2f}",
                " / ".join(f"{100 * v:.2f}" for v in (
                    entry.get("float_top1"), free.get("top1"), calibrated.get("top1"), tflite.get("top1"))
                    if v is not None) or "-",
            ])
    table = common.markdown_table(
        ["model", "bits", "data-free s", f"{CALIBRATION_IMAGES} images s", "ratio", "TFLite int8 s",
         "slowest stage", "peak RSS GiB", "top-1 % float / data-free / calibrated / TFLite"], rows)
    loads = " and ".join(
        f"{entry['model']} {' / '.join(str(v) for v in entry['load_average_before'])} before, "
        f"{' / '.join(str(v) for v in entry['load_average_after'])} after" for entry in result["models"])
    machine = result["machine"]
    return (
        "## Calibrated conversion time (256 images, CPU)\n\n"
        "Command: `python benchmarks/calibration_time.py --json benchmarks/calibration_time.json`. "
        f"`kpq.convert` data-free, then with {CALIBRATION_IMAGES} calibration images (empirical bias correction, "
        "the default), and TensorFlow Lite's full-int8 converter on the same images, in one process: "
        f"{machine['cores']} cores, commit {machine['git_commit']}, {machine['date']}; load average (1/5/15 min) "
        f"{loads}. EfficientNet-Lite2: calibrated on the first {CALIBRATION_IMAGES} of the 650 ImageNet "
        "validation images, top-1 on the other 394 (paired); ResNet50: weights=None, random inputs, time only. "
        "Peak RSS is the process's (TensorFlow keeps what it allocated earlier: a ceiling, not the "
        "stage's own use).\n\n" + table
    )


if __name__ == "__main__":
    common.main(__import__(__name__))

"""Synthetic calibration data: accuracy against BatchNorm statistics and real images, and its cost.

What is measured:

1. Accuracy. The MLPerf Tiny ResNet-8 (raw 0-255 pixels) converted at
   W8/A8, W4/A8 and W4/A4, `method="uniform"` (a = 1) and PowerQuant, with
   three sources of activation statistics: BatchNorm statistics (the
   data-free mode), synthetic inputs (`kpq.synthesize_inputs`, the default
   set and `input_range=(0, 255)`), and the first 512 images of
   `train_4660.npz`. Top-1 on the first 932 CIFAR-10 test images, every
   model on the same images; paired differences and McNemar's exact test
   (benchmarks/accuracy.py's `paired_comparison`). Models are evaluated in
   memory (Keras), not through a SavedModel.
2. Samples and steps. The same at W8/A8 and W4/A4 for several numbers of
   synthetic samples and Adam steps, with and without `input_range`: the
   default set is chosen on these rows.
3. Cost. Wall time of the default set on a ResNet-20-size CIFAR model
   (the CIFAR ResNet-20 of He et al.: 0.27M parameters, 19 BatchNorms;
   random weights, BatchNorm moving statistics set from 256 training
   images: optimisation cost does not depend on the weights' values) and
   on the ResNet-8; the rate (image-steps per second) on keras.applications
   MobileNetV2 at 224x224 (weights=None). Time to the first step (tracing
   and start) and per step are recorded apart.
"""

import sys
import time

import accuracy
import common
import keras
import numpy as np

import keras_powerquant as kpq
from keras_powerquant.synthesis import DEFAULT_NUM_SAMPLES
from keras_powerquant.synthesis import DEFAULT_STEPS
from keras_powerquant.synthesis import synthesize

BIT_CONFIGS = [(8, 8), (4, 8), (4, 4)]
METHODS = ("uniform", "powerquant")
REAL_IMAGES = 512
PIXEL_RANGE = (0.0, 255.0)
# (samples, steps, input_range) rows of the sweep.
SWEEP = [
    (64, 0, PIXEL_RANGE),
    (16, 50, PIXEL_RANGE),
    (32, 50, PIXEL_RANGE),
    (64, 100, PIXEL_RANGE),
    (32, 50, None),
    (64, 100, None),
]
QUICK_SWEEP = [(16, 10, PIXEL_RANGE)]
SWEEP_BITS = [(8, 8), (4, 4)]
BATCH_SIZE = 256


def _predictions(model, x):
    structure = model._inputs_struct  # a list for legacy .h5 models, a tensor otherwise
    return np.concatenate([
        np.asarray(model(keras.tree.pack_sequence_as(structure, [x[i : i + BATCH_SIZE]]), training=False)).argmax(1)
        for i in range(0, len(x), BATCH_SIZE)
    ])


def _timed_synthesis(model, **options):
    stamps = []
    started, cpu_started = time.perf_counter(), time.process_time()
    result = synthesize(model, progress=lambda *_: stamps.append(time.perf_counter()), **options)
    total = time.perf_counter() - started
    steps = len(stamps)
    return result, {
        "seconds": total,
        # CPU seconds of this process: on a shared machine, the work itself (wall time on an
        # idle 2-core machine is at least half of it).
        "cpu_seconds": time.process_time() - cpu_started,
        "seconds_to_first_step": (stamps[0] - started) if stamps else total,
        "seconds_per_step": (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else None,
        "samples": len(result.inputs[0]),
        "steps": result.steps,
        "batchnorm_loss": result.batchnorm_loss,
        "class_loss": result.class_loss,
    }


def _resnet20(seed=0):
    """CIFAR ResNet-20 (3 stages of 3 basic blocks, 16/32/64 filters), softmax head."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers

    def conv_bn(x, filters, strides=1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        return layers.BatchNormalization()(x)

    inputs = keras.Input((32, 32, 3))
    x = layers.ReLU()(conv_bn(layers.Rescaling(1 / 255)(inputs), 16))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage and block == 0 else 1
            y = layers.ReLU()(conv_bn(x, filters, strides))
            y = conv_bn(y, filters)
            if strides != 1:
                x = layers.BatchNormalization()(layers.Conv2D(filters, 1, strides=2, use_bias=False)(x))
            x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="resnet20")


def _set_batch_norm_statistics(model, x):
    """Moving statistics := the batch statistics of each BatchNorm's input on `x`."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(x, training=True)
    for layer in norms:
        layer.momentum = 0.99


def _accuracy_table(model, x, y, calibrations):
    """Top-1 per (bits, method, calibration) and paired comparisons; returns (rows, pairs)."""
    rows, hits = [], {}
    for wbits, abits in BIT_CONFIGS:
        for method in METHODS:
            for name, data in calibrations.items():
                quantized, _ = kpq.convert(model, wbits, abits, method, calibration_data=data)
                label = f"{common.bits_label(wbits, abits)} {method} {name}"
                hits[label] = _predictions(quantized, x) == y
                rows.append({"bits": common.bits_label(wbits, abits), "method": method, "calibration": name,
                             "top1": float(hits[label].mean())})
    pairs = []
    for wbits, abits in BIT_CONFIGS:
        for method in METHODS:
            prefix = f"{common.bits_label(wbits, abits)} {method}"
            for a, b in (("synthetic", "real"), ("synthetic", "bn-statistics"), ("real", "bn-statistics")):
                pairs.append({"bits": common.bits_label(wbits, abits), "method": method, "a": a, "b": b,
                              **accuracy.paired_comparison(hits[f"{prefix} {a}"], hits[f"{prefix} {b}"])})
        for name in calibrations:
            pairs.append({"bits": common.bits_label(wbits, abits), "method": "powerquant vs uniform",
                          "a": name, "b": name,
                          **accuracy.paired_comparison(
                              hits[f"{common.bits_label(wbits, abits)} powerquant {name}"],
                              hits[f"{common.bits_label(wbits, abits)} uniform {name}"])})
    return rows, pairs


def _sweep(model, x, y, configs):
    rows = []
    for samples, steps, input_range in configs:
        result, timing = _timed_synthesis(model, num_samples=samples, steps=steps, input_range=input_range)
        row = {"samples": samples, "steps": steps, "input_range": input_range, **timing,
               "input_mean": float(result.inputs[0].mean()), "input_std": float(result.inputs[0].std())}
        for wbits, abits in SWEEP_BITS:
            for method in METHODS:
                quantized, _ = kpq.convert(model, wbits, abits, method, calibration_data=result.inputs[0])
                row[f"{common.bits_label(wbits, abits)} {method}"] = float(np.mean(_predictions(quantized, x) == y))
        rows.append(row)
        print(f"  sweep {samples} samples, {steps} steps, range {input_range}: {timing['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    return rows


def _timings(quick):
    timings = []
    resnet20 = _resnet20()
    _set_batch_norm_statistics(resnet20, common.cifar_calibration(256))
    resnet8 = common.load_benchmark_model("resnet8")
    for name, model, options in (
        ("ResNet-20 (CIFAR, 0.27M parameters)", resnet20, {}),
        ("ResNet-8 (MLPerf Tiny)", resnet8, {"input_range": PIXEL_RANGE}),
    ):
        steps = 10 if quick else DEFAULT_STEPS
        _, timing = _timed_synthesis(model, num_samples=DEFAULT_NUM_SAMPLES, steps=steps, **options)
        timings.append({"model": name, "load_average": common.load_average(), **timing})
    mobilenet = common.load_benchmark_model("mobilenetv2")
    samples, steps = (4, 3) if quick else (16, 10)
    _, timing = _timed_synthesis(mobilenet, num_samples=samples, steps=steps, input_range=(-1.0, 1.0))
    timings.append({"model": "MobileNetV2 224x224 (weights=None)", "load_average": common.load_average(), **timing})
    for timing in timings:
        timing["image_steps_per_second"] = (
            timing["samples"] / timing["seconds_per_step"] if timing["seconds_per_step"] else None
        )
    return timings


def run(quick=False):
    try:
        model = common.load_benchmark_model("resnet8")
        x, y = common.cifar_test()
        real = common.cifar_calibration(REAL_IMAGES)
    except common.Skip as skip:
        return {"skipped": str(skip)}
    synthetic, generation = _timed_synthesis(model, num_samples=DEFAULT_NUM_SAMPLES, steps=DEFAULT_STEPS,
                                             input_range=PIXEL_RANGE)
    calibrations = {"bn-statistics": None, "synthetic": synthetic.inputs[0], "real": real}
    float_top1 = float(np.mean(_predictions(model, x) == y))
    rows, pairs = _accuracy_table(model, x, y, calibrations)
    return {
        "machine": common.machine_description(),
        "command": "python benchmarks/synthetic_calibration.py" + (" --quick" if quick else ""),
        "model": common.MODELS["resnet8"][0],
        "test_data": f"{common.CIFAR_TEST_FILE} (raw 0-255 float32)",
        "real_calibration": f"first {REAL_IMAGES} images of {common.CIFAR_TRAIN_FILE}",
        "synthetic_calibration": {"samples": DEFAULT_NUM_SAMPLES, "steps": DEFAULT_STEPS, "seed": 0,
                                  "input_range": PIXEL_RANGE, **generation},
        "images": int(len(y)),
        "quick": quick,
        "float_top1": float_top1,
        "results": rows,
        "pairs": pairs,
        "sweep": _sweep(model, x, y, QUICK_SWEEP if quick else SWEEP),
        "timings": _timings(quick),
    }


def plot(result, folder):
    return []


def _pct(value):
    return f"{100 * value:.2f}"


def markdown(result):
    lines = ["## Synthetic calibration data (ResNet-8, CIFAR-10)", ""]
    if "skipped" in result:
        return "\n".join(lines + [f"Skipped: {result['skipped']}."])
    synthetic = result["synthetic_calibration"]
    lines += [
        f"{result['model']} on {result['test_data']}, n = {result['images']} images, the same for every "
        f"row; float top-1 {_pct(result['float_top1'])}%. Activation statistics from BatchNorm statistics "
        f"(data-free), from {synthetic['samples']} synthetic inputs ({synthetic['steps']} Adam steps, seed 0, "
        f"`input_range=(0, 255)`; generated in {synthetic['seconds']:.1f} s) or from the "
        f"{result['real_calibration']}. First and last layers at 8 bits; models evaluated in memory.",
        "",
    ]
    table = {}
    for row in result["results"]:
        table.setdefault((row["bits"], row["method"]), {})[row["calibration"]] = row["top1"]
    rows = [[bits, method, _pct(c["bn-statistics"]), _pct(c["synthetic"]), _pct(c["real"])]
            for (bits, method), c in table.items()]
    lines += [common.markdown_table(["bits", "method", "BN statistics", "synthetic", "512 real"], rows), ""]
    lines += [
        "Paired on the same images: images right only with `a` / only with `b`, the difference of "
        "top-1 (a - b) ± its paired standard error, McNemar's exact p.",
        "",
    ]
    rows = [[p["bits"], p["method"], f"{p['a']} vs {p['b']}", p["right_only_a"], p["right_only_b"],
             f"{100 * p['difference']:+.2f} ± {100 * p['stderr']:.2f}", f"{p['mcnemar_p']:.3g}"]
            for p in result["pairs"]]
    lines += [common.markdown_table(["bits", "method", "a vs b", "a only", "b only", "Δ top-1", "p"], rows), ""]
    lines += [
        "Samples and steps (same test images; top-1 %; `input_range` None = unbounded inputs started "
        "from the first BatchNorm's statistics). Seconds include tracing.",
        "",
    ]
    header = ["samples", "steps", "input_range", "seconds", "BN loss"] + [
        f"{common.bits_label(w, a)} {m}" for w, a in SWEEP_BITS for m in METHODS
    ]
    rows = [
        [r["samples"], r["steps"], "None" if r["input_range"] is None else f"({r['input_range'][0]:g}, "
         f"{r['input_range'][1]:g})", f"{r['seconds']:.1f}", f"{r['batchnorm_loss']:.3g}"]
        + [_pct(r[f"{common.bits_label(w, a)} {m}"]) for w, a in SWEEP_BITS for m in METHODS]
        for r in result["sweep"]
    ]
    lines += [common.markdown_table(header, rows), ""]
    lines += ["Generation cost on this machine (2 cores, shared with other jobs: load average given).", ""]
    rows = [
        [t["model"], t["samples"], t["steps"], f"{t['seconds']:.1f}", f"{t['cpu_seconds']:.1f}",
         f"{t['seconds_to_first_step']:.1f}",
         f"{1e3 * t['seconds_per_step']:.0f}" if t["seconds_per_step"] else "-",
         f"{t['image_steps_per_second']:.1f}" if t["image_steps_per_second"] else "-",
         " / ".join(str(v) for v in t["load_average"])]
        for t in result["timings"]
    ]
    lines.append(common.markdown_table(
        ["model", "samples", "steps", "wall s", "CPU s", "to first step s", "ms / step", "image-steps / s",
         "load"], rows
    ))
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

"""Accuracy on the demo model: default vs continuous activation exponents vs uniform, paired.

What is measured: the demo CNN of `make demo` (`keras_powerquant.demo.
prepare_demo`, seed 0, its default sizes; cached in `build/demo`, the
folder `make demo` uses), on its 2,000 held-out generated images, as float
and converted at W4/A4 and W8/A8, calibrated on the demo's 256
calibration images (as `make demo` does) and data-free, with `uniform`,
the default `powerquant` (activation exponents among 1, 1/2, 1/4) and
`powerquant-continuous` (exponents anywhere in [0.1, 2], the default
before 0.2). Models are evaluated in memory (the ResNet-8 benchmark checks
that SavedModels agree with them). Pairs, on the same images: the default
against the continuous exponents and each against uniform (McNemar counts,
paired difference ± standard error, exact p-value).
"""

import os
import sys

import accuracy
import common
import numpy as np

from keras_powerquant import demo

DEMO_DIR = os.path.join(common.REPO_ROOT, "build", "demo")
BIT_CONFIGS = [(8, 8), (4, 4)]
CALIBRATIONS = ("calibrated", "data-free")


def run(quick=False):
    """Converts and evaluates the demo model; returns the raw numbers."""
    paths = demo.prepare_demo(DEMO_DIR, verbose=False)
    model = common.kpq.load_model(paths["model"])
    test = np.load(paths["test"])
    x, y = test["x"].astype(np.float32), test["y"]
    calibration = np.load(paths["calibration"]).astype(np.float32)
    hits = {"float": common.top1_hits(model, x, y)}
    results = [{"name": "float", "top1": float(hits["float"].mean())}]
    for wbits, abits in BIT_CONFIGS[-1:] if quick else BIT_CONFIGS:
        for calibration_name in CALIBRATIONS:
            data = calibration if calibration_name == "calibrated" else None
            for variant in common.VARIANTS:
                quantized, _ = common.convert_variant(model, wbits, abits, variant, calibration_data=data)
                name = f"{common.bits_label(wbits, abits)} {variant} {calibration_name}"
                hits[name] = common.top1_hits(quantized, x, y)
                results.append({"name": name, "top1": float(hits[name].mean())})
    comparisons = []
    for wbits, abits in BIT_CONFIGS[-1:] if quick else BIT_CONFIGS:
        for calibration_name in CALIBRATIONS:
            prefix, suffix = common.bits_label(wbits, abits), calibration_name
            for a, b in (("powerquant", "powerquant-continuous"), ("powerquant", "uniform"),
                         ("powerquant-continuous", "uniform")):
                a_name, b_name = f"{prefix} {a} {suffix}", f"{prefix} {b} {suffix}"
                comparisons.append({"a": a_name, "b": b_name, **accuracy.paired_comparison(hits[a_name], hits[b_name])})
    return {
        "model": "demo CNN of `make demo` (keras_powerquant.demo, seed 0)",
        "images": int(len(y)),
        "calibration_images": int(len(calibration)),
        "quick": quick,
        "results": results,
        "comparisons": comparisons,
    }


def plot(result, folder):
    return []


def markdown(result):
    lines = [
        "## Accuracy (demo model)",
        "",
        f"{result['model']}, {result['images']} held-out generated images, the same for every row; "
        f"calibration on its {result['calibration_images']} calibration images. In-memory Keras models.",
        "",
        common.markdown_table(["model", "top-1 %"], [[r["name"], f"{r['top1'] * 100:.2f}"] for r in result["results"]]),
        "",
        "Paired on the same images:",
        "",
    ]
    rows = [
        [c["a"], c["b"], c["right_only_a"], c["right_only_b"],
         f"{c['difference'] * 100:+.2f} ± {c['stderr'] * 100:.2f}", f"{c['mcnemar_p']:.3g}"]
        for c in result["comparisons"]
    ]
    lines.append(common.markdown_table(["a", "b", "a only", "b only", "Δ top-1 (a - b, points)", "McNemar p"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

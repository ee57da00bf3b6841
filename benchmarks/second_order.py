"""`refine=True` with second-order rounding: accuracy against learned rounding and no refinement, and its time.

What is measured (first and last layers at 8 bits, the defaults; 2 CPU cores):

- ResNet-8 (MLPerf Tiny, CIFAR-10) W4/A4, `method="uniform"` and
  `"powerquant"`: no refinement; `refine=True` (grid, granularity, LAPQ,
  then `gptq`); the same with learned rounding (`rounding`, 200 steps per
  layer) in place of `gptq`; and `gptq` alone. Calibrated on the first 512
  images of `train_4660.npz` (refinement on a 320-image subsample: 256
  fit, 64 held out), tested paired on the 932 test images (McNemar's exact
  test against no refinement, the paired difference and its standard error).
- EfficientNet-Lite2 (ImageNet, shared weights), W4/A8 and W4/A4: the 650
  labelled validation images split by position, the first
  `EFFICIENTNET_CALIBRATION` for calibration, the other 394 for testing
  (paired); no refinement and `refine=True`, with the time of each stage
  and step.
- EfficientNet-Lite2 W4/A8 PowerQuant from synthetic inputs alone
  (`calibration_data="synthetic"`), without refinement and with
  `refine=True`: top-1 on all 650 images against float, paired, and the
  time of each stage.
- ResNet-50 (`keras.applications`, weights=None, seeded) W4/A4 on 256
  random images: the time of `refine=True`, per stage and step.

`python benchmarks/second_order.py [--quick] [--json benchmarks/second_order.json]`
(`--quick`: ResNet-8 only). `KPQ_BENCHMARK_PARTS=resnet8,efficientnet,resnet50`
picks parts (also `efficientnet_synthetic`, and `efficientnet_powerquant_w4a8`: the
`efficientnet` part's PowerQuant W4/A8 rows alone).
"""

import gc
import os
import pathlib
import sys
import time

import calibration_time
import common
import numpy as np
from scipy import stats

import keras_powerquant as kpq

SEARCH = ["grid", "granularity", "lapq"]
RESNET8_ROWS = (
    ("no refinement", False),
    ("refine=True (grid, granularity, LAPQ, gptq)", True),
    ("grid, granularity, LAPQ, learned rounding", SEARCH + ["rounding"]),
    ("gptq alone", ["gptq"]),
)
METHODS = ("uniform", "powerquant")
EFFICIENTNET_FILE = "imagenet/efficientnet_lite2_imagenet.h5"
EFFICIENTNET_CALIBRATION = 256
RESNET50_IMAGES = 256


def _paired(a, b):
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    d = a.astype(float) - b.astype(float)
    discordant = only_a + only_b
    return {
        "difference": (only_a - only_b) / len(a),
        "stderr": float(np.std(d, ddof=1) / np.sqrt(len(a))),
        "mcnemar_p": float(stats.binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0,
    }


def _steps(report):
    keys = ("name", "loss_before", "loss_after", "holdout_loss_before", "holdout_loss_after", "kept", "seconds",
            "evaluations")
    return [{**{k: step[k] for k in keys}, "notes": step["notes"]} for step in report.refinement]


def _accuracy_rows(name, model, x, y, calibration, rows, configurations, methods=METHODS):
    float_hits = common.top1_hits(model, x, y)
    results, hits = [], {}
    for bits in configurations:
        for method in methods:
            for label, refine in rows:
                # The last conversion's model and graphs go before the next starts: ImageNet-size ones take GBs.
                quantized = report = None
                gc.collect()
                started = time.perf_counter()
                quantized, report = kpq.convert(model, bits[0], bits[1], method, calibration_data=calibration,
                                                refine=refine)
                seconds = time.perf_counter() - started
                correct = common.top1_hits(quantized, x, y)
                hits[(bits, method, label)] = correct
                row = {
                    "model": name, "bits": common.bits_label(*bits), "method": method, "refine": label,
                    "top1": float(correct.mean()), "vs_float": float(correct.mean() - float_hits.mean()),
                    "convert_seconds": seconds, "stage_seconds": report.seconds, "steps": _steps(report),
                }
                if label != rows[0][0]:
                    row["vs_no_refinement"] = _paired(correct, hits[(bits, method, rows[0][0])])
                results.append(row)
                print(f"{name} {row['bits']} {method} {label}: {row['top1'] * 100:.2f}% ({seconds:.0f} s)",
                      file=sys.stderr, flush=True)
    return {"model": name, "float_top1": float(float_hits.mean()), "images": int(len(y)), "rows": results}


def _resnet8():
    model = common.load_benchmark_model("resnet8")
    x, y = common.cifar_test()
    return _accuracy_rows("ResNet-8", model, x, y, common.cifar_calibration(512), RESNET8_ROWS, [(4, 4)])


def _efficientnet():
    model = kpq.load_model(common.shared_file(EFFICIENTNET_FILE))
    x, y = calibration_time.imagenet()
    n = EFFICIENTNET_CALIBRATION
    rows = (("no refinement", False), ("refine=True (grid, granularity, LAPQ, gptq)", True))
    result = _accuracy_rows("EfficientNet-Lite2", model, x[n:], y[n:], x[:n], rows, [(4, 8), (4, 4)])
    result["calibration_images"] = n
    return result


def _efficientnet_powerquant_w4a8():
    """The `efficientnet` part's PowerQuant W4/A8 rows alone: a quicker check of refinement's time and top-1."""
    model = kpq.load_model(common.shared_file(EFFICIENTNET_FILE))
    x, y = calibration_time.imagenet()
    n = EFFICIENTNET_CALIBRATION
    rows = (("no refinement", False), ("refine=True (grid, granularity, LAPQ, gptq)", True))
    result = _accuracy_rows("EfficientNet-Lite2", model, x[n:], y[n:], x[:n], rows, [(4, 8)], ("powerquant",))
    result["calibration_images"] = n
    return result


def _efficientnet_synthetic():
    """W4/A8 PowerQuant from synthetic inputs alone (issue 20): no real image calibrates, all 650 test.

    Without refinement and with `refine=True`, each generating its own (the same, seeded) synthetic inputs.
    """
    model = kpq.load_model(common.shared_file(EFFICIENTNET_FILE))
    x, y = calibration_time.imagenet()
    float_hits = common.top1_hits(model, x, y)
    rows, hits = [], {}
    for label, refine in (("no refinement", False), ("refine=True (grid, granularity, LAPQ, gptq)", True)):
        quantized = report = None
        gc.collect()
        started = time.perf_counter()
        quantized, report = kpq.convert(model, 4, 8, calibration_data="synthetic", refine=refine)
        seconds = time.perf_counter() - started
        hits[label] = common.top1_hits(quantized, x, y)
        row = {
            "refine": label,
            "bias_correction": report.options["bias_correction"],
            "top1": float(hits[label].mean()),
            "vs_float": _paired(hits[label], float_hits),
            "convert_seconds": seconds,
            "stage_seconds": report.seconds,
            "steps": _steps(report),
        }
        if refine:
            row["vs_no_refinement"] = _paired(hits[label], hits["no refinement"])
        rows.append(row)
        print(f"EfficientNet-Lite2 W4/A8 synthetic {label}: {row['top1'] * 100:.2f}% ({seconds:.0f} s)",
              file=sys.stderr, flush=True)
    return {
        "model": "EfficientNet-Lite2",
        "bits": "W4/A8",
        "method": "powerquant",
        "calibration": "synthetic (keras_powerquant.synthesis defaults)",
        "images": int(len(y)),
        "float_top1": float(float_hits.mean()),
        "rows": rows,
    }


def _resnet50():
    model = common.load_benchmark_model("resnet50")
    images = common.random_inputs("resnet50", model, RESNET50_IMAGES)
    started = time.perf_counter()
    _, report = kpq.convert(model, 4, 4, calibration_data=images, refine=True)
    total = time.perf_counter() - started
    return {
        "model": common.MODELS["resnet50"][0],
        "images": RESNET50_IMAGES,
        "convert_seconds": total,
        "stage_seconds": report.seconds,
        "steps": _steps(report),
        "notes": {step["name"]: step["notes"] for step in report.refinement},
    }


PARTS = {
    "resnet8": _resnet8,
    "efficientnet": _efficientnet,
    "efficientnet_powerquant_w4a8": _efficientnet_powerquant_w4a8,
    "efficientnet_synthetic": _efficientnet_synthetic,
    "resnet50": _resnet50,
}


def run(quick=False):
    names = os.environ.get("KPQ_BENCHMARK_PARTS", "resnet8" if quick else ",".join(PARTS)).split(",")
    result = {"machine": common.machine_description(), "parts": {}}
    for name in names:
        try:
            result["parts"][name] = PARTS[name]()
        except common.Skip as skip:
            result["parts"][name] = {"skipped": str(skip)}
    return result


def _pair(row):
    pair = row.get("vs_no_refinement")
    if pair is None:
        return "-"
    return f"{pair['difference'] * 100:+.2f} ± {pair['stderr'] * 100:.2f} (p = {pair['mcnemar_p']:.2g})"


def markdown(result):
    lines = ["## Second-order rounding (GPTQ) against learned rounding", ""]
    for name, part in result["parts"].items():
        if "skipped" in part:
            lines += [f"{name}: skipped ({part['skipped']})", ""]
            continue
        if name == "efficientnet_synthetic":
            lines += [
                f"### {part['model']} {part['bits']} from synthetic inputs, {part['images']} images, "
                f"float {part['float_top1'] * 100:.2f}%",
                "",
            ]
            for row in part["rows"]:
                pair = row["vs_float"]
                lines += [
                    f"- {row['refine']} (bias correction {row['bias_correction']}): {row['top1'] * 100:.2f}% "
                    f"({pair['difference'] * 100:+.2f} ± {pair['stderr'] * 100:.2f} vs float, "
                    f"p = {pair['mcnemar_p']:.2g}); `convert` {row['convert_seconds']:.0f} s. Stages: "
                    + ", ".join(f"{k} {v:.0f} s" for k, v in row["stage_seconds"].items()) + ".",
                ]
            lines.append("")
            continue
        if name == "resnet50":
            steps = ", ".join(f"{step['name']} {step['seconds']:.0f} s ({step['evaluations']} evaluations)"
                              for step in part["steps"])
            lines += [
                f"### {part['model']}: `refine=True` W4/A4 on {part['images']} random images",
                "",
                f"`convert` {part['convert_seconds']:.0f} s. Stages: "
                + ", ".join(f"{k} {v:.0f} s" for k, v in part["stage_seconds"].items()) + f". Steps: {steps}.",
                "",
            ]
            continue
        lines += [f"### {part['model']}: float {part['float_top1'] * 100:.2f}%, {part['images']} test images", ""]
        table = [
            [row["bits"], row["method"], row["refine"], f"{row['top1'] * 100:.2f}", f"{row['vs_float'] * 100:+.2f}",
             _pair(row), f"{row['convert_seconds']:.0f}"]
            for row in part["rows"]
        ]
        lines.append(common.markdown_table(
            ["bits", "method", "refinement", "top-1 %", "vs float", "vs no refinement (paired)", "convert s"], table))
        lines.append("")
    return "\n".join(lines)


def plot(result, folder):
    return []


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    common.main(sys.modules[__name__])

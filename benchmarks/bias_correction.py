"""Empirical bias correction, before and after it measures output means exactly (issue 22).

Conversion's empirical bias correction subtracts from each quantized layer's
bias the mean shift of its outputs, `E[W_hat x_hat] - E[W x]`, on the
calibration samples. It used to compute that shift from per-channel input
means and a model of zero padding (`tap_coverage`: every position of a
channel has the same mean), which is approximate near borders; it now
measures the output means themselves (the linear layer run on the per-position
mean input, exact by linearity), as refinement always did. This benchmark
runs the current code; `--label` names the run, and the JSON keeps every run
so that the two can be compared image by image.

Models, calibrated conversions (defaults otherwise: empirical correction):
- MLPerf Tiny ResNet-8, calibration on the first 512 CIFAR-10 training
  images, top-1 on the first 932 test images;
- EfficientNet-Lite2 (shared/data/imagenet), calibration on the first 256
  of the 650 validation images, top-1 on the other 394.
PowerQuant and uniform (a = 1), same pipeline.

`python benchmarks/bias_correction.py --label NAME --json benchmarks/bias_correction.json [--quick]`
(`--quick`: ResNet-8 only.)
"""

import argparse
import json
import os
import subprocess

import calibration_time
import common
from common import keras
from common import np

BIT_WIDTHS = {"ResNet-8": [(8, 8), (4, 8), (4, 4)], "EfficientNet-Lite2": [(8, 8), (4, 8)]}


def _hits_string(hits):
    return "".join("1" if hit else "0" for hit in hits)


def _measure(name, model, calibration, test):
    result = {"test_images": len(test[0]), "calibration_images": len(calibration)}
    result["float"] = _hits_string(common.top1_hits(model, *test, batch_size=64))
    for wbits, abits in BIT_WIDTHS[name]:
        for method in ("powerquant", "uniform"):
            quantized, report = common.kpq.convert(model, wbits, abits, method=method, calibration_data=calibration)
            key = f"{common.bits_label(wbits, abits)} {method}"
            result[key] = _hits_string(common.top1_hits(quantized, *test, batch_size=64))
            result[key + " seconds"] = round(report.seconds["bias_correction"], 2)
            keras.backend.clear_session()
    return result


def run(quick=False):
    results = {"ResNet-8": None, "EfficientNet-Lite2": None}
    model = common.load_benchmark_model("resnet8")
    x, y = common.cifar_test()
    results["ResNet-8"] = _measure("ResNet-8", model, common.cifar_calibration(512), (x, y))
    if not quick:
        x, y = calibration_time.imagenet()
        model = common.kpq.load_model(common.shared_file("imagenet/efficientnet_lite2_imagenet.h5"))
        calibration = x[: calibration_time.CALIBRATION_IMAGES]
        test = (x[calibration_time.CALIBRATION_IMAGES :], y[calibration_time.CALIBRATION_IMAGES :])
        results["EfficientNet-Lite2"] = _measure("EfficientNet-Lite2", model, calibration, test)
    return {name: result for name, result in results.items() if result is not None}


def _top1(hits):
    return 100.0 * np.mean([c == "1" for c in hits])


def _paired(before, after):
    """Mean difference in points and its standard error, and the discordant counts."""
    a = np.array([c == "1" for c in before], dtype=float)
    b = np.array([c == "1" for c in after], dtype=float)
    diff = b - a
    error = 100.0 * diff.std(ddof=1) / np.sqrt(diff.size)
    return 100.0 * diff.mean(), error, int((diff > 0).sum()), int((diff < 0).sum())


def markdown(runs, before, after):
    lines = [
        f"Top-1 %, calibrated, empirical bias correction: run `{before}` against run `{after}`, same images "
        "(difference ± standard error; +n/-n: images only the second / only the first gets right).",
        "",
        "| model, bits, method | float | before | after | difference | +n / -n |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in runs[after]["models"].items():
        previous = runs[before]["models"].get(name)
        if previous is None:
            continue
        for key, hits in result.items():
            if key in ("float", "test_images", "calibration_images") or key.endswith("seconds"):
                continue
            difference, error, gained, lost = _paired(previous[key], hits)
            lines.append(
                f"| {name} (n = {result['test_images']}), {key} | {_top1(result['float']):.2f} | "
                f"{_top1(previous[key]):.2f} | {_top1(hits):.2f} | {difference:+.2f} ± {error:.2f} | "
                f"+{gained} / -{lost} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run in the JSON file")
    parser.add_argument("--json", required=True, help="results file (runs are added to it)")
    parser.add_argument("--quick", action="store_true", help="ResNet-8 only")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print the comparison only")
    args = parser.parse_args()
    runs = {}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as file:
            runs = json.load(file)
    if not args.compare:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        runs[args.label] = {"machine": common.machine_description(), "commit": commit, "models": run(args.quick)}
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(runs, file, indent=1)
    if args.compare:
        print(markdown(runs, *args.compare))


if __name__ == "__main__":
    main()

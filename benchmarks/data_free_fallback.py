"""The data-free fallback (issue 20 item 2): which quantizers fall back, its time, its accuracy.

For each model, W8/A8 data-free conversion without the fallback and with
`data_free_fallback=STEPS` (quantizers whose statistics are missing or more
than STEPS linear layers and merges from a normalization are fitted on the
short synthetic run, `pipeline.statistics.FALLBACK_SYNTHESIS`): conversion
seconds, the quantizers that fell back and their rules, and for the shared
EfficientNet-Lite2 top-1 and agreement with the float model on the 650
shared ImageNet images (paired: the same images for every row; the
discordant counts compare each method's two rows image by image).
ResNet-50 has random weights (weights=None): time only.

`python benchmarks/data_free_fallback.py [--steps 2] [--json benchmarks/data_free_fallback.json]`
"""

import argparse
import json
import time

import common
import keras
import numpy as np

import keras_powerquant as kpq


def _convert(model, fallback, method):
    started = time.perf_counter()
    quantized, report = kpq.convert(model, 8, 8, method, data_free_fallback=fallback)
    seconds = time.perf_counter() - started
    fell_back = {a.name: a.rule for a in report.activations if a.rule and a.rule.startswith("synthetic")}
    notes = [note for note in report.notes if "fallback" in note or "synthetic inputs" in note]
    return quantized, {"method": method, "data_free_fallback": fallback, "convert_seconds": round(seconds, 1),
                       "fell_back": fell_back, "notes": notes}


def efficientnet_rows(steps):
    from calibration_time import imagenet

    x, y = imagenet()
    model = kpq.load_model(common.shared_file("imagenet/efficientnet_lite2_imagenet.h5"))
    float_pred = np.argmax(model.predict(x, batch_size=64, verbose=0), -1)
    rows = []
    for method in ("powerquant", "uniform"):
        correct = {}
        for fallback in (None, steps):
            quantized, row = _convert(model, fallback, method)
            pred = np.argmax(quantized.predict(x, batch_size=64, verbose=0), -1)
            correct[fallback] = pred == y
            row.update(model="efficientnet_lite2", images=len(y), float_top1=float(np.mean(float_pred == y) * 100),
                       top1=float(np.mean(pred == y) * 100), agreement=float(np.mean(pred == float_pred)))
            print(row, flush=True)
            rows.append(row)
        rows[-1]["discordant_vs_no_fallback"] = {
            "only_with_fallback_correct": int(np.sum(correct[steps] & ~correct[None])),
            "only_without_correct": int(np.sum(correct[None] & ~correct[steps])),
        }
    return rows


def resnet50_rows(steps):
    model = keras.applications.ResNet50(weights=None)
    rows = []
    for fallback in (None, steps):
        _, row = _convert(model, fallback, "powerquant")
        row["model"] = "resnet50 (weights=None)"
        print(row, flush=True)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    result = {"commit": common._git_commit(), "steps": args.steps,
              "rows": resnet50_rows(args.steps) + efficientnet_rows(args.steps)}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

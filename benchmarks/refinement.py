"""Loss-aware refinement: ablation, mixed precision and time, uniform and PowerQuant, paired.

What is measured, at W4/A4 (first and last layers at 8 bits), for
`method="uniform"` (a = 1) and `method="powerquant"` with the same pipeline:

- ResNet-8 (MLPerf Tiny, CIFAR-10): the first 932 test images; calibration
  on the first 512 images of `train_4660.npz` (refinement evaluates the
  network on a 320-image subsample of them: 256 to fit, 64 held out).
- The demo model (`keras_powerquant.demo`, seed 0, trained here
  deterministically): its 2,000 held-out images; calibration on its 256
  calibration images.

Refinement minimises KL(float || quantized) (no labels), except in the row
that passes the calibration labels (cross-entropy).

Rows are cumulative: the per-layer fit (`refine=False`), + grid, +
granularity, + LAPQ, + learned rounding (= `refine=True`), and mixed precision with
`target_size` set to the exported-weight bytes of uniform W4, alone and
followed by the recommended steps. Every model is evaluated in memory on
the same images, so rows are compared paired: each PowerQuant row against
the uniform row of the same pipeline, and each refined row against the
per-layer fit of its method (McNemar's exact test, the paired difference
with its standard error).

`python benchmarks/refinement.py [--quick] [--json benchmarks/refinement.json]`
(`--quick`: the ResNet-8 only, a smaller LAPQ budget).
"""

import os
import sys
import tempfile
import time

import common
import numpy as np
from scipy import stats

import keras_powerquant as kpq
from keras_powerquant import demo
from keras_powerquant.limits import DEFAULT_MAX_EVALUATIONS

STAGES = (
    ("per-layer fit", {"refine": False}),
    ("+ grid", {"refine": ["grid"]}),
    ("+ granularity", {"refine": ["grid", "granularity"]}),
    ("+ LAPQ", {"refine": ["grid", "granularity", "lapq"]}),
    ("+ rounding (refine=True)", {"refine": True}),
    ("refine=True, cross-entropy with labels", {"refine": True, "labels": True}),
    ("mixed precision at uniform W4 size", {"refine": False, "target_size": "uniform-w4"}),
    ("mixed precision + refine=True", {"refine": True, "target_size": "uniform-w4"}),
)
METHODS = ("uniform", "powerquant")


def _resnet8():
    model = common.load_benchmark_model("resnet8")
    x, y = common.cifar_test()
    train = np.load(common.shared_file(common.CIFAR_TRAIN_FILE))
    return model, x, y, train["x"][:512].astype(np.float32), train["y"][:512].astype(np.int64)


def _demo_model():
    folder = os.path.join(tempfile.gettempdir(), "kpq-benchmark-demo")
    paths = demo.prepare_demo(folder, seed=0, verbose=False)
    model = kpq.load_model(paths["model"])
    test = np.load(paths["test"])
    calibration = np.load(paths["calibration"])
    # The calibration images are the first training images: regenerate their labels.
    _, y_train = demo.make_dataset(demo._NUM_TRAIN, seed=0)
    return model, test["x"], test["y"], calibration, y_train[: len(calibration)]


def _paired(a, b):
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = len(a)
    difference = (only_a - only_b) / n
    d = a.astype(float) - b.astype(float)
    stderr = float(np.std(d, ddof=1) / np.sqrt(n))
    discordant = only_a + only_b
    p_value = stats.binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return {"only_a": only_a, "only_b": only_b, "difference": difference, "stderr": stderr, "mcnemar_p": float(p_value)}


def _weight_bytes(model):
    return int(sum(np.asarray(w).nbytes for w in model.weights))


def _run_model(name, loader, evaluations):
    model, x, y, calibration, labels = loader()
    float_correct = common.top1_hits(model, x, y)
    uniform_w4, _ = kpq.convert(model, 4, 4, "uniform", calibration_data=calibration)
    w4_bytes = _weight_bytes(uniform_w4)
    rows, correct = [], {}
    for stage, options in STAGES:
        for method in METHODS:
            options_here = dict(options)
            if options_here.get("target_size") == "uniform-w4":
                options_here["target_size"] = w4_bytes
            labelled = options_here.pop("labels", False)
            started = time.perf_counter()
            quantized, report = kpq.convert(
                model,
                4,
                4,
                method,
                calibration_data=calibration,
                calibration_labels=labels if labelled else None,
                refine_evaluations=evaluations,
                **options_here,
            )
            seconds = time.perf_counter() - started
            hits = common.top1_hits(quantized, x, y)
            correct[(stage, method)] = hits
            row = {
                "model": name,
                "stage": stage,
                "method": method,
                "top1": float(hits.mean()),
                "images": int(len(y)),
                "weight_bytes": _weight_bytes(quantized),
                "convert_seconds": seconds,
                "refinement_seconds": report.seconds.get("refinement"),
                "steps": [
                    {
                        k: step[k]
                        for k in (
                            "name", "loss_before", "loss_after", "holdout_loss_before", "holdout_loss_after", "kept",
                            "seconds", "evaluations",
                        )
                    }
                    for step in report.refinement
                ],
                "bits": {layer.name: layer.weight_bits for layer in report.quantized_layers},
            }
            if method == "powerquant":
                row["vs_uniform"] = _paired(hits, correct[(stage, "uniform")])
            if stage != STAGES[0][0]:
                row["vs_per_layer_fit"] = _paired(hits, correct[(STAGES[0][0], method)])
            rows.append(row)
            print(f"{name} {stage} {method}: {row['top1'] * 100:.2f}% in {seconds:.1f} s", file=sys.stderr)
    return {
        "model": name,
        "float_top1": float(float_correct.mean()),
        "images": int(len(y)),
        "uniform_w4_bytes": w4_bytes,
        "rows": rows,
    }


def run(quick=False):
    evaluations = 100 if quick else DEFAULT_MAX_EVALUATIONS
    results = {"machine": common.machine_description(), "lapq_evaluations": evaluations, "models": []}
    loaders = [("ResNet-8", _resnet8)] + ([] if quick else [("demo CNN", _demo_model)])
    for name, loader in loaders:
        try:
            results["models"].append(_run_model(name, loader, evaluations))
        except common.Skip as skip:
            results["models"].append({"model": name, "skipped": str(skip)})
    return results


def _fmt_pair(pair):
    if pair is None:
        return "-"
    return f"{pair['difference'] * 100:+.2f} ± {pair['stderr'] * 100:.2f} (p = {pair['mcnemar_p']:.2g})"


def markdown(result):
    lines = ["## Loss-aware refinement (W4/A4)", ""]
    lines.append(
        "Command: `python benchmarks/refinement.py --json benchmarks/refinement.json`. "
        f"LAPQ budget {result['lapq_evaluations']} evaluations (the default), refinement on a 320-sample subsample "
        "(every fifth held out to check each step) "
        "of the calibration set, KL(float || quantized) unless labels are named. In-memory Keras models, "
        "same images for every row. Shared 2-core machine (other jobs running): times are upper bounds."
    )
    for model in result["models"]:
        lines.append("")
        if "skipped" in model:
            lines.append(f"### {model['model']}: skipped ({model['skipped']})")
            continue
        lines.append(f"### {model['model']}: float {model['float_top1'] * 100:.2f}%, {model['images']} test images")
        lines.append("")
        table = []
        by_key = {(r["stage"], r["method"]): r for r in model["rows"]}
        for stage, _ in STAGES:
            uniform, power = by_key[(stage, "uniform")], by_key[(stage, "powerquant")]
            table.append(
                [
                    stage,
                    f"{uniform['top1'] * 100:.2f}",
                    f"{power['top1'] * 100:.2f}",
                    _fmt_pair(power.get("vs_uniform")),
                    _fmt_pair(uniform.get("vs_per_layer_fit")),
                    _fmt_pair(power.get("vs_per_layer_fit")),
                    f"{uniform['weight_bytes']} / {power['weight_bytes']}",
                    f"{uniform['refinement_seconds'] or 0:.0f} / {power['refinement_seconds'] or 0:.0f}",
                ]
            )
        lines.append(
            common.markdown_table(
                [
                    "pipeline",
                    "uniform top-1",
                    "PowerQuant top-1",
                    "PQ − uniform (points)",
                    "uniform vs per-layer fit",
                    "PQ vs per-layer fit",
                    "weight bytes U / PQ",
                    "refinement s U / PQ",
                ],
                table,
            )
        )
    return "\n".join(lines)


def plot(result, folder):
    return []


if __name__ == "__main__":
    common.main(sys.modules[__name__])

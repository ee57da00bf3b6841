"""Top-1/top-5 accuracy of exported ResNet-8 SavedModels: float, uniform and PowerQuant.

What is measured: the MLPerf Tiny ResNet-8 on the first 932 CIFAR-10 test
images (raw 0-255 float32 pixels, no scaling, as the model expects), as
float and converted at W8/A8, W6/A6, W4/A8 and W4/A4, each with
`method="uniform"` (a = 1), the default `method="powerquant"` (activation
exponents among 1, 1/2, 1/4) and `powerquant-continuous` (activation
exponents anywhere in [0.1, 2], the default before 0.2), data-free
(BatchNorm statistics) and calibrated on the first 512 images of
`train_4660.npz` (never test images); and weight-only at W8 and W4
(`abits=None`, uniform and PowerQuant; calibration only concerns
activations, so data-free alone). Every model, the float one included,
is exported with `kpq.export_model` and evaluated through its SavedModel
(`load_predictor` on the version folder), which is what a server would run;
the in-memory Keras model is evaluated too, and the number of images whose
top-1 class differs between the two is recorded.

All models see the same images, so models are compared paired (each
PowerQuant variant with uniform; the default with the continuous
exponents; weight-only with W/A and float): for each pair, the images
right in one and wrong in the other (McNemar counts), the paired
difference of top-1 with its standard error, and McNemar's exact two-sided
p-value.
"""

import os
import sys
import tempfile

import common
import keras
import numpy as np
from scipy import stats

from keras_powerquant.evaluation import load_predictor

BIT_CONFIGS = [(8, 8), (6, 6), (4, 8), (4, 4)]
QUICK_BIT_CONFIGS = [(8, 8), (4, 4)]
WEIGHT_ONLY_BITS = (8, 4)
METHODS = tuple(common.VARIANTS)
# Each PowerQuant variant is compared with uniform on the same images.
COMPARED = ("powerquant", "powerquant-continuous")
CALIBRATIONS = ("data-free", "calibrated")
CALIBRATION_IMAGES = 512
BATCH_SIZE = 128


def _scores(predict, x):
    return np.concatenate([np.asarray(predict(x[i : i + BATCH_SIZE])) for i in range(0, len(x), BATCH_SIZE)])


def _hits(scores, y, k):
    """Per image: is the label among the k best scores (ties broken by class order)."""
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.any(ranked == y[:, None], axis=1)


def _evaluate(model, saved_model_dir, x, y):
    """Accuracy of the exported SavedModel, and its agreement with the Keras model."""
    served = _scores(load_predictor(saved_model_dir).predict, x)
    structure = model._inputs_struct  # a list for legacy .h5 models, a tensor otherwise
    in_memory = _scores(lambda batch: model(keras.tree.pack_sequence_as(structure, [batch]), training=False), x)
    top1 = _hits(served, y, 1)
    return {
        "top1": float(top1.mean()),
        "top5": float(_hits(served, y, 5).mean()),
        "images": int(len(y)),
        "keras_top1": float(_hits(in_memory, y, 1).mean()),
        "keras_vs_savedmodel_top1_disagreements": int(np.sum(served.argmax(1) != in_memory.argmax(1))),
        "keras_vs_savedmodel_max_abs_diff": float(np.max(np.abs(served - in_memory))),
        # One digit per image (10 classes): the raw predictions, for re-analysis.
        "predictions": "".join(str(c) for c in served.argmax(1)),
    }, top1


def paired_comparison(hits_a, hits_b):
    """Paired comparison of two models' per-image top-1 hits on the same images.

    Returns the counts of images right only in `a` and only in `b`, the
    difference of top-1 (a - b) with its standard error (paired, from
    the discordant counts), and McNemar's exact two-sided p-value.
    """
    n = len(hits_a)
    only_a = int(np.sum(hits_a & ~hits_b))
    only_b = int(np.sum(hits_b & ~hits_a))
    discordant = only_a + only_b
    difference = (only_a - only_b) / n
    stderr = np.sqrt(max(discordant - (only_a - only_b) ** 2 / n, 0.0)) / n
    p_value = stats.binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0
    return {
        "right_only_a": only_a,
        "right_only_b": only_b,
        "difference": float(difference),
        "stderr": float(stderr),
        "mcnemar_p": float(p_value),
    }


def run(quick=False):
    """Evaluates the float and quantized ResNet-8s; returns the raw numbers."""
    try:
        model = common.load_benchmark_model("resnet8")
        x, y = common.cifar_test()
        calibration = common.cifar_calibration(CALIBRATION_IMAGES)
    except common.Skip as skip:
        return {"skipped": str(skip)}
    configs = QUICK_BIT_CONFIGS if quick else BIT_CONFIGS
    results, hits = [], {}
    with tempfile.TemporaryDirectory(prefix="kpq-bench-accuracy-") as tmp:
        folder = common.export_saved_model(model, os.path.join(tmp, "float"))
        entry, hits["float"] = _evaluate(model, folder, x, y)
        results.append({"name": "float", "wbits": None, "abits": None, "method": "float", "calibration": None, **entry})
        for wbits, abits in configs:
            for calibration_name in CALIBRATIONS:
                for method in METHODS:
                    data = calibration if calibration_name == "calibrated" else None
                    quantized, report = common.convert_variant(model, wbits, abits, method, calibration_data=data)
                    name = f"{common.bits_label(wbits, abits)} {method} {calibration_name}"
                    folder = common.export_saved_model(
                        quantized, os.path.join(tmp, name.replace(" ", "_").replace("/", "")), report, model
                    )
                    entry, hits[name] = _evaluate(quantized, folder, x, y)
                    results.append(
                        {"name": name, "wbits": wbits, "abits": abits, "method": method,
                         "calibration": calibration_name, **entry}
                    )
        for wbits in WEIGHT_ONLY_BITS:
            for method in ("uniform", "powerquant"):
                quantized, report = common.convert_variant(model, wbits, None, method)
                name = f"{common.bits_label(wbits, None)} {method}"
                folder = common.export_saved_model(quantized, os.path.join(tmp, f"w{wbits}-{method}"), report, model)
                entry, hits[name] = _evaluate(quantized, folder, x, y)
                results.append({"name": name, "wbits": wbits, "abits": None, "method": method,
                                "calibration": None, **entry})
    pairs = []
    for wbits, abits in configs:
        for calibration_name in CALIBRATIONS:
            label = common.bits_label(wbits, abits)
            uniform = f"{label} uniform {calibration_name}"
            for variant in COMPARED:
                powerquant = f"{label} {variant} {calibration_name}"
                pairs.append(
                    {"bits": label, "calibration": calibration_name, "variant": variant, "a": powerquant,
                     "b": uniform, **paired_comparison(hits[powerquant], hits[uniform])}
                )
    other_pairs = []
    for wbits, abits in configs:
        for calibration_name in CALIBRATIONS:
            label = common.bits_label(wbits, abits)
            other_pairs.append(
                (f"{label} powerquant {calibration_name}", f"{label} powerquant-continuous {calibration_name}")
            )
    # Data-free against calibrated, per method: what giving no data costs.
    for wbits, abits in configs:
        label = common.bits_label(wbits, abits)
        for method in METHODS:
            other_pairs.append((f"{label} {method} data-free", f"{label} {method} calibrated"))
    for wbits in WEIGHT_ONLY_BITS:
        label = common.bits_label(wbits, None)
        other_pairs += [(f"{label} powerquant", f"{label} uniform"), (f"{label} powerquant", "float")]
        if (wbits, wbits) in configs:
            other_pairs.append((f"{label} powerquant", f"{common.bits_label(wbits, wbits)} powerquant data-free"))
    comparisons = [{"a": a, "b": b, **paired_comparison(hits[a], hits[b])} for a, b in other_pairs]
    return {
        "model": common.MODELS["resnet8"][0],
        "test_data": f"{common.CIFAR_TEST_FILE} (raw 0-255 float32, no scaling)",
        "calibration_data": f"first {CALIBRATION_IMAGES} images of {common.CIFAR_TRAIN_FILE}",
        "images": int(len(y)),
        "quick": quick,
        "results": results,
        "pairs": pairs,
        "comparisons": comparisons,
    }


def plot(result, folder):
    """Grouped bars of top-1 by bit configuration; returns the PNG paths."""
    if "skipped" in result:
        return []
    plt = common.pyplot()
    quantized = [r for r in result["results"] if r["method"] != "float" and r["abits"] is not None]
    labels = list(dict.fromkeys(common.bits_label(r["wbits"], r["abits"]) for r in quantized))
    series = [(c, m) for c in CALIBRATIONS for m in METHODS]
    colors = {
        "uniform": ("#9ecae1", "#3182bd"),
        "powerquant": ("#fdae6b", "#e6550d"),
        "powerquant-continuous": ("#a1d99b", "#31a354"),
    }
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for i, (calibration_name, method) in enumerate(series):
        values = [
            next(r["top1"] for r in quantized
                 if common.bits_label(r["wbits"], r["abits"]) == label
                 and r["method"] == method and r["calibration"] == calibration_name) * 100
            for label in labels
        ]
        positions = np.arange(len(labels)) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(positions, values, width, label=f"{method}, {calibration_name}",
                      color=colors[method][CALIBRATIONS.index(calibration_name)])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    float_top1 = result["results"][0]["top1"] * 100
    ax.axhline(float_top1, color="black", linestyle="--", linewidth=1, label=f"float ({float_top1:.1f}%)")
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_ylabel("top-1 accuracy (%), axis cut")
    low = min(r["top1"] for r in quantized) * 100
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_title(f"ResNet-8, exported SavedModels, {result['images']} CIFAR-10 test images")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = os.path.join(folder, "accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(result):
    lines = ["## Accuracy (ResNet-8, CIFAR-10)", ""]
    if "skipped" in result:
        return "\n".join(lines + [f"Skipped: {result['skipped']}."])
    lines += [
        f"{result['model']} on {result['test_data']}; calibration on the {result['calibration_data']}. "
        f"Every model is exported with `export_model` and evaluated through its SavedModel; "
        f"n = {result['images']} images, the same for every row. First and last layers stay at "
        "8 bits (the converter's default). `keras≠SM` counts images whose top-1 class differs "
        "between the in-memory Keras model and its SavedModel.",
        "",
    ]
    rows = [
        [r["name"], f"{r['top1'] * 100:.2f}", f"{r['top5'] * 100:.2f}", r["images"],
         r["keras_vs_savedmodel_top1_disagreements"]]
        for r in result["results"]
    ]
    lines += [common.markdown_table(["model", "top-1 %", "top-5 %", "images", "keras≠SM"], rows), ""]
    lines += [
        "PowerQuant vs uniform, paired on the same images: images right only with the PowerQuant "
        "variant (PQ only) or only with uniform (U only), the difference of top-1 (PowerQuant - "
        "uniform) ± its paired standard error, and McNemar's exact p-value. `powerquant` (the "
        "default) chooses activation exponents among 1, 1/2, 1/4; `powerquant-continuous` "
        "(`fast_activations=False`, the default before 0.2) fits them anywhere in [0.1, 2].",
        "",
    ]
    rows = [
        [p["bits"], p["calibration"], p["variant"], p["right_only_a"], p["right_only_b"],
         f"{p['difference'] * 100:+.2f} ± {p['stderr'] * 100:.2f}", f"{p['mcnemar_p']:.3g}"]
        for p in result["pairs"]
    ]
    lines.append(
        common.markdown_table(
            ["bits", "activations", "variant", "PQ only", "U only", "Δ top-1 (points)", "McNemar p"], rows
        )
    )
    lines += [
        "",
        "Other paired comparisons (same images): the default against the continuous exponents, "
        "data-free against calibrated for each method, and weight-only (`abits=None`, activations "
        "float) against uniform, float and W/A.",
        "",
    ]
    rows = [
        [c["a"], c["b"], c["right_only_a"], c["right_only_b"],
         f"{c['difference'] * 100:+.2f} ± {c['stderr'] * 100:.2f}", f"{c['mcnemar_p']:.3g}"]
        for c in result.get("comparisons", [])
    ]
    lines.append(common.markdown_table(["a", "b", "a only", "b only", "Δ top-1 (a - b, points)", "McNemar p"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

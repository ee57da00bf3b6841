"""Inference cost of exported quantized SavedModels against the float model's.

What is measured: the wall time of one call of the `serving_default`
signature of SavedModels written by `kpq.export_model`, on CPU, at batch 1
and 16, all loaded in the same process: the float model, the same float
model with its BatchNorms folded (`kpq.fold_batch_norms`, to separate the
saving from folding and the cost of quantization), and the data-free
converted models. Calls are interleaved: every iteration calls each model
once, in an order that rotates between iterations, so load changes on the
machine hit all models alike. The inputs are a fixed random batch over the
model's input range (values do not change the work done).

Reported per model and batch: median, quartiles and count of the call
times, the ratio of medians quantized/float, and the median of the
per-iteration ratios (each quantized call over the float call of the same
iteration). Goal: quantized/float <= 1.10 at batch 16.

Models: ResNet-8 (W4/A4 and W8/A8: PowerQuant, PowerQuant with fast
activations and uniform), the VWW MobileNetV1 (W8/A8) and MobileNetV2
(W4/A4; not with `--quick`; batch 16 only when one float call takes under a
second), both PowerQuant and PowerQuant with fast activations.
"""

import gc
import os
import sys
import tempfile
import time

import common
import keras
import numpy as np
import tensorflow as tf

import keras_powerquant as kpq

CONFIGS = {
    "resnet8": [
        (4, 4, "powerquant"),
        (4, 4, "powerquant-fast"),
        (4, 4, "uniform"),
        (8, 8, "powerquant"),
        (8, 8, "powerquant-fast"),
        (8, 8, "uniform"),
    ],
    "vww": [(8, 8, "powerquant"), (8, 8, "powerquant-fast")],
    "mobilenetv2": [(4, 4, "powerquant"), (4, 4, "powerquant-fast")],
}
NOT_QUICK = {"mobilenetv2"}
BATCHES = (1, 16)
# Iterations are chosen so one (model, batch) loop takes about this long,
# within [MIN_ITERATIONS, MAX_ITERATIONS].
BUDGET_SECONDS = {False: 20.0, True: 4.0}
MIN_ITERATIONS = 15
MAX_ITERATIONS = {False: 400, True: 100}
# A batch is skipped when one float call takes longer than this.
MAX_CALL_SECONDS = 1.0
GOAL_RATIO, GOAL_BATCH = 1.10, 16


def _iterations(functions, quick):
    for call in functions.values():  # first calls allocate; keep them out of the estimate
        call()
        call()
    start = time.perf_counter()
    for call in functions.values():
        call()
    round_seconds = time.perf_counter() - start
    wanted = int(BUDGET_SECONDS[quick] / max(round_seconds, 1e-6))
    return int(np.clip(wanted, MIN_ITERATIONS, MAX_ITERATIONS[quick]))


def _time_batch(name, model, served, batch, quick):
    inputs = tf.constant(common.random_inputs(name, model, batch))
    functions = {label: (lambda f=f: f(inputs)) for label, f in served.items()}
    start = time.perf_counter()
    functions["float"]()  # also the first call: traces and allocates
    functions["float"]()
    if time.perf_counter() - start > 2 * MAX_CALL_SECONDS:
        return {"batch": batch, "skipped": f"one float call takes over {MAX_CALL_SECONDS:.0f} s"}
    iterations = _iterations(functions, quick)
    times = common.interleaved_timings(functions, iterations)
    summaries = {label: common.time_summary(seconds) for label, seconds in times.items()}
    float_times = np.asarray(times["float"])
    ratios = {
        label: {
            "ratio_of_medians": summaries[label]["median_ms"] / summaries["float"]["median_ms"],
            "median_paired_ratio": float(np.median(np.asarray(times[label]) / float_times)),
            "ratio_to_folded_float": summaries[label]["median_ms"] / summaries["float (BN folded)"]["median_ms"],
        }
        for label in served
        if label != "float"
    }
    return {"batch": batch, "iterations": iterations, "times": summaries, "ratios": ratios,
            "load_average": common.load_average()}


def _measure_model(name, configs, quick, tmp):
    model = common.load_benchmark_model(name)
    served = {"float": common.serving_function(common.export_saved_model(model, os.path.join(tmp, f"{name}-float")))}
    folded, _ = kpq.fold_batch_norms(model)
    served["float (BN folded)"] = common.serving_function(
        common.export_saved_model(folded, os.path.join(tmp, f"{name}-folded"))
    )
    for wbits, abits, method in configs:
        label = f"{common.bits_label(wbits, abits)} {method}"
        quantized, report = common.convert_variant(model, wbits, abits, method)
        folder = os.path.join(tmp, f"{name}-{wbits}-{abits}-{method}")
        served[label] = common.serving_function(common.export_saved_model(quantized, folder, report, model))
    return [_time_batch(name, model, served, batch, quick) for batch in BATCHES]


def run(quick=False):
    """Times the float and quantized SavedModels of each model; returns the raw numbers."""
    entries = []
    with tempfile.TemporaryDirectory(prefix="kpq-bench-inference-") as tmp:
        for name, configs in CONFIGS.items():
            entry = {"model": name, "description": common.MODELS[name][0]}
            if quick and name in NOT_QUICK:
                entries.append({**entry, "skipped": "not run with --quick"})
                continue
            try:
                entries.append({**entry, "batches": _measure_model(name, configs, quick, tmp)})
            except common.Skip as skip:
                entries.append({**entry, "skipped": str(skip)})
            keras.backend.clear_session()
            gc.collect()
    return {
        "device": "CPU",
        "tf_threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "note": "0 = TensorFlow's default (all cores)",
        },
        "quick": quick,
        "entries": entries,
        "goal": _goal(entries),
    }


def _goal(entries):
    measured = {}
    for entry in entries:
        for batch in entry.get("batches", []):
            if batch["batch"] == GOAL_BATCH and "ratios" in batch:
                for label, ratio in batch["ratios"].items():
                    if label != "float (BN folded)":
                        measured[f"{entry['model']} {label}"] = ratio["ratio_of_medians"]
    return {
        "statement": f"quantized/float <= {GOAL_RATIO:.2f} at batch {GOAL_BATCH}",
        "ratios": measured,
        "met": {key: bool(value <= GOAL_RATIO) for key, value in measured.items()},
    }


def plot(result, folder):
    """Bars of quantized/float median time per model, config and batch; returns the PNG paths."""
    bars = []
    for entry in result["entries"]:
        for batch in entry.get("batches", []):
            for label, ratio in batch.get("ratios", {}).items():
                bars.append((f"{entry['model']} {label}", batch["batch"], ratio["ratio_of_medians"]))
    if not bars:
        return []
    plt = common.pyplot()
    labels = list(dict.fromkeys(label for label, _, _ in bars))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    height = 0.38
    for i, (batch, color) in enumerate(zip(BATCHES, ("#9ecae1", "#3182bd"))):
        values = {label: value for label, b, value in bars if b == batch}
        positions = [j + (i - 0.5) * height for j, label in enumerate(labels) if label in values]
        handle = ax.barh(positions, [values[label] for label in labels if label in values], height,
                         color=color, label=f"batch {batch}")
        ax.bar_label(handle, fmt="%.2f", fontsize=7, padding=2)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(GOAL_RATIO, color="gray", linestyle="--", linewidth=1, label=f"goal at batch {GOAL_BATCH}: {GOAL_RATIO}")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median call time / float model's (SavedModel, CPU)")
    ax.set_title("Inference cost of exported models relative to float")
    ax.set_xlim(0, max(value for _, _, value in bars) * 1.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = os.path.join(folder, "inference_cost.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(result):
    lines = [
        "## Inference cost (SavedModel, CPU)",
        "",
        "One call of `serving_default` per model per iteration, interleaved (rotating order), same "
        "process. `ratio` = median time / float median; `paired` = median over iterations of "
        "(this call / the float call of the same iteration); `vs folded` = ratio to the float model "
        "with BatchNorm folded. TF threads: "
        f"intra-op {result['tf_threads']['intra_op']}, inter-op {result['tf_threads']['inter_op']} "
        "(0 = all cores).",
        "",
    ]
    rows = []
    for entry in result["entries"]:
        if "skipped" in entry:
            rows.append([entry["model"], "-", "-", f"skipped: {entry['skipped']}", "-", "-", "-", "-", "-"])
            continue
        for batch in entry["batches"]:
            if "skipped" in batch:
                rows.append([entry["model"], batch["batch"], "-", f"skipped: {batch['skipped']}",
                             "-", "-", "-", "-", "-"])
                continue
            for label, summary in batch["times"].items():
                ratio = batch["ratios"].get(label)
                rows.append(
                    [entry["model"], batch["batch"], label, f"{summary['median_ms']:.2f}",
                     f"{summary['p25_ms']:.2f}-{summary['p75_ms']:.2f}", summary["count"],
                     f"{ratio['ratio_of_medians']:.2f}" if ratio else "1",
                     f"{ratio['median_paired_ratio']:.2f}" if ratio else "1",
                     f"{ratio['ratio_to_folded_float']:.2f}" if ratio else "-"]
                )
    lines.append(common.markdown_table(
        ["model", "batch", "variant", "median ms", "p25-p75 ms", "calls", "ratio", "paired", "vs folded"], rows
    ))
    goal = result["goal"]
    lines += ["", f"Goal ({goal['statement']}):"]
    if not goal["ratios"]:
        lines.append("not measured.")
    for key, value in goal["ratios"].items():
        lines.append(f"- {key}: {value:.2f}x, {'met' if goal['met'][key] else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

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
times, and the medians of the per-iteration ratios (each quantized call
over the float call, and over the BN-folded float call, of the same
iteration). Goal: the default W4/A4 and W8/A8 exports at most 1.00x the
float model and 1.10x the BN-folded float model, at batch 1 and 16.

Variants, on each model (ResNet-8, the VWW MobileNetV1 and MobileNetV2;
MobileNetV2 not with `--quick`): the defaults at W4/A4 and W8/A8
(activation exponents among 1, 1/2, 1/4, weights decoded once at load),
weight-only W4 and W8 (`abits=None`), and three ablations at W4/A4:
continuous activation exponents (the default before 0.2), weights
decoded on every call (`decode_weights="call"`), and the uniform method,
whose activation quantizers are one FakeQuant op each: the least any
activation quantizer costs when served with TensorFlow's own ops.

Then an op profile (`op_profile`) of the float, folded, default and
uniform models at both batches says where the difference goes: time per
op type as TF Serving's loader runs the graph.
"""

import gc
import os
import sys
import tempfile
import time

import common
import keras
import numpy as np
import op_profile
import tensorflow as tf

import keras_powerquant as kpq

# label -> (wbits, abits, variant, decode_weights)
CONFIGS = {
    "W4/A4": (4, 4, "powerquant", "load"),
    "W8/A8": (8, 8, "powerquant", "load"),
    "W4 weight-only": (4, None, "powerquant", "load"),
    "W8 weight-only": (8, None, "powerquant", "load"),
    "W4/A4 continuous exponents": (4, 4, "powerquant-continuous", "load"),
    "W4/A4 per-call decode": (4, 4, "powerquant", "call"),
    "W4/A4 uniform": (4, 4, "uniform", "load"),
}
GOAL_CONFIGS = ("W4/A4", "W8/A8")
MODELS = ("resnet8", "vww", "mobilenetv2")
NOT_QUICK = {"mobilenetv2"}
FLOAT, FOLDED = "float", "float (BN folded)"
BATCHES = (1, 16)
# Iterations are chosen so one (model, batch) loop takes about this long,
# within [MIN_ITERATIONS, MAX_ITERATIONS].
BUDGET_SECONDS = {False: 20.0, True: 4.0}
MIN_ITERATIONS = 15
MAX_ITERATIONS = {False: 400, True: 100}
# A batch is skipped when one float call takes longer than this.
MAX_CALL_SECONDS = 5.0
GOAL_FLOAT, GOAL_FOLDED = 1.00, 1.10
PROFILED = (FLOAT, FOLDED, "W4/A4", "W8/A8", "W4/A4 uniform")
# Seconds of traced calls per (model, batch) profile.
PROFILE_BUDGET_SECONDS = {False: 12.0, True: 3.0}


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
    functions[FLOAT]()  # also the first call: traces and allocates
    functions[FLOAT]()
    if time.perf_counter() - start > 2 * MAX_CALL_SECONDS:
        return {"batch": batch, "skipped": f"one float call takes over {MAX_CALL_SECONDS:.0f} s"}
    iterations = _iterations(functions, quick)
    times = common.interleaved_timings(functions, iterations)
    summaries = {label: common.time_summary(seconds) for label, seconds in times.items()}
    float_times, folded_times = np.asarray(times[FLOAT]), np.asarray(times[FOLDED])
    ratios = {
        label: {
            "ratio_of_medians": summaries[label]["median_ms"] / summaries[FLOAT]["median_ms"],
            "median_paired_ratio": float(np.median(np.asarray(times[label]) / float_times)),
            "median_paired_ratio_to_folded": float(np.median(np.asarray(times[label]) / folded_times)),
        }
        for label in served
        if label != FLOAT
    }
    return {"batch": batch, "iterations": iterations, "times": summaries, "ratios": ratios,
            "load_average": common.load_average()}


def _profile_batch(name, model, folders, timed, quick):
    """Op profile of the PROFILED SavedModels at the batch of `timed` (a `_time_batch` result)."""
    batch = timed["batch"]
    seconds = sum(timed["times"][label]["median_ms"] for label in PROFILED) / 1e3
    calls = op_profile.calls_for(seconds, PROFILE_BUDGET_SECONDS[quick])
    inputs = common.random_inputs(name, model, batch)
    profiles = op_profile.profile({label: folders[label] for label in PROFILED}, inputs, calls)
    return {"batch": batch, "calls": calls, "profiles": profiles, "load_average": common.load_average()}


def _measure_model(name, quick, tmp):
    model = common.load_benchmark_model(name)
    folders = {FLOAT: common.export_saved_model(model, os.path.join(tmp, f"{name}-float"))}
    folded, _ = kpq.fold_batch_norms(model)
    folders[FOLDED] = common.export_saved_model(folded, os.path.join(tmp, f"{name}-folded"))
    for i, (label, (wbits, abits, variant, decode_weights)) in enumerate(CONFIGS.items()):
        quantized, report = common.convert_variant(model, wbits, abits, variant)
        folders[label] = common.export_saved_model(
            quantized, os.path.join(tmp, f"{name}-{i}"), report, model, decode_weights
        )
    served = {label: common.serving_function(folder) for label, folder in folders.items()}
    batches = [_time_batch(name, model, served, batch, quick) for batch in BATCHES]
    del served  # the profile loads its own copies; free these first
    gc.collect()
    profiles = [_profile_batch(name, model, folders, timed, quick) for timed in batches if "skipped" not in timed]
    return batches, profiles


def run(quick=False):
    """Times the float and quantized SavedModels of each model; returns the raw numbers."""
    entries = []
    with tempfile.TemporaryDirectory(prefix="kpq-bench-inference-") as tmp:
        for name in MODELS:
            entry = {"model": name, "description": common.MODELS[name][0]}
            if quick and name in NOT_QUICK:
                entries.append({**entry, "skipped": "not run with --quick"})
                continue
            try:
                batches, profiles = _measure_model(name, quick, tmp)
                entries.append({**entry, "batches": batches, "op_profiles": profiles})
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
        "configs": {
            label: dict(zip(("wbits", "abits", "variant", "decode_weights"), c)) for label, c in CONFIGS.items()
        },
        "entries": entries,
        "goal": _goal(entries),
    }


def _goal(entries):
    """Paired-ratio medians of the default exports against both float baselines."""
    measured = {}
    for entry in entries:
        for batch in entry.get("batches", []):
            for label in GOAL_CONFIGS:
                ratio = batch.get("ratios", {}).get(label)
                if ratio is not None:
                    measured[f"{entry['model']} {label} batch {batch['batch']}"] = {
                        "vs_float": ratio["median_paired_ratio"],
                        "vs_folded": ratio["median_paired_ratio_to_folded"],
                    }
    return {
        "statement": f"default exports (W4/A4, W8/A8) <= {GOAL_FLOAT:.2f}x float and <= {GOAL_FOLDED:.2f}x "
        "BN-folded float (medians of paired ratios), at batch 1 and 16",
        "ratios": measured,
        "met": {
            key: {"vs_float": bool(r["vs_float"] <= GOAL_FLOAT), "vs_folded": bool(r["vs_folded"] <= GOAL_FOLDED)}
            for key, r in measured.items()
        },
    }


def plot(result, folder):
    """Bars of quantized/float median time per model, config and batch; returns the PNG paths."""
    bars = []
    for entry in result["entries"]:
        for batch in entry.get("batches", []):
            for label, ratio in batch.get("ratios", {}).items():
                bars.append((f"{entry['model']} {label}", batch["batch"], ratio["median_paired_ratio"]))
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
    ax.axvline(GOAL_FLOAT, color="gray", linestyle="--", linewidth=1, label=f"goal (defaults): {GOAL_FLOAT:.2f}x float")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median of paired call-time ratios to the float model (SavedModel, CPU)")
    ax.set_title("Inference cost of exported models relative to float")
    ax.set_xlim(0, max(value for _, _, value in bars) * 1.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = os.path.join(folder, "inference_cost.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _load_range(result):
    """'a-b': the range of the 1-minute load averages taken during the run."""
    values = [
        measured["load_average"][0]
        for entry in result["entries"]
        for measured in entry.get("batches", []) + entry.get("op_profiles", [])
        if "load_average" in measured
    ]
    return f"{min(values):.1f}-{max(values):.1f}" if values else "not recorded"


def _profile_markdown(result):
    rows = []
    for entry in result["entries"]:
        for measured in entry.get("op_profiles", []):
            for label, profile in measured["profiles"].items():
                others = op_profile.largest_other_ops(profile)
                rows.append([
                    entry["model"], measured["batch"], label, f"{profile['total_ms']:.2f}",
                    f"{profile['contraction_ms']:.2f}", f"{profile['total_ms'] - profile['contraction_ms']:.2f}",
                    ", ".join(f"{op} {ms:.2f}" for op, ms in others) or "-",
                ])
    if not rows:
        return []
    return [
        "",
        "### Where the time goes (op profile)",
        "",
        "Mean time per op type of one traced `serving_default` call, the SavedModel loaded into a TF1 "
        "Session as TF Serving's C++ loader loads it (the Grappler-optimized serving graph), the models "
        "interleaved; `benchmarks/op_profile.py`. `conv/matmul` = convolutions and matmuls with what "
        "Grappler fused into them (bias, ReLU); `other` = every other op, the largest of which are named.",
        "",
        common.markdown_table(
            ["model", "batch", "variant", "op time ms", "conv/matmul ms", "other ms", "largest other ops (ms)"], rows
        ),
    ]


def markdown(result):
    lines = [
        "## Inference cost (SavedModel, CPU)",
        "",
        "One call of `serving_default` per model per iteration, interleaved (rotating order), same "
        "process, on a 2-core machine shared with other jobs (1-minute load average "
        f"{_load_range(result)} during the run; per batch in results.json): compare rows of one model "
        "and batch. `paired` = median over iterations of (this call / the float call of the same "
        "iteration); `paired vs folded` = the same against the float model with BatchNorm folded; "
        "`ratio` = median time / float median. Defaults: W4/A4 and W8/A8 (activation exponents among "
        "1, 1/2, 1/4; weights decoded once at load). `W4/A4 uniform`: uniform activation quantizers, "
        "one FakeQuant op each, the least activation quantization costs with TensorFlow's ops. "
        f"TF threads: intra-op {result['tf_threads']['intra_op']}, inter-op "
        f"{result['tf_threads']['inter_op']} "
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
                     f"{ratio['median_paired_ratio_to_folded']:.2f}" if ratio else "-"]
                )
    lines.append(common.markdown_table(
        ["model", "batch", "variant", "median ms", "p25-p75 ms", "calls", "ratio", "paired", "paired vs folded"],
        rows,
    ))
    goal = result["goal"]
    lines += ["", f"Goal ({goal['statement']}):"]
    if not goal["ratios"]:
        lines.append("not measured.")
    for key, value in goal["ratios"].items():
        met = goal["met"][key]
        lines.append(
            f"- {key}: {value['vs_float']:.2f}x float ({'met' if met['vs_float'] else 'NOT met'}), "
            f"{value['vs_folded']:.2f}x folded ({'met' if met['vs_folded'] else 'NOT met'})"
        )
    lines += _profile_markdown(result)
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

"""Conversion time against model size: data-free W4/A4 PowerQuant.

What is measured: the wall time of `kpq.convert(model, 4, 4)` alone, for
the two shared MLPerf Tiny models and keras.applications MobileNetV2 and
ResNet50 built with `weights=None` at 224x224x3 (random weights: the
timing depends on the layer shapes, not on the values). TensorFlow start-up,
loading or building the model and exporting are outside the timed region.
Each model is converted a few times in the same process (the median is
reported; every repeat is kept), and the report's own per-stage seconds
(analysis, statistics, weight fits, activation fits, model build) are
recorded for the median run (the faster middle one for an even count).

Goal: ResNet50 (25.6M parameters) converts data-free in under 30 s.
"""

import gc
import os
import sys
import time

import common
import keras
import numpy as np

import keras_powerquant as kpq

# name -> (repeats, repeats with --quick); the small models first, so the
# one-off costs of the first conversion in the process fall on them.
REPEATS = {"resnet8": (5, 3), "vww": (5, 3), "mobilenetv2": (3, 1), "resnet50": (2, 1)}
GOAL_MODEL, GOAL_SECONDS = "resnet50", 30.0


def _time_conversions(model, repeats):
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, report = kpq.convert(model, 4, 4)
        runs.append((time.perf_counter() - start, report))
    seconds = [s for s, _ in runs]
    median_run = sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]
    return seconds, median_run[1]


def run(quick=False):
    """Times data-free W4/A4 conversion of each model; returns the raw numbers."""
    entries = []
    for name, (repeats, quick_repeats) in REPEATS.items():
        entry = {"model": name, "description": common.MODELS[name][0]}
        try:
            model = common.load_benchmark_model(name)
        except common.Skip as skip:
            entries.append({**entry, "skipped": str(skip)})
            continue
        seconds, report = _time_conversions(model, quick_repeats if quick else repeats)
        entries.append(
            {
                **entry,
                "params": int(model.count_params()),
                "quantized_kernel_params": int(sum(layer.params for layer in report.quantized_layers)),
                "quantized_layers": len(report.quantized_layers),
                "activation_quantizers": sum(a.status == "quantized" for a in report.activations),
                "seconds": seconds,
                "median_seconds": float(np.median(seconds)),
                "stage_seconds_of_median_run": report.seconds,
            }
        )
        del model, report
        keras.backend.clear_session()
        gc.collect()
    goal = next((e for e in entries if e["model"] == GOAL_MODEL and "skipped" not in e), None)
    return {
        "setting": "kpq.convert(model, 4, 4): data-free, method powerquant, scope layer",
        "timed": "convert() only; TF start-up, model loading/building and export excluded",
        "quick": quick,
        "entries": entries,
        "goal": {
            "statement": f"ResNet50 converts data-free in under {GOAL_SECONDS:.0f} s",
            "measured_seconds": goal["median_seconds"] if goal else None,
            "met": bool(goal["median_seconds"] < GOAL_SECONDS) if goal else None,
        },
    }


def plot(result, folder):
    """Conversion time against parameter count, log-log; returns the PNG paths."""
    entries = [e for e in result["entries"] if "skipped" not in e]
    if not entries:
        return []
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    params = [e["params"] for e in entries]
    seconds = [e["median_seconds"] for e in entries]
    ax.loglog(params, seconds, "o-", color="#e6550d")
    for e in entries:
        ax.annotate(e["model"], (e["params"], e["median_seconds"]), textcoords="offset points",
                    xytext=(-10, 8), fontsize=8)
    ax.margins(x=0.15, y=0.3)
    ax.axhline(
        GOAL_SECONDS, color="gray", linestyle="--", linewidth=1, label=f"goal for ResNet50: {GOAL_SECONDS:.0f} s"
    )
    ax.set_xlabel("parameters")
    ax.set_ylabel("convert() seconds (median)")
    ax.set_title("Data-free W4/A4 PowerQuant conversion time")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    path = os.path.join(folder, "conversion_time.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(result):
    lines = [
        "## Conversion time",
        "",
        f"`{result['setting']}`. Timed: {result['timed']}. Median over the repeats "
        "(all repeats in results.json); per-stage seconds are the report's, for the median run "
        "(the faster middle one for an even count).",
        "",
    ]
    stages = ("analysis", "statistics", "weights", "activations", "build")
    rows = []
    for e in result["entries"]:
        if "skipped" in e:
            rows.append([e["model"], "-", "-", f"skipped: {e['skipped']}", "-"] + ["-"] * len(stages))
            continue
        stage_seconds = e["stage_seconds_of_median_run"]
        rows.append(
            [e["model"], f"{e['params']:,}", e["quantized_layers"], f"{e['median_seconds']:.2f}", len(e["seconds"])]
            + [f"{stage_seconds[s]:.2f}" for s in stages]
        )
    lines.append(
        common.markdown_table(["model", "params", "quantized layers", "convert s (median)", "repeats"]
                              + [f"{s} s" for s in stages], rows)
    )
    goal = result["goal"]
    lines.append("")
    if goal["measured_seconds"] is None:
        lines.append(f"Goal ({goal['statement']}): not measured.")
    else:
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(f"Goal ({goal['statement']}): {verdict}, {goal['measured_seconds']:.1f} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

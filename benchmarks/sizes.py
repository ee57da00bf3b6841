"""Size of exported quantized SavedModels against the float model's.

What is measured: for each model, the float model and its data-free
PowerQuant conversions at W4/A4 and W8/A8 are exported with
`kpq.export_model`, and for each export:

- the bytes of the SavedModel's `variables/` folder (the checkpoint on disk);
- `variable_bytes(model)`: the payload of the model's variables (element
  count times item size), without checkpoint overhead;
- the bytes of the whole version folder (graph included), for information;
- for the quantized models, the payload split into int8 codes and the rest
  (float32 per-channel scales and biases, float layers).

Ratios are quantized over float. The converter's defaults apply: the first
and last quantized layers keep 8-bit weights and biases stay float32, so the
ratios sit above the 4/32 and 8/32 of the codes alone; at 4 bits two codes
share a byte. A third variant, "W4 all layers" (`quantize_first_last=True`),
shows how much of the W4 size the 8-bit first and last layers account for.
Uniform conversions store the same variables (only the exponent attribute
differs), so they are not repeated.

Goals (converter defaults): variables/ ratio <= 0.15 at W4 and <= 0.28 at W8.
"""

import gc
import os
import sys
import tempfile

import common
import keras
import numpy as np

import keras_powerquant as kpq
from keras_powerquant.export import directory_bytes
from keras_powerquant.export import variable_bytes

MODELS = ("resnet8", "vww", "mobilenetv2", "resnet50")
QUICK_MODELS = ("resnet8", "vww")
BITS = (4, 8)
GOALS = {4: 0.15, 8: 0.28}
# (label, bits, quantize_first_last): the converter's defaults at each bit
# width, and 4 bits everywhere to show what the 8-bit first/last layers cost.
VARIANTS = [("W4", 4, False), ("W8", 8, False), ("W4 all layers", 4, True)]


def _export_sizes(model, folder, report=None, float_model=None):
    saved_model_dir = common.export_saved_model(model, folder, report, float_model)
    return {
        "variables_dir_bytes": directory_bytes(os.path.join(saved_model_dir, "variables")),
        "variable_bytes": variable_bytes(model),
        "saved_model_bytes": directory_bytes(saved_model_dir),
    }


def _payload_split(model):
    """Payload bytes of the integer codes and of everything else (scales, biases...)."""
    codes = sum(int(np.prod(v.shape)) for v in model.variables if v.dtype == "int8")
    return {"int8_code_bytes": codes, "other_variable_bytes": variable_bytes(model) - codes}


def _measure_model(name, tmp):
    model = common.load_benchmark_model(name)
    float_sizes = _export_sizes(model, os.path.join(tmp, f"{name}-float"))
    quantized = {}
    for label, bits, first_last in VARIANTS:
        converted, report = kpq.convert(model, bits, bits, quantize_first_last=first_last)
        sizes = _export_sizes(converted, os.path.join(tmp, f"{name}-{label.replace(' ', '-')}"), report, model)
        sizes["ratios"] = {key: sizes[key] / float_sizes[key] for key in float_sizes}
        sizes.update(_payload_split(converted))
        quantized[label] = sizes
    return {"params": int(model.count_params()), "float": float_sizes, "quantized": quantized}


def run(quick=False):
    """Exports each model float and quantized and measures the sizes; returns the raw numbers."""
    entries = []
    with tempfile.TemporaryDirectory(prefix="kpq-bench-sizes-") as tmp:
        for name in QUICK_MODELS if quick else MODELS:
            entry = {"model": name, "description": common.MODELS[name][0]}
            try:
                entries.append({**entry, **_measure_model(name, tmp)})
            except common.Skip as skip:
                entries.append({**entry, "skipped": str(skip)})
            keras.backend.clear_session()
            gc.collect()
    goals = {}
    for bits, limit in GOALS.items():
        for entry in entries:
            if "skipped" not in entry:
                ratio = entry["quantized"][f"W{bits}"]["ratios"]["variables_dir_bytes"]
                goals[f"{entry['model']} W{bits}"] = {"ratio": ratio, "limit": limit, "met": bool(ratio <= limit)}
    return {
        "setting": "kpq.convert(model, bits, bits): data-free PowerQuant, first/last layers at 8 bits",
        "quick": quick,
        "entries": entries,
        "goals": goals,
    }


def plot(result, folder):
    """Bars of the variables/ ratio per model and variant; returns the PNG paths."""
    entries = [e for e in result["entries"] if "skipped" not in e]
    if not entries:
        return []
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(VARIANTS)
    colors = ("#fdae6b", "#e6550d", "#fdd0a2")
    for i, ((label, bits, _), color) in enumerate(zip(VARIANTS, colors)):
        values = [e["quantized"][label]["ratios"]["variables_dir_bytes"] for e in entries]
        positions = [j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(entries))]
        goal = "" if label != f"W{bits}" else f" (goal <= {GOALS[bits]})"
        bars = ax.bar(positions, values, width, color=color, label=label + goal)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    for bits, color in zip(BITS, colors):
        ax.axhline(GOALS[bits], color=color, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(entries)), [e["model"] for e in entries])
    ax.set_ylim(0, max(GOALS.values()) * 1.25)
    ax.set_ylabel("variables/ bytes, quantized / float")
    ax.set_title("Exported SavedModel size relative to float")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    path = os.path.join(folder, "sizes.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(result):
    lines = [
        "## Exported size",
        "",
        f"`{result['setting']}`; `W4 all layers` adds `quantize_first_last=True`. `variables/` = bytes of the "
        "SavedModel's variables folder; `payload` = `variable_bytes` (values only); `SavedModel` = the whole version "
        "folder, graph included; `codes / other` = payload bytes of the int8 codes / of the float32 scales, biases "
        "and float layers.",
        "",
    ]
    rows = []
    for e in result["entries"]:
        if "skipped" in e:
            rows.append([e["model"], "-", f"skipped: {e['skipped']}", "-", "-", "-", "-"])
            continue
        rows.append([e["model"], "float", f"{e['float']['variables_dir_bytes']:,}",
                     f"{e['float']['variable_bytes']:,}", f"{e['float']['saved_model_bytes']:,}", "-", "1"])
        for label, sizes in e["quantized"].items():
            ratios = sizes["ratios"]
            rows.append(
                [e["model"], label,
                 f"{sizes['variables_dir_bytes']:,} ({ratios['variables_dir_bytes']:.3f}x)",
                 f"{sizes['variable_bytes']:,} ({ratios['variable_bytes']:.3f}x)",
                 f"{sizes['saved_model_bytes']:,} ({ratios['saved_model_bytes']:.3f}x)",
                 f"{sizes['int8_code_bytes']:,} / {sizes['other_variable_bytes']:,}",
                 f"{ratios['variables_dir_bytes']:.3f}"]
            )
    lines.append(common.markdown_table(
        ["model", "weights", "variables/ bytes", "payload bytes", "SavedModel bytes", "payload: codes / other",
         "variables/ ratio"], rows
    ))
    lines += ["", "Goals (variables/ ratio, converter defaults):"]
    for key, goal in result["goals"].items():
        lines.append(f"- {key}: {goal['ratio']:.3f} <= {goal['limit']}: {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

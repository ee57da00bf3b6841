"""Per-layer weight reconstruction error: PowerQuant against uniform, at 4 bits.

What is measured: for ResNet-8 and the VWW MobileNetV1, every quantized
layer's kernel reconstruction error `sum (W - W_hat)^2` over the
BatchNorm-folded kernel, at 4 bits for every layer (`quantize_first_last=True`)
with per-output-channel scales, as the conversion report gives it: `error`
at the fitted exponent a*, `uniform_error` at a = 1, and `exponent`.

The report's numbers are checked against the models themselves: the
folded float kernels (`kpq.fold_batch_norms`) against the kernels the
converted PowerQuant and uniform layers decode from their stored integer
codes (`dequantized_kernel()`); the largest relative difference is recorded.

Counted: layers with a* != 1, and among them those where PowerQuant's error
is below uniform's. The search tries a = 1 and keeps it when it is not
beaten, so a* != 1 with a larger error would be a bug; the count checks it.
"""

import os
import sys

import common
import numpy as np

import keras_powerquant as kpq

MODELS = ("resnet8", "vww")
BITS = 4


def _decoded_error(folded, converted, name):
    kernel = np.asarray(folded.get_layer(name).get_weights()[0], dtype=np.float64)
    decoded = np.asarray(converted.get_layer(name).dequantized_kernel(), dtype=np.float64)
    return float(np.sum((kernel - decoded) ** 2))


def _relative_difference(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _measure_model(name):
    model = common.load_benchmark_model(name)
    folded, _ = kpq.fold_batch_norms(model)
    powerquant, report = kpq.convert(model, BITS, BITS, quantize_first_last=True)
    uniform, uniform_report = kpq.convert(model, BITS, BITS, "uniform", quantize_first_last=True)
    layers, check = [], 0.0
    for layer in report.quantized_layers:
        measured = _decoded_error(folded, powerquant, layer.name)
        measured_uniform = _decoded_error(folded, uniform, layer.name)
        check = max(
            check,
            _relative_difference(measured, layer.error),
            _relative_difference(measured_uniform, layer.uniform_error),
            _relative_difference(measured_uniform, uniform_report.layer(layer.name).error),
        )
        layers.append(
            {"name": layer.name, "class_name": layer.class_name, "params": layer.params,
             "bits": layer.weight_bits, "exponent": layer.exponent, "error": layer.error,
             "uniform_error": layer.uniform_error, "ratio": layer.error_ratio}
        )
    fitted = [layer for layer in layers if layer["exponent"] != 1.0]
    ratios = np.array([layer["ratio"] for layer in layers])
    return {
        "layers": layers,
        "quantized_layers": len(layers),
        "layers_with_exponent_not_1": len(fitted),
        "of_which_error_below_uniform": sum(layer["error"] < layer["uniform_error"] for layer in fitted),
        "exponent_range": [min(layer["exponent"] for layer in layers), max(layer["exponent"] for layer in layers)],
        "ratio_median": float(np.median(ratios)),
        "ratio_range": [float(ratios.min()), float(ratios.max())],
        "total_ratio": sum(layer["error"] for layer in layers) / sum(layer["uniform_error"] for layer in layers),
        "max_relative_difference_report_vs_decoded_kernels": check,
    }


def run(quick=False):
    """Converts each model at 4 bits, PowerQuant and uniform; returns per-layer errors.

    `quick` changes nothing: the benchmark takes a few seconds.
    """
    entries = []
    for name in MODELS:
        entry = {"model": name, "description": common.MODELS[name][0]}
        try:
            entries.append({**entry, **_measure_model(name)})
        except common.Skip as skip:
            entries.append({**entry, "skipped": str(skip)})
    return {
        "setting": f"kpq.convert(model, {BITS}, {BITS}, quantize_first_last=True), per-channel scales, p = 2",
        "quick": quick,
        "entries": entries,
    }


def plot(result, folder):
    """Per-layer bars of error / uniform error, one panel per model; returns the PNG paths."""
    entries = [e for e in result["entries"] if "skipped" not in e]
    if not entries:
        return []
    plt = common.pyplot()
    fig, axes = plt.subplots(len(entries), 1, figsize=(9, 3.2 * len(entries)), squeeze=False)
    for ax, entry in zip(axes[:, 0], entries):
        names = [layer["name"] for layer in entry["layers"]]
        colors = ["#3182bd" if "Depthwise" in layer["class_name"] else "#e6550d" for layer in entry["layers"]]
        ax.bar(range(len(names)), [layer["ratio"] for layer in entry["layers"]], color=colors)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("error / uniform error")
        ax.set_title(f"{entry['model']}: {BITS}-bit kernels, PowerQuant vs uniform (blue: depthwise)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(folder, "weight_error.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(result):
    lines = ["## Weight reconstruction error (4 bits)", "", f"`{result['setting']}`.", ""]
    rows = []
    for e in result["entries"]:
        if "skipped" in e:
            rows.append([e["model"], f"skipped: {e['skipped']}"] + ["-"] * 6)
            continue
        rows.append(
            [e["model"], e["quantized_layers"], f"{e['exponent_range'][0]:.3f}-{e['exponent_range'][1]:.3f}",
             f"{e['layers_with_exponent_not_1']} ({e['of_which_error_below_uniform']} with lower error)",
             f"{e['ratio_median']:.3f}", f"{e['ratio_range'][0]:.3f}-{e['ratio_range'][1]:.3f}",
             f"{e['total_ratio']:.3f}", f"{e['max_relative_difference_report_vs_decoded_kernels']:.1e}"]
        )
    lines.append(common.markdown_table(
        ["model", "layers", "a* range", "layers with a* ≠ 1", "median err ratio", "err ratio range",
         "summed err ratio", "report vs decoded"], rows
    ))
    lines += [
        "",
        "`err ratio` = PowerQuant error / uniform error per layer; `report vs decoded` = largest relative "
        "difference between the report's errors and those recomputed from the converted layers' stored codes.",
    ]
    for e in result["entries"]:
        if "skipped" in e:
            continue
        rows = [
            [layer["name"], layer["class_name"], f"{layer['params']:,}", f"{layer['exponent']:.3f}",
             f"{layer['error']:.4g}", f"{layer['uniform_error']:.4g}", f"{layer['ratio']:.3f}"]
            for layer in e["layers"]
        ]
        lines += [
            "", f"<details><summary>{e['model']}: per layer</summary>", "",
            common.markdown_table(["layer", "class", "params", "a*", "error", "uniform error", "ratio"], rows),
            "", "</details>",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

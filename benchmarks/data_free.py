"""Ablation of bias correction, weight clipping and the data-free activation ranges.

What is measured, on two CIFAR-10 models, each on the first 932 test
images (paired: the same images for every row):

- the MLPerf Tiny ResNet-8 (shared data);
- `cifar-demo-cnn`: the architecture of `keras_powerquant.demo` (residual
  blocks, a depthwise layer, BatchNorm everywhere), trained here for
  `DEMO_EPOCHS` epochs on `train_4660.npz`, seeded (a second data point
  with a depthwise layer).

For W8/A8, W4/A8 and W4/A4, uniform (a = 1) and PowerQuant, data-free
(BatchNorm statistics) and calibrated (the first 512 images of
`train_4660.npz`), four settings: `baseline` (neither method),
`+bias` (`bias_correction=True`: analytic data-free, empirical calibrated),
`+clip` (`weight_clipping=True`) and `both`. Data-free rows also show the
v0.1 ranges (`gaussian`: activation ranges fitted on Gaussian samples
instead of Student-t with 10 degrees of freedom, no bias correction), so
the change of the default is measured too. Every setting is compared with
its baseline by McNemar's exact test on the discordant images.

The VWW MobileNetV1 has no labelled data here: for it the benchmark
reports top-1 agreement with the float model and the mean absolute
difference of the probabilities, on 256 uniform random images in [0, 1].

Models are evaluated in memory (`accuracy.py` checks that exported
SavedModels give the same predictions).
"""

import sys
import time

import accuracy
import common
import numpy as np

import keras_powerquant as kpq
from keras_powerquant.converter import statistics as data_free_statistics

BIT_CONFIGS = [(8, 8), (4, 8), (4, 4)]
QUICK_BIT_CONFIGS = [(8, 8), (4, 4)]
METHODS = ("uniform", "powerquant")
SETTINGS = {
    "gaussian": {"bias_correction": False, "weight_clipping": False},
    "baseline": {"bias_correction": False, "weight_clipping": False},
    "+bias": {"bias_correction": True, "weight_clipping": False},
    "+clip": {"bias_correction": False, "weight_clipping": True},
    "both": {"bias_correction": True, "weight_clipping": True},
}
CALIBRATION_IMAGES = 512
DEMO_EPOCHS = 12
VWW_IMAGES = 256
BATCH_SIZE = 256


def _predict(model, x):
    return np.asarray(model.predict(x, batch_size=BATCH_SIZE, verbose=0))


def _convert(model, wbits, abits, method, setting, calibration):
    options = dict(SETTINGS[setting])
    tails = data_free_statistics.DATA_FREE_TAIL_DOF, data_free_statistics.HIGH_BITS_TAIL_DOF
    if setting == "gaussian":
        # The v0.1 data-free ranges: Gaussian samples (module settings, restored below).
        data_free_statistics.DATA_FREE_TAIL_DOF = data_free_statistics.HIGH_BITS_TAIL_DOF = None
    try:
        started = time.perf_counter()
        quantized, report = kpq.convert(model, wbits, abits, method, calibration_data=calibration, **options)
        seconds = time.perf_counter() - started
    finally:
        data_free_statistics.DATA_FREE_TAIL_DOF, data_free_statistics.HIGH_BITS_TAIL_DOF = tails
    return quantized, report, seconds


def _demo_model(x, y):
    from keras_powerquant.demo import train_demo_model

    return train_demo_model(x, y, epochs=DEMO_EPOCHS, seed=0, verbose=False)


def _classifier_rows(name, model, x, y, calibration, configs):
    float_hits = _predict(model, x).argmax(1) == y
    rows = [{"model": name, "name": "float", "top1": float(float_hits.mean())}]
    hits = {}
    for wbits, abits in configs:
        for calibration_name in ("data-free", "calibrated"):
            data = calibration if calibration_name == "calibrated" else None
            for method in METHODS:
                for setting in SETTINGS:
                    if setting == "gaussian" and data is not None:
                        continue
                    quantized, report, seconds = _convert(model, wbits, abits, method, setting, data)
                    key = (wbits, abits, calibration_name, method, setting)
                    hits[key] = _predict(quantized, x).argmax(1) == y
                    rows.append({
                        "model": name, "name": f"W{wbits}/A{abits} {method} {calibration_name} {setting}",
                        "wbits": wbits, "abits": abits, "calibration": calibration_name, "method": method,
                        "setting": setting, "top1": float(hits[key].mean()), "convert_seconds": seconds,
                        "weight_clips": [layer.weight_clip for layer in report.quantized_layers],
                        "bias_shifts": [layer.bias_shift for layer in report.quantized_layers],
                    })
                    print(f"{name} {rows[-1]['name']}: {rows[-1]['top1'] * 100:.2f}", file=sys.stderr, flush=True)
    pairs = []
    for (wbits, abits, calibration_name, method, setting), setting_hits in hits.items():
        if setting != "baseline":
            base = hits[(wbits, abits, calibration_name, method, "baseline")]
            pairs.append({"model": name, "bits": f"W{wbits}/A{abits}", "calibration": calibration_name,
                          "method": method, "a": setting, "b": "baseline",
                          **accuracy.paired_comparison(setting_hits, base)})
    for wbits, abits in configs:
        for method in METHODS:
            free = hits[(wbits, abits, "data-free", method, "+bias")]
            calibrated = hits[(wbits, abits, "calibrated", method, "+bias")]
            pairs.append({"model": name, "bits": f"W{wbits}/A{abits}", "calibration": "data-free vs calibrated",
                          "method": method, "a": "+bias data-free", "b": "+bias calibrated",
                          **accuracy.paired_comparison(free, calibrated)})
        for calibration_name in ("data-free", "calibrated"):
            for setting in ("+bias", "both"):
                pq = hits[(wbits, abits, calibration_name, "powerquant", setting)]
                uniform = hits[(wbits, abits, calibration_name, "uniform", setting)]
                pairs.append({"model": name, "bits": f"W{wbits}/A{abits}", "calibration": calibration_name,
                              "method": "powerquant vs uniform", "a": setting, "b": setting,
                              **accuracy.paired_comparison(pq, uniform)})
    return rows, pairs


def _vww_rows(configs):
    model = common.load_benchmark_model("vww")
    x = common.random_inputs("vww", model, VWW_IMAGES)
    reference = _predict(model, x)
    rows = []
    for wbits, abits in configs:
        for method in METHODS:
            for setting in SETTINGS:
                quantized, report, seconds = _convert(model, wbits, abits, method, setting, None)
                outputs = _predict(quantized, x)
                rows.append({
                    "model": "vww", "name": f"W{wbits}/A{abits} {method} data-free {setting}",
                    "wbits": wbits, "abits": abits, "method": method, "setting": setting,
                    "top1_agreement": float(np.mean(outputs.argmax(1) == reference.argmax(1))),
                    "mean_abs_probability_difference": float(np.mean(np.abs(outputs - reference))),
                    "convert_seconds": seconds,
                    "corrected_layers": sum(layer.bias_shift is not None for layer in report.quantized_layers),
                })
                print(f"vww {rows[-1]['name']}: {rows[-1]['top1_agreement'] * 100:.1f}", file=sys.stderr, flush=True)
    return rows


def run(quick=False):
    configs = QUICK_BIT_CONFIGS if quick else BIT_CONFIGS
    try:
        x, y = common.cifar_test()
        train = np.load(common.shared_file(common.CIFAR_TRAIN_FILE))
        resnet8 = common.load_benchmark_model("resnet8")
    except common.Skip as skip:
        return {"skipped": str(skip)}
    calibration = train["x"][:CALIBRATION_IMAGES].astype(np.float32)
    rows, pairs = _classifier_rows("resnet8", resnet8, x, y, calibration, configs)
    started = time.perf_counter()
    demo = _demo_model(train["x"].astype(np.float32), train["y"].astype(np.int64))
    demo_seconds = time.perf_counter() - started
    demo_rows, demo_pairs = _classifier_rows("cifar-demo-cnn", demo, x, y, calibration, configs)
    try:
        vww = _vww_rows(configs)
    except common.Skip as skip:
        vww = {"skipped": str(skip)}
    return {
        "test_data": f"{common.CIFAR_TEST_FILE} (raw 0-255 float32)",
        "calibration_data": f"first {CALIBRATION_IMAGES} images of {common.CIFAR_TRAIN_FILE}",
        "demo_model": f"keras_powerquant.demo.build_demo_model trained {DEMO_EPOCHS} epochs on all "
                      f"{len(train['y'])} images of {common.CIFAR_TRAIN_FILE}, seed 0 ({demo_seconds:.0f} s)",
        "images": int(len(y)),
        "quick": quick,
        "results": rows + demo_rows,
        "pairs": pairs + demo_pairs,
        "vww": vww,
    }


def plot(result, folder):
    return []


def _pct(value):
    return f"{value * 100:.2f}"


def markdown(result):
    lines = ["## Data-free accuracy: bias correction, weight clipping, activation ranges", ""]
    if "skipped" in result:
        return "\n".join(lines + [f"Skipped: {result['skipped']}."])
    lines += [
        f"Top-1 % on {result['test_data']}, n = {result['images']} (the same images for every row); "
        f"calibration on the {result['calibration_data']}. Second model: {result['demo_model']}. "
        "`gaussian` = v0.1's data-free ranges (Gaussian samples) without bias correction; `baseline` = "
        "the new ranges (Student-t, 10 dof), neither method; `+bias` = `bias_correction=True` "
        "(analytic data-free, empirical calibrated); `+clip` = `weight_clipping=True`; `both`. "
        "First and last layers at 8 bits. Models evaluated in memory.",
        "",
    ]
    table = {}
    for row in result["results"]:
        if row["name"] == "float":
            table[(row["model"], "float")] = row["top1"]
            continue
        key = (row["model"], row["wbits"], row["abits"], row["calibration"], row["method"], row["setting"])
        table[key] = row["top1"]
    settings = list(SETTINGS)
    for model in dict.fromkeys(r["model"] for r in result["results"]):
        lines += [f"**{model}** (float {_pct(table[(model, 'float')])})", ""]
        rows = []
        for key in table:
            if key[0] != model or key[1] == "float" or key[-1] != "baseline":
                continue
            _, wbits, abits, calibration, method, _ = key
            cells = [table.get((model, wbits, abits, calibration, method, s)) for s in settings]
            rows.append([f"W{wbits}/A{abits}", calibration, method] + ["-" if c is None else _pct(c) for c in cells])
        lines += [common.markdown_table(["bits", "activations", "method"] + settings, rows), ""]
    lines += [
        "Paired comparisons (same images): images right only in `a` / only in `b`, Δ top-1 (a - b) ± "
        "paired standard error, McNemar's exact p.",
        "",
    ]
    rows = [
        [p["model"], p["bits"], p["calibration"], p["method"], f"{p['a']} vs {p['b']}", p["right_only_a"],
         p["right_only_b"], f"{p['difference'] * 100:+.2f} ± {p['stderr'] * 100:.2f}", f"{p['mcnemar_p']:.3g}"]
        for p in result["pairs"]
    ]
    lines += [common.markdown_table(
        ["model", "bits", "activations", "method", "a vs b", "a only", "b only", "Δ top-1", "p"], rows), ""]
    vww = result["vww"]
    if isinstance(vww, dict):
        lines.append(f"VWW: skipped ({vww['skipped']}).")
    else:
        lines += [
            "**VWW MobileNetV1** (no labels): top-1 agreement with float (%) / mean absolute difference of "
            "probabilities on "
            f"{VWW_IMAGES} uniform random images, data-free.",
            "",
        ]
        rows = [[r["name"], f"{r['top1_agreement'] * 100:.1f}", f"{r['mean_abs_probability_difference']:.4f}",
                 r["corrected_layers"], f"{r['convert_seconds']:.1f}"] for r in vww]
        header = ["conversion", "agreement %", "mean abs Δp", "corrected layers", "convert s"]
        lines.append(common.markdown_table(header, rows))
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

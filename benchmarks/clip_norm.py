"""Does the norm p of the fitted error matter? Weight clipping at p = 2, 3, 4, paired.

Issue 7 asks for the weight clip fraction to be fitted jointly with the
exponent, "and the p of the norm, where the benchmarks show it matters".
`convert(p=...)` sets the norm of every per-layer fit (weights and
activations, `sum |x - x_hat|^p`); larger p weighs the large errors that
clipping creates more, so it clips less.

What is measured: the shared ResNet-8 on the first 932 CIFAR-10 test images
at W4/A4 and W4/A8 (first and last layers at 8 bits), uniform (a = 1) and
PowerQuant (the default, fast activation exponents), data-free and
calibrated on the first 512 images of `train_4660.npz`; for each: today's
default (p = 2, no weight clipping) and `weight_clipping=True` at p = 2, 3
and 4. Every row is compared paired (McNemar's exact test) with the default
of its setting. Models are evaluated in memory.

`python benchmarks/clip_norm.py [--json benchmarks/clip_norm.json]`
(about 5 minutes on 2 cores).
"""

import sys
import time

import common
import numpy as np
from accuracy import paired_comparison

BIT_CONFIGS = [(4, 4), (4, 8)]
METHODS = ("uniform", "powerquant")
CALIBRATIONS = ("data-free", "calibrated")
# (label, weight_clipping, p); the first is the default every row is compared with.
FITS = [("default (p = 2, no clip)", False, 2.0), ("clip, p = 2", True, 2.0), ("clip, p = 3", True, 3.0),
        ("clip, p = 4", True, 4.0)]

def _mean_clip(report):
    fractions = [layer.clip_fraction for layer in report.quantized_layers if layer.clip_fraction is not None]
    return float(np.mean(fractions)) if fractions else 1.0


def run(quick=False):
    try:
        model = common.load_benchmark_model("resnet8")
        x, y = common.cifar_test()
        calibration = common.cifar_calibration(512)
    except common.Skip as skip:
        return {"skipped": str(skip)}
    rows = []
    configs = BIT_CONFIGS[:1] if quick else BIT_CONFIGS
    for wbits, abits in configs:
        for calibration_name in CALIBRATIONS:
            data = calibration if calibration_name == "calibrated" else None
            for method in METHODS:
                baseline = None
                for label, clipping, p in FITS:
                    started = time.perf_counter()
                    quantized, report = common.convert_variant(
                        model, wbits, abits, method, calibration_data=data, weight_clipping=clipping, p=p
                    )
                    hits = common.top1_hits(quantized, x, y)
                    row = {
                        "bits": common.bits_label(wbits, abits),
                        "calibration": calibration_name,
                        "method": method,
                        "fit": label,
                        "weight_clipping": clipping,
                        "p": p,
                        "top1": float(hits.mean()),
                        "images": int(len(y)),
                        "mean_clip_fraction": _mean_clip(report),
                        "convert_seconds": time.perf_counter() - started,
                    }
                    if baseline is None:
                        baseline = hits
                    else:
                        row["vs_default"] = paired_comparison(hits, baseline)
                    rows.append(row)
                    print(f"{row['bits']} {calibration_name} {method} {label}: {row['top1'] * 100:.2f}%",
                          file=sys.stderr)
    return {
        "model": common.MODELS["resnet8"][0],
        "test_data": common.CIFAR_TEST_FILE,
        "calibration_data": f"first 512 images of {common.CIFAR_TRAIN_FILE}",
        "images": int(len(y)),
        "quick": quick,
        "rows": rows,
        "machine": common.machine_description(),
    }


def plot(result, folder):
    return []


def markdown(result):
    lines = ["## Weight clipping: the norm p of the fit (ResNet-8)", ""]
    if "skipped" in result:
        return "\n".join(lines + [f"Skipped: {result['skipped']}."])
    lines += [
        f"{result['model']} on {result['test_data']}, n = {result['images']} (the same images for every row); "
        f"calibration on the {result['calibration_data']}. First and last layers at 8 bits; models evaluated "
        "in memory. Each row against the default of its setting (p = 2, no clipping), paired: the difference "
        "of top-1 ± its paired standard error and McNemar's exact p. `mean clip` is the mean fitted weight "
        "clip fraction over the quantized layers.",
        "",
    ]
    table = []
    for row in result["rows"]:
        pair = row.get("vs_default")
        versus = "-" if pair is None else (
            f"{pair['difference'] * 100:+.2f} ± {pair['stderr'] * 100:.2f} (p = {pair['mcnemar_p']:.2g})"
        )
        table.append([row["bits"], row["calibration"], row["method"], row["fit"], f"{row['top1'] * 100:.2f}",
                      f"{row['mean_clip_fraction']:.3f}", versus])
    lines.append(common.markdown_table(
        ["bits", "activations", "method", "fit", "top-1 %", "mean clip", "vs default"], table
    ))
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

"""Ablation: cost of the TensorFlow ops that can implement a power-quantized ReLU.

What is measured: the wall time of one call of a compiled `tf.function` on
a fixed (16, 32, 32, 16) float32 tensor (normal pre-activations), on CPU,
at 4 and 8 bits, for five implementations of `y = relu` followed by
activation quantization with exponent `a` and clip `c`:

- `bucketize+gather`: docs/method.md §2's threshold formulation, `Bucketize` of `x`
  against the 2^b - 1 thresholds `c ((k - 1/2) / M)^(1/a)` (which also
  clips, and sends negatives to code 0) and `GatherV2` of the 2^b levels;
- `power-domain chain`: `PowerQuantActivation`'s own call, relu,
  `exp(a log x)`, `FakeQuantWithMinMaxArgs` on `[0, c^a]`,
  `exp(log(u) / a)`;
- `square-root chain (a = 1/2)`: `PowerQuantActivation` with `a = 1/2`,
  relu, sqrt, FakeQuant, square (the form `fast_activations` uses);
- `fakequant (a = 1)`: `PowerQuantActivation` with `a = 1`, one
  `FakeQuantWithMinMaxArgs` (uniform quantization);
- `relu`: the float activation alone.

Calls are interleaved (rotating order); the median of many calls is
reported with the count. The power quantizers are also compared with
the numpy reference `ActivationQuantizer.quantize` (of their own exponent): the fraction of elements
quantized to another code (an input within float32 rounding of a threshold
can take the neighbouring one) and the largest float difference elsewhere. This documents why the layer
uses the power-domain chain.
"""

import os
import sys

import common
import numpy as np
import tensorflow as tf

from keras_powerquant.layers import PowerQuantActivation
from keras_powerquant.quantization import ActivationQuantizer

SHAPE = (16, 32, 32, 16)
BITS = (4, 8)
EXPONENT, CLIP = 0.6, 3.0
ITERATIONS = {False: 500, True: 100}


def _variants(bits):
    """`(functions, references)`: each implementation, and the numpy quantizer it should match."""
    reference = ActivationQuantizer(bits, EXPONENT, CLIP)
    thresholds = [float(t) for t in reference.thresholds()]
    levels = tf.constant(reference.levels())
    spec = [tf.TensorSpec(SHAPE, tf.float32)]

    def bucketize(x):
        return tf.gather(levels, tf.raw_ops.Bucketize(input=x, boundaries=thresholds))

    functions = {
        "bucketize+gather": bucketize,
        "power-domain chain": PowerQuantActivation("relu", bits, EXPONENT, CLIP),
        "square-root chain (a = 1/2)": PowerQuantActivation("relu", bits, 0.5, CLIP),
        "fakequant (a = 1)": PowerQuantActivation("relu", bits, 1.0, CLIP),
        "relu": tf.nn.relu,
    }
    references = {
        "bucketize+gather": reference,
        "power-domain chain": reference,
        "square-root chain (a = 1/2)": ActivationQuantizer(bits, 0.5, CLIP),
    }
    return {name: tf.function(fn, input_signature=spec) for name, fn in functions.items()}, references


def _agreement(outputs, x, reference):
    """How `outputs` compare with `reference.quantize(x)`: codes and float error."""
    levels = reference.levels().astype(np.float64)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = np.searchsorted(midpoints, outputs)
    expected_codes = reference.encode(x)
    same = codes == expected_codes
    error = np.abs(outputs.astype(np.float64) - reference.decode(expected_codes))
    return {
        "fraction_other_code": float(np.mean(~same)),
        "max_abs_error_same_code": float(np.max(error[same])),
    }


def run(quick=False):
    """Times each implementation at each bit width; returns the raw numbers."""
    x = np.random.default_rng(common.SEED).normal(0.0, 1.5, SHAPE).astype(np.float32)
    inputs = tf.constant(x)
    entries = []
    for bits in BITS:
        functions, references = _variants(bits)
        agreement = {
            name: _agreement(functions[name](inputs).numpy(), x, reference)
            for name, reference in references.items()
        }
        times = common.interleaved_timings(
            {name: (lambda f=f: f(inputs)) for name, f in functions.items()}, ITERATIONS[quick], warmup=10
        )
        summaries = {name: common.time_summary(seconds) for name, seconds in times.items()}
        entries.append(
            {
                "bits": bits,
                "times": summaries,
                "ratio_to_relu": {n: s["median_ms"] / summaries["relu"]["median_ms"] for n, s in summaries.items()},
                "bucketize_over_chain": summaries["bucketize+gather"]["median_ms"]
                / summaries["power-domain chain"]["median_ms"],
                "agreement_with_numpy_reference": agreement,
            }
        )
    return {
        "tensor_shape": list(SHAPE),
        "input": "normal(0, 1.5) float32, seed 0",
        "exponent": EXPONENT,
        "clip": CLIP,
        "quick": quick,
        "load_average": common.load_average(),
        "entries": entries,
    }


def plot(result, folder):
    """Bars of median time per implementation and bit width; returns the PNG paths."""
    plt = common.pyplot()
    names = list(result["entries"][0]["times"])
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    width = 0.8 / len(result["entries"])
    for i, entry in enumerate(result["entries"]):
        values = [entry["times"][name]["median_ms"] for name in names]
        bars = ax.bar(np.arange(len(names)) + (i - (len(result["entries"]) - 1) / 2) * width, values, width,
                      label=f"{entry['bits']} bits", color=("#fdae6b", "#e6550d")[i % 2])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("median ms per call")
    ax.set_title(f"Quantized ReLU on a {tuple(result['tensor_shape'])} tensor (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(folder, "activation_ops.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def markdown(result):
    lines = [
        "## Ablation: activation quantization ops",
        "",
        f"One compiled `tf.function` call on a {tuple(result['tensor_shape'])} tensor ({result['input']}), "
        f"a = {result['exponent']}, c = {result['clip']}, CPU, interleaved. Against the numpy "
        "reference `ActivationQuantizer.quantize`: `other code` = fraction of elements quantized to "
        "another level, `max err` = largest float difference on the elements with the same code.",
        "",
    ]
    rows = []
    for entry in result["entries"]:
        for name, summary in entry["times"].items():
            agreement = entry["agreement_with_numpy_reference"].get(name)
            rows.append(
                [entry["bits"], name, f"{summary['median_ms']:.3f}",
                 f"{summary['p25_ms']:.3f}-{summary['p75_ms']:.3f}", summary["count"],
                 f"{entry['ratio_to_relu'][name]:.2f}",
                 "-" if agreement is None else f"{agreement['fraction_other_code']:.1e}",
                 "-" if agreement is None else f"{agreement['max_abs_error_same_code']:.1e}"]
            )
    lines.append(common.markdown_table(
        ["bits", "implementation", "median ms", "p25-p75 ms", "calls", "× relu", "other code", "max err"], rows
    ))
    lines.append("")
    for entry in result["entries"]:
        lines.append(
            f"- {entry['bits']} bits: bucketize+gather takes {entry['bucketize_over_chain']:.2f}x "
            "the time of the power-domain chain."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    common.main(sys.modules[__name__])

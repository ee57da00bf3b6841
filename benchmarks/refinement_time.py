"""Refinement time on a ResNet-50-size model: keras.applications ResNet50, random weights, CPU.

What is measured: `kpq.convert(..., refine=steps)` of ResNet50 (weights=None,
seeded; 25.6M parameters) at W4/A4 with 64 deterministic random calibration
images, refinement on a subsample of `REFINE_SAMPLES` of them: the time of
each refinement step of `refine=True`, its number of network evaluations,
and so the time of one evaluation. Learned rounding runs
`ROUNDING_ITERATIONS` gradient steps per layer instead of the default's
200 (each step is one batch of 32 samples through one layer, so its time
grows linearly with the iterations): the table gives its seconds per
iteration. The loss values of a random-weight model mean nothing; only the
times are reported. `--quick` measures the `grid` step alone.

`python benchmarks/refinement_time.py [--quick] [--json benchmarks/refinement_time.json]`
"""

import sys
import time

import common

REFINE_SAMPLES = 4
LAPQ_EVALUATIONS = 20
ROUNDING_ITERATIONS = 20


def run(quick=False):
    model = common.load_benchmark_model("resnet50")
    calibration = common.random_inputs("resnet50", model, 64)
    steps = ["grid"] if quick else list(common.kpq.ConversionConfig(refine=True).refine)
    started = time.perf_counter()
    _, report = common.kpq.convert(
        model,
        4,
        4,
        calibration_data=calibration,
        refine=steps,
        refine_samples=REFINE_SAMPLES,
        refine_evaluations=LAPQ_EVALUATIONS,
        rounding_iterations=ROUNDING_ITERATIONS,
    )
    total = time.perf_counter() - started
    return {
        "machine": common.machine_description(),
        "model": common.MODELS["resnet50"][0],
        "parameters": int(model.count_params()),
        "refine_samples": REFINE_SAMPLES,
        "lapq_evaluations": LAPQ_EVALUATIONS,
        "rounding_iterations": ROUNDING_ITERATIONS,
        "convert_seconds": total,
        "stage_seconds": report.seconds,
        "steps": [
            {k: step[k] for k in ("name", "seconds", "evaluations")} for step in report.refinement
        ],
        "quantized_layers": len(report.quantized_layers),
        "activation_quantizers": len(report.activations),
    }


def markdown(result):
    iterations = result["rounding_iterations"] * result["quantized_layers"]
    rows = [
        [
            step["name"],
            step["evaluations"],
            f"{step['seconds']:.0f}",
            f"{step['seconds'] / max(step['evaluations'], 1):.2f}",
            f"{step['seconds'] / iterations:.3f} ({iterations} iterations)" if step["name"] == "rounding" else "",
        ]
        for step in result["steps"]
    ]
    return "\n".join(
        [
            "## Refinement time, ResNet-50 (CPU)",
            "",
            f"Command: `python benchmarks/refinement_time.py --json benchmarks/refinement_time.json`. "
            f"{result['model']}, {result['parameters']:,} parameters, {result['quantized_layers']} quantized layers, "
            f"{result['activation_quantizers']} activation quantizers; W4/A4, refinement on {result['refine_samples']} "
            f"random 224x224 images, LAPQ budget {result['lapq_evaluations']} evaluations. Whole `convert` "
            f"{result['convert_seconds']:.0f} s, of which refinement "
            f"{result['stage_seconds'].get('refinement', 0):.0f} s. "
            f"Learned rounding ran {result['rounding_iterations']} gradient steps per layer (the default is 200: "
            "its time grows linearly with them). Shared 2-core machine (other jobs running): upper bounds. "
            "Nothing was measured on a GPU (none on the development machines). An evaluation's time grows "
            "linearly with `refine_samples`.",
            "",
            common.markdown_table(
                ["step", "evaluations", "seconds", "seconds per evaluation", "rounding: seconds per iteration"], rows
            ),
        ]
    )


def plot(result, folder):
    return []


if __name__ == "__main__":
    common.main(sys.modules[__name__])

"""Refinement memory: peak memory of a refined conversion as the calibration set grows.

What is measured: `kpq.convert(resnet8, 4, 4, calibration_data=dataset,
refine=["grid"])` with the calibration images streamed from a
`tf.data.Dataset` (batches of 32, CIFAR-10 training images of
`train_4660.npz` cycled to reach the size), for several set sizes, each in
a fresh process. Reported: the process' peak resident memory (`ru_maxrss`)
before `convert` (model, data and TensorFlow loaded) and after it, and
their difference, which is what conversion added. Statistics keep bounded
samples per quantizer and refinement a fixed-size reservoir
(`refine_samples`, 256), so the difference should not grow with the set.
The `grid` step stands for every step: they all evaluate the same held
subsample.

`python benchmarks/refinement_memory.py [--quick] [--json benchmarks/refinement_memory.json]`
"""

import json
import os
import subprocess
import sys

import common

SIZES = (512, 4660, 18640)
QUICK_SIZES = (512, 4660)

# Runs in a fresh process per size, so each peak is that conversion's alone.
_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[2])
import common
import numpy as np
import tensorflow as tf
import keras_powerquant as kpq

size = int(sys.argv[1])
model = common.load_benchmark_model("resnet8")
images = np.load(common.shared_file(common.CIFAR_TRAIN_FILE))["x"]
dataset = (
    tf.data.Dataset.from_tensor_slices(images).repeat().take(size)
    .map(lambda x: tf.cast(x, tf.float32)).batch(32)
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_, report = kpq.convert(model, 4, 4, calibration_data=dataset, refine=["grid"])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"size": size, "peak_before_mib": before / 1024, "peak_after_mib": after / 1024,
                  "seconds": report.seconds}))
"""


def _measure(size):
    here = os.path.dirname(os.path.abspath(__file__))
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, str(size), here], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the conversion with {size} calibration images failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(quick=False):
    if not common.shared_data_dir().is_dir():
        return {"skipped": f"shared data folder {common.shared_data_dir()} not found"}
    rows = []
    for size in QUICK_SIZES if quick else SIZES:
        row = _measure(size)
        print(f"{size} images: +{row['peak_after_mib'] - row['peak_before_mib']:.0f} MiB", file=sys.stderr)
        rows.append(row)
    return {"machine": common.machine_description(), "rows": rows}


def markdown(result):
    if "skipped" in result:
        return f"## Refinement memory\n\nSkipped: {result['skipped']}."
    rows = [
        [
            f"{row['size']:,}",
            f"{row['peak_before_mib']:.0f}",
            f"{row['peak_after_mib']:.0f}",
            f"{row['peak_after_mib'] - row['peak_before_mib']:.0f}",
            f"{row['seconds']['total']:.0f}",
        ]
        for row in result["rows"]
    ]
    return "\n".join(
        [
            "## Refinement memory (ResNet-8, streamed calibration set)",
            "",
            "Command: `python benchmarks/refinement_memory.py --json benchmarks/refinement_memory.json`. "
            "`convert(resnet8, 4, 4, calibration_data=<tf.data.Dataset of N images>, refine=[\"grid\"])`, "
            "one fresh process per N; peak resident memory (`ru_maxrss`) before and after `convert`. "
            f"Machine: {result['machine']['cpu']}, commit {result['machine']['git_commit']}, "
            f"{result['machine']['date']}.",
            "",
            common.markdown_table(
                ["calibration images", "peak before convert MiB", "peak after MiB", "added MiB", "convert s"], rows
            ),
        ]
    )


def plot(result, folder):
    return []


if __name__ == "__main__":
    common.main(sys.modules[__name__])

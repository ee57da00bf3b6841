"""Selection of the data-free tail model on held-out training images (not test images).

Converts the shared ResNet-8 data-free (default bias correction) with the
activation ranges fitted on Gaussian samples and on Student-t samples with
10 and 5 degrees of freedom, at W8/A8, W4/A8 and W4/A4, uniform and
PowerQuant, with and without weight clipping, and measures top-1 on
`train_4660.npz[1024:]` (3,636 training images outside the 512 used for
calibration elsewhere). The model was trained on these images, so this is a
selection set, never a test set: the test images stay for `data_free.py`.

`python benchmarks/data_free_tails.py [--json benchmarks/data_free_tails.json]`
"""

import argparse
import json

import common
import numpy as np

import keras_powerquant as kpq
from keras_powerquant.converter import statistics as data_free_statistics

TAILS = (None, 10, 5)
BIT_CONFIGS = [(8, 8), (4, 8), (4, 4)]
FIRST_SELECTION_IMAGE = 1024


def _top1(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y)) * 100


def run():
    model = common.load_benchmark_model("resnet8")
    data = np.load(common.shared_file(common.CIFAR_TRAIN_FILE))
    x = data["x"][FIRST_SELECTION_IMAGE:].astype(np.float32)
    y = data["y"][FIRST_SELECTION_IMAGE:].astype(np.int64)
    results = [{"dof": "float", "top1": _top1(model, x, y)}]
    default_tail = data_free_statistics.DATA_FREE_TAIL_DOF
    default_high = data_free_statistics.HIGH_BITS_TAIL_DOF
    try:
        for dof in TAILS:
            # Every bit width on the same tails (8-bit quantizers have their own default since issue 20).
            data_free_statistics.DATA_FREE_TAIL_DOF = data_free_statistics.HIGH_BITS_TAIL_DOF = dof
            for wbits, abits in BIT_CONFIGS:
                for method in ("powerquant", "uniform"):
                    for clip in (False, True):
                        quantized, _ = kpq.convert(model, wbits, abits, method, weight_clipping=clip)
                        results.append({"dof": dof, "wb": wbits, "ab": abits, "method": method, "clip": clip,
                                        "acc": _top1(quantized, x, y)})
                        print(results[-1], flush=True)
    finally:
        data_free_statistics.DATA_FREE_TAIL_DOF = default_tail
        data_free_statistics.HIGH_BITS_TAIL_DOF = default_high
    return {"selection_images": f"{common.CIFAR_TRAIN_FILE}[{FIRST_SELECTION_IMAGE}:]", "images": int(len(y)),
            "results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    result = run()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=1)

"""Data-free W8/A8 on a separable-convolution residual CIFAR-10 model (issue 20).

The model is a small Xception: `SeparableConv2D` blocks (the depthwise and
pointwise halves with no BatchNorm between them, BatchNorm after the
pointwise), 1x1 strided shortcuts and identity shortcuts joined by `Add`,
ReLU before each separable convolution, global average pooling, Dense. It is
trained here, seeded and deterministic, on `cifar10/train_4660.npz`
(`EPOCHS` epochs, a few minutes on 2 cores) and cached in
`KPQ_BENCH_CACHE` (default `~/.cache/kpq-benchmarks`).

Measured on the first 932 CIFAR-10 test images (held out, paired: the same
images for every row): float top-1, quantized top-1 and argmax agreement with
the float model, for W8/A8 data-free PowerQuant and uniform (a = 1) through
the same `kpq.convert` pipeline; calibrated (512 training images) and
weight-only W8 rows as references. Also the shared MLPerf Tiny ResNet-8
data-free W8/A8 (must not get worse).

`python benchmarks/separable_data_free.py --label after --imagenet [--json benchmarks/separable_data_free.json]`
merges the run under `--label` into the json file (so a `before` run of an
older commit and an `after` run sit side by side); `--before-rules` switches
the data-free rules back to those before issue 20 on this commit (the
`before` label was measured so for EfficientNet-Lite2, and on the commit
before the change for the CIFAR models; both give the same CIFAR numbers).
`--imagenet` adds EfficientNet-Lite2 W8/A8 data-free on the 650 shared
ImageNet images (data-free: none is fitted on).
"""

import argparse
import json
import os
import pathlib
import time

import common
import keras
import numpy as np

import keras_powerquant as kpq

EPOCHS = 14
SEED = 0
CALIBRATION_IMAGES = 512
L = keras.layers


def build_model():
    inputs = keras.Input((32, 32, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = L.Conv2D(32, 3, padding="same", use_bias=False, name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for i, filters in enumerate((64, 128)):
        shortcut = L.Conv2D(filters, 1, strides=2, padding="same", use_bias=False, name=f"b{i}_short")(x)
        shortcut = L.BatchNormalization(name=f"b{i}_short_bn")(shortcut)
        y = x if i == 0 else L.ReLU(name=f"b{i}_relu0")(x)
        y = L.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"b{i}_sep1")(y)
        y = L.BatchNormalization(name=f"b{i}_sep1_bn")(y)
        y = L.ReLU(name=f"b{i}_relu1")(y)
        y = L.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"b{i}_sep2")(y)
        y = L.BatchNormalization(name=f"b{i}_sep2_bn")(y)
        y = L.MaxPooling2D(3, strides=2, padding="same", name=f"b{i}_pool")(y)
        x = L.Add(name=f"b{i}_add")([y, shortcut])
    for i in range(2, 4):  # middle flow: identity shortcuts
        y = x
        for j in range(2):
            y = L.ReLU(name=f"b{i}_relu{j}")(y)
            y = L.SeparableConv2D(128, 3, padding="same", use_bias=False, name=f"b{i}_sep{j}")(y)
            y = L.BatchNormalization(name=f"b{i}_sep{j}_bn")(y)
        x = L.Add(name=f"b{i}_add")([x, y])
    x = L.ReLU(name="exit_relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(10, activation="softmax", name="logits")(x)
    return keras.Model(inputs, outputs, name="cifar_mini_xception")


def _cache_dir():
    return pathlib.Path(os.environ.get("KPQ_BENCH_CACHE", pathlib.Path.home() / ".cache" / "kpq-benchmarks"))


def trained_model(verbose=0):
    """The benchmark's float model: trained once (seeded, deterministic), then cached."""
    path = _cache_dir() / f"cifar_mini_xception_e{EPOCHS}_s{SEED}.weights.h5"
    keras.utils.set_random_seed(SEED)
    model = build_model()
    if path.is_file():
        model.load_weights(path)
        return model
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    data = np.load(common.shared_file(common.CIFAR_TRAIN_FILE))
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    rng = np.random.default_rng(SEED)

    def augment(images):  # random horizontal flips and 4-pixel shifts, from the seeded generator
        flips = rng.random(len(images)) < 0.5
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
        dx, dy = rng.integers(0, 9, 2)
        return padded[:, dy:dy + 32, dx:dx + 32]

    schedule = keras.optimizers.schedules.CosineDecay(2e-3, EPOCHS * ((len(x) + 63) // 64))
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])
    for _ in range(EPOCHS):
        order = rng.permutation(len(x))
        model.fit(augment(x[order]), y[order], batch_size=64, epochs=1, shuffle=False, verbose=verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(path)
    return model


def _predict(model, x):
    return np.asarray(model.predict(x, batch_size=256, verbose=0))


def _row(name, model, float_probs, x, y, **options):
    started = time.perf_counter()
    quantized, report = kpq.convert(model, **options)
    seconds = time.perf_counter() - started
    probs = _predict(quantized, x)
    row = {
        "model": name,
        **{k: v for k, v in options.items() if k != "calibration_data"},
        "calibration": "data-free" if "calibration_data" not in options else f"{CALIBRATION_IMAGES} train images",
        "float_top1": float(np.mean(np.argmax(float_probs, -1) == y) * 100),
        "top1": float(np.mean(np.argmax(probs, -1) == y) * 100),
        "agreement": float(np.mean(np.argmax(probs, -1) == np.argmax(float_probs, -1))),
        "convert_seconds": round(seconds, 1),
    }
    print(row, flush=True)
    return row, report


def before_rules():
    """Switches the data-free rules back to those before issue 20 (exactly: same code paths)."""
    import functools

    from keras_powerquant.converter import statistics as converter_statistics
    from keras_powerquant.quantization import statistics as quantization_statistics

    converter_statistics.HIGH_BITS_TAIL_DOF = converter_statistics.DATA_FREE_TAIL_DOF
    converter_statistics.linear_gaussians = functools.partial(
        quantization_statistics.linear_gaussians, correlations=(0.0,))
    converter_statistics._max_pooled = lambda layer, stats: stats
    converter_statistics._average_pooled = lambda op, stats: stats


def imagenet_rows():
    """EfficientNet-Lite2 W8/A8 data-free on all 650 images (nothing is fitted on them)."""
    from calibration_time import imagenet

    x, y = imagenet()
    model = kpq.load_model(common.shared_file("imagenet/efficientnet_lite2_imagenet.h5"))
    float_probs = _predict(model, x)
    return [_row("efficientnet_lite2", model, float_probs, x, y, wbits=8, abits=8, method=method)[0]
            for method in ("powerquant", "uniform")]


def low_bit_rows(x, y, model, float_probs):
    """W4/A8 and W4/A4 data-free rows of the mini-Xception and the ResNet-8 (the rules apply at every width)."""
    resnet = common.load_benchmark_model("resnet8")
    rows = []
    for name, net, probs in (("mini_xception", model, float_probs), ("resnet8", resnet, _predict(resnet, x))):
        for wbits, abits in ((4, 8), (4, 4)):
            for method in ("powerquant", "uniform"):
                rows.append(_row(name, net, probs, x, y, wbits=wbits, abits=abits, method=method)[0])
    return rows


def run(quick=False, with_imagenet=False, low_bits=False):
    x, y = common.cifar_test()
    calibration = common.cifar_calibration(CALIBRATION_IMAGES)
    rows = []
    started = time.perf_counter()
    model = trained_model()
    train_seconds = time.perf_counter() - started
    float_probs = _predict(model, x)
    for method in ("powerquant", "uniform"):
        rows.append(_row("mini_xception", model, float_probs, x, y, wbits=8, abits=8, method=method)[0])
    if not quick:
        for method in ("powerquant", "uniform"):
            rows.append(_row("mini_xception", model, float_probs, x, y, wbits=8, abits=8, method=method,
                             calibration_data=calibration)[0])
        rows.append(_row("mini_xception", model, float_probs, x, y, wbits=8, abits=None, method="powerquant")[0])
        resnet = common.load_benchmark_model("resnet8")
        resnet_probs = _predict(resnet, x)
        for method in ("powerquant", "uniform"):
            rows.append(_row("resnet8", resnet, resnet_probs, x, y, wbits=8, abits=8, method=method)[0])
    if low_bits:
        rows += low_bit_rows(x, y, model, float_probs)
    if with_imagenet:
        rows += imagenet_rows()
    return {
        "test_images": f"{common.CIFAR_TEST_FILE} (all {len(y)}, paired)",
        "train_data": common.CIFAR_TRAIN_FILE,
        "commit": common._git_commit(),
        "model_seconds": round(train_seconds, 1),
        "rows": rows,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--json", help="merge the results under --label into this file")
    parser.add_argument("--quick", action="store_true", help="data-free rows of the separable model only")
    parser.add_argument("--imagenet", action="store_true", help="also EfficientNet-Lite2 (650 images)")
    parser.add_argument("--low-bits", action="store_true", help="also W4/A8 and W4/A4 data-free rows")
    parser.add_argument("--before-rules", action="store_true",
                        help="the data-free rules before issue 20 (to measure the change on this commit)")
    args = parser.parse_args()
    if args.before_rules:
        before_rules()
    result = run(args.quick, args.imagenet, args.low_bits)
    result["rules"] = "before issue 20" if args.before_rules else "this commit"
    if args.json:
        path = pathlib.Path(args.json)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged[args.label] = result
        path.write_text(json.dumps(merged, indent=1) + "\n")

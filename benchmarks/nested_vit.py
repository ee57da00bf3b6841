"""A small ViT on MNIST, with its attention and MLP in the graph and inside custom layers.

What is measured: a ViT (7x7 Conv2D patches, 16 tokens of width 32, two
pre-norm blocks of MultiHeadAttention (2 heads) and a GELU MLP, LayerNorm,
average pooling, Dense head) trained for `EPOCHS` epochs on the first
8,000 images of the official MNIST test set (shared data; the only MNIST
there) and tested on the other 2,000 (paired: every row on the same 2,000
images). Two versions with the same architecture and seed: `plain`
(Keras layers in the model graph) and `custom` (subclassed `PatchEmbed` and
`Block` layers; the converter reaches their kernel layers by walking their
attributes, docs/method.md "Nested layers").

Rows: float; W8/A8 data-free; W4/A8 calibrated (512 training images, with
their labels for refinement); W4/A8 calibrated with `refine=True`; each
PowerQuant and uniform (`method="uniform"`). Also: how many kernel layers
and values stay float after conversion.

Run: `.venv/bin/python benchmarks/nested_vit.py` (writes benchmarks/nested_vit.json).
"""

import gzip
import json
import sys
import time

import common
import keras
import numpy as np

import keras_powerquant as kpq
from keras_powerquant import keras_internals
from keras_powerquant.converter.registry import LINEAR_LAYER_TYPES

L = keras.layers
EPOCHS = 4
TRAIN, TEST, CALIBRATION = 8000, 2000, 512
WIDTH, HEADS, PATCH, BLOCKS = 32, 2, 7, 2
TOKENS = (28 // PATCH) ** 2


def mnist():
    folder = common.shared_data_dir() / "mnist"
    images_path, labels_path = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    if not images_path.exists():
        raise common.Skip(f"{images_path} not found (set KPQ_SHARED_DATA)")
    with gzip.open(images_path) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(labels_path) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return (x / 255.0).astype("float32"), y


@keras.saving.register_keras_serializable(package="kpq_benchmarks")
class PatchEmbed(L.Layer):
    def __init__(self, width, patch, **kwargs):
        super().__init__(**kwargs)
        self.width, self.patch = width, patch
        self.projection = L.Conv2D(width, patch, strides=patch)

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.position = self.add_weight(name="position", shape=(TOKENS, self.width), initializer="zeros")

    def call(self, images):
        x = self.projection(images)
        return keras.ops.reshape(x, (-1, TOKENS, self.width)) + self.position

    def get_config(self):
        return {**super().get_config(), "width": self.width, "patch": self.patch}


@keras.saving.register_keras_serializable(package="kpq_benchmarks")
class Block(L.Layer):
    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads = width, heads
        self.norm_1, self.norm_2 = L.LayerNormalization(), L.LayerNormalization()
        self.attention = L.MultiHeadAttention(heads, width // heads)
        self.mlp = [L.Dense(2 * width, activation="gelu"), L.Dense(width)]

    def build(self, input_shape):
        self.norm_1.build(input_shape)
        self.norm_2.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.mlp[0].build(input_shape)
        self.mlp[1].build(tuple(input_shape[:-1]) + (2 * self.width,))

    def call(self, x):
        y = self.norm_1(x)
        x = x + self.attention(y, y)
        y = self.norm_2(x)
        for layer in self.mlp:
            y = layer(y)
        return x + y

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads}


class Position(L.Layer):
    """The plain version's learned position embedding (a layer without a kernel)."""

    def build(self, input_shape):
        self.position = self.add_weight(name="position", shape=tuple(input_shape[1:]), initializer="zeros")

    def call(self, x):
        return x + self.position


def vit(custom):
    keras.utils.set_random_seed(common.SEED)
    inputs = keras.Input((28, 28, 1), name="images")
    if custom:
        x = PatchEmbed(WIDTH, PATCH, name="embed")(inputs)
        for i in range(BLOCKS):
            x = Block(WIDTH, HEADS, name=f"block_{i}")(x)
    else:
        x = L.Conv2D(WIDTH, PATCH, strides=PATCH, name="patches")(inputs)
        x = Position(name="position")(L.Reshape((TOKENS, WIDTH))(x))
        for i in range(BLOCKS):
            y = L.LayerNormalization(name=f"norm_{i}a")(x)
            x = L.Add()([x, L.MultiHeadAttention(HEADS, WIDTH // HEADS, name=f"attention_{i}")(y, y)])
            y = L.LayerNormalization(name=f"norm_{i}b")(x)
            y = L.Dense(2 * WIDTH, activation="gelu", name=f"mlp_{i}a")(y)
            x = L.Add()([x, L.Dense(WIDTH, name=f"mlp_{i}b")(y)])
    x = L.GlobalAveragePooling1D()(L.LayerNormalization(name="norm")(x))
    return keras.Model(inputs, L.Dense(10, name="head")(x), name="custom_vit" if custom else "vit")


def plain_kernel_layers(model):
    classes = tuple(entry.keras_class for entry in LINEAR_LAYER_TYPES)
    return [layer.name for layer in keras_internals.all_layers(model) if type(layer) in classes]


def main():
    try:
        x, y = mnist()
    except common.Skip as exc:
        print(f"skipped: {exc}")
        return 0
    x_train, y_train, x_test, y_test = x[:TRAIN], y[:TRAIN], x[TRAIN : TRAIN + TEST], y[TRAIN : TRAIN + TEST]
    calibration, labels = x_train[:CALIBRATION], y_train[:CALIBRATION]
    rows, results = [], {"n_test": TEST, "n_train": TRAIN, "epochs": EPOCHS, "machine": common.machine_description()}
    for version in ("plain", "custom"):
        model = vit(version == "custom")
        started = time.perf_counter()
        model.compile(
            optimizer=keras.optimizers.Adam(2e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x_train, y_train, batch_size=64, epochs=EPOCHS, verbose=0)
        train_seconds = time.perf_counter() - started
        float_hits = common.top1_hits(model, x_test, y_test)
        entry = {"train_seconds": train_seconds, "params": model.count_params(), "float_top1": float(float_hits.mean())}
        rows.append([version, "float", "-", "-", f"{100 * float_hits.mean():.2f}", "-", "-"])
        settings = [
            ("W8/A8 data-free", 8, 8, {}),
            ("W4/A8 calibrated", 4, 8, {"calibration_data": calibration}),
            ("W4/A8 calibrated, refine", 4, 8, {"calibration_data": calibration, "calibration_labels": labels,
                                                "refine": True}),
        ]
        for label, wbits, abits, options in settings:
            for method in ("powerquant", "uniform"):
                mark = time.perf_counter()
                quantized, report = kpq.convert(model, wbits, abits, method=method, **options)
                seconds = time.perf_counter() - mark
                hits = common.top1_hits(quantized, x_test, y_test)
                counts = report.kernel_counts()
                nested = [row for row in report.quantized_layers if row.nested_in is not None]
                entry[f"{label} {method}"] = {
                    "top1": float(hits.mean()),
                    "delta_points": float(100 * (hits.mean() - float_hits.mean())),
                    "seconds": seconds,
                    "kernel_counts": counts,
                    "nested_with_float_input": sum(row.input_bits is None for row in nested),
                    "plain_kernel_layers_left": plain_kernel_layers(quantized),
                }
                rows.append([
                    version, label, method, f"{counts[0]}/{counts[0] + counts[1]}",
                    f"{100 * hits.mean():.2f}", f"{100 * (hits.mean() - float_hits.mean()):+.2f}", f"{seconds:.0f}",
                ])
                print(rows[-1], flush=True)
        results[version] = entry
    header = ["model", "setting", "method", "kernel layers quantized", "top-1 %", "vs float", "convert s"]
    print(common.markdown_table(header, rows))
    (common.REPO_ROOT / "benchmarks" / "nested_vit.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

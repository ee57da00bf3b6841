"""A self-contained demo: generated images and a small trained CNN.

The demo lets the quantizer run end to end on a fresh machine with no
downloads. `make_dataset` draws a procedural 10-class image dataset shaped
like CIFAR-10, `build_demo_model` builds a small ResNet-style CNN that uses
every layer kind the quantizer has to handle (Conv2D + BatchNormalization,
residual `Add`, `DepthwiseConv2D`, ReLU6, a softmax `Dense` head) and
`prepare_demo` trains it and writes the files the README's first command
converts:

- `model.keras`: the trained float model. It takes raw pixel values in
  [0, 255] (its first layer is `Rescaling(1 / 255)`).
- `test.npz`: held-out images, arrays `x` (uint8, `(N, 32, 32, 3)`) and `y`
  (int64, `(N,)`), drawn from a different seed than the training images.
- `calibration.npy`: training images for calibration, uint8
  `(N, 32, 32, 3)`, raw pixel values like the model's input.
- `demo.json`: the settings and the float test accuracy. Written last, so
  its presence marks a complete, reusable output folder.

Run it as `python -m keras_powerquant.demo OUT_DIR [--force] [--seed N]`.
"""

import argparse
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

NUM_CLASSES = 10
IMAGE_SIZE = 32

# Class `c` is a grating at orientation `_ORIENTATIONS_DEG[c % 5]` with
# spatial frequency `_FREQUENCIES[c // 5]` (cycles per pixel). Neighbouring
# orientations are 36 degrees apart and the two frequencies less than an
# octave, so with the jitter and noise below the classes overlap a little
# and a model has to look at local structure, not at global statistics.
_ORIENTATIONS_DEG = np.arange(5) * 36.0
_FREQUENCIES = np.array([0.10, 0.17])
_ORIENTATION_JITTER_DEG = 7.0
_LOG_FREQUENCY_JITTER = 0.08

# Images are rendered in chunks so the float32 temporaries stay small and
# in cache; rendering everything at once is several times slower.
_CHUNK = 1024

# Default sizes of `prepare_demo`, chosen so that training takes well under
# a minute on 2 CPU cores and still reaches more than 90% test accuracy.
_NUM_TRAIN = 16000
_NUM_TEST = 2000
_NUM_CALIBRATION = 256
_EPOCHS = 4

MODEL_FILE = "model.keras"
TEST_FILE = "test.npz"
CALIBRATION_FILE = "calibration.npy"
METADATA_FILE = "demo.json"


def make_dataset(num_samples, seed=0):
    """Generates the demo's 10-class image dataset.

    Each image is a uniform background with one soft-edged disc holding a
    sinusoidal grating. The class sets the grating's orientation and
    spatial frequency; everything else is random per image: orientation
    and frequency jitter, phase, disc position and radius, contrast, the
    disc's and the background's colours, and additive Gaussian noise of
    random strength. Colours carry no class information on purpose: a
    class-specific colour would let a model answer from the mean pixel and
    skip the convolutions the demo exists to quantize.

    Labels are a shuffled, exactly balanced sequence (counts differ by at
    most one between classes).

    Args:
        num_samples: Number of images to generate.
        seed: Seed of the `numpy.random.Generator`. The same seed always
            gives identical arrays.

    Returns:
        Tuple `(x, y)`: `x` is a uint8 array of shape
        `(num_samples, 32, 32, 3)` with pixel values in [0, 255], `y` an
        int64 array of shape `(num_samples,)` with labels in [0, 9].
    """
    rng = np.random.default_rng(seed)
    n = num_samples
    y = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)

    # Per-image parameters, all drawn before any pixel so that they do not
    # depend on the chunking below.
    theta = np.deg2rad(
        _ORIENTATIONS_DEG[y % 5] + rng.normal(0.0, _ORIENTATION_JITTER_DEG, n)
    )
    frequency = _FREQUENCIES[y // 5] * np.exp(
        rng.normal(0.0, _LOG_FREQUENCY_JITTER, n)
    )
    phase = rng.uniform(0.0, 2.0 * np.pi, n)
    centre = rng.uniform(9.0, 23.0, (n, 2))
    radius = rng.uniform(8.0, 15.0, n)
    contrast = rng.uniform(0.2, 1.0, n)
    # The disc's colour is saturated to a brightness of at least 0.6 so the
    # stripes (which darken it by `contrast`) stay visible on any
    # background.
    foreground = rng.uniform(0.0, 1.0, (n, 3))
    foreground *= rng.uniform(0.6, 1.0, (n, 1)) / foreground.max(
        axis=1, keepdims=True
    )
    background = rng.uniform(0.0, 1.0, (n, 3))
    noise_std = rng.uniform(0.03, 0.25, n)

    params = [
        p.astype(np.float32)
        for p in (
            theta,
            frequency,
            phase,
            centre,
            radius,
            contrast,
            foreground,
            background,
            noise_std,
        )
    ]
    coords = np.arange(IMAGE_SIZE, dtype=np.float32)
    rows = coords[None, :, None]
    cols = coords[None, None, :]
    x = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        th, fr, ph, ce, ra, co, fg, bg, ns = (p[sl] for p in params)
        th, fr, ph, ra, co = (
            v[:, None, None] for v in (th, fr, ph, ra, co)
        )
        along = cols * np.cos(th) + rows * np.sin(th)
        grating = np.cos(np.float32(2.0 * np.pi) * fr * along + ph)
        distance = np.hypot(
            rows - ce[:, 0, None, None], cols - ce[:, 1, None, None]
        )
        # One pixel of linear falloff at the rim avoids aliased disc edges.
        disc = np.clip(ra - distance + 0.5, 0.0, 1.0)[..., None]
        stripes = (1.0 - co * (1.0 - grating) / 2.0)[..., None]
        image = (
            bg[:, None, None, :] * (1.0 - disc)
            + fg[:, None, None, :] * stripes * disc
        )
        image += (
            rng.standard_normal(image.shape, dtype=np.float32)
            * ns[:, None, None, None]
        )
        x[sl] = np.clip(np.rint(image * 255.0), 0.0, 255.0)
    return x, y


def _conv_bn(x, filters, kernel_size, strides, name, relu=True):
    """Bias-free Conv2D, BatchNormalization and (optionally) ReLU."""
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def build_demo_model(num_classes=NUM_CLASSES):
    """Builds the demo's small ResNet-style CNN (about 45k parameters).

    Layout (spatial size in brackets):

    - `rescale`: `Rescaling(1 / 255)`, so the model takes raw pixels.
    - `stem`: 3x3 Conv2D stride 2, BN, ReLU, 24 channels [16x16]. The
      stride keeps training fast on CPU; the gratings survive it.
    - `block1`: residual block with an identity shortcut, two 3x3 convs
      with BN, `Add`, ReLU, 24 channels [16x16].
    - `block2`: residual block with stride 2 and a 1x1 Conv2D + BN
      projection shortcut, `Add`, ReLU, 48 channels [8x8].
    - `dw`: 3x3 DepthwiseConv2D, BN, ReLU6 [8x8].
    - `pool`: GlobalAveragePooling2D, then `classifier`: Dense + softmax.

    Every Conv2D and DepthwiseConv2D is bias-free and followed by a
    BatchNormalization, the pattern that BN folding expects.

    Args:
        num_classes: Number of output classes.

    Returns:
        An uncompiled functional `keras.Model` mapping float inputs of
        shape `(batch, 32, 32, 3)` with values in [0, 255] to class
        probabilities of shape `(batch, num_classes)`.
    """
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv_bn(x, 24, 3, 2, "stem")

    residual = _conv_bn(x, 24, 3, 1, "block1_a")
    residual = _conv_bn(residual, 24, 3, 1, "block1_b", relu=False)
    x = keras.layers.Add(name="block1_add")([x, residual])
    x = keras.layers.ReLU(name="block1_relu")(x)

    shortcut = _conv_bn(x, 48, 1, 2, "block2_proj", relu=False)
    residual = _conv_bn(x, 48, 3, 2, "block2_a")
    residual = _conv_bn(residual, 48, 3, 1, "block2_b", relu=False)
    x = keras.layers.Add(name="block2_add")([shortcut, residual])
    x = keras.layers.ReLU(name="block2_relu")(x)

    x = keras.layers.DepthwiseConv2D(
        3, padding="same", use_bias=False, name="dw_conv"
    )(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name="dw_relu6")(x)

    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", name="classifier"
    )(x)
    return keras.Model(inputs, outputs, name="kpq_demo_cnn")


def train_demo_model(
    x, y, epochs=_EPOCHS, batch_size=64, seed=0, verbose=True
):
    """Builds and trains the demo model.

    Training is deterministic for a given seed, data and machine: it seeds
    Python, NumPy and TensorFlow with `keras.utils.set_random_seed` and
    calls `tf.config.experimental.enable_op_determinism()`, which stays on
    for the rest of the process.

    Args:
        x: Training images, shape `(N, 32, 32, 3)`, pixel values in
            [0, 255] (uint8 or float).
        y: Integer labels, shape `(N,)`.
        epochs: Number of passes over the data.
        batch_size: Minibatch size.
        seed: Seed for weight initialisation and shuffling.
        verbose: Whether to print one line per epoch.

    Returns:
        The trained `keras.Model` (see `build_demo_model`), compiled with
        Adam and sparse categorical cross-entropy.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_demo_model(NUM_CLASSES)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=2 if verbose else 0,
    )
    return model


def _paths(out_dir):
    return {
        "model": os.path.join(out_dir, MODEL_FILE),
        "test": os.path.join(out_dir, TEST_FILE),
        "calibration": os.path.join(out_dir, CALIBRATION_FILE),
        "metadata": os.path.join(out_dir, METADATA_FILE),
    }


def _write_atomically(path, write):
    """Calls `write(tmp_path)`, then renames the result onto `path`.

    The temporary file sits in the same folder (so `os.replace` is an
    atomic rename) and keeps the extension, which Keras and NumPy use to
    pick the format. An interrupted write leaves at most a hidden
    temporary file, never a truncated `path`.
    """
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.{os.getpid()}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(paths, settings):
    """Returns the recorded metadata if `paths` hold a matching demo."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    try:
        with open(paths["metadata"]) as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None
    if metadata.get("settings") != settings:
        return None
    return metadata


def prepare_demo(
    out_dir,
    seed=0,
    force=False,
    num_train=_NUM_TRAIN,
    num_test=_NUM_TEST,
    num_calibration=_NUM_CALIBRATION,
    epochs=_EPOCHS,
    verbose=True,
):
    """Generates data, trains the demo model and writes the demo files.

    Training images come from `make_dataset(num_train, seed=2 * seed)` and
    test images from `make_dataset(num_test, seed=2 * seed + 1)`, so the
    test set never shares a generator stream with any training set. The
    calibration images are the first `num_calibration` training images
    (labels are shuffled, so these are a random, near-balanced sample).

    The output is cached: when `out_dir` already holds a complete demo made
    with the same settings and `force` is False, nothing is written and
    the recorded accuracy is returned. A folder from an interrupted run or
    from other settings is rebuilt. Every file is written to a temporary
    name and renamed into place, and `demo.json` is written last.

    Args:
        out_dir: Output folder, created if missing.
        seed: Seed of the data and of training.
        force: Rebuild even if a matching demo is already there.
        num_train: Number of training images.
        num_test: Number of held-out test images.
        num_calibration: Number of calibration images (at most
            `num_train`).
        epochs: Training epochs.
        verbose: Whether to print progress lines.

    Returns:
        Dict with the paths `"model"`, `"test"`, `"calibration"` and
        `"metadata"`, and `"accuracy"`: the float model's top-1 accuracy on
        the test set.
    """
    if not 0 < num_calibration <= num_train:
        raise ValueError(
            "num_calibration must be in [1, num_train]. "
            f"Received: num_calibration={num_calibration}, "
            f"num_train={num_train}"
        )
    log = print if verbose else (lambda *args: None)
    paths = _paths(out_dir)
    settings = {
        "seed": seed,
        "num_train": num_train,
        "num_test": num_test,
        "num_calibration": num_calibration,
        "epochs": epochs,
    }
    if not force:
        metadata = _read_cache(paths, settings)
        if metadata is not None:
            log(f"Demo already prepared in {out_dir}; reusing it.")
            return {**paths, "accuracy": metadata["test_accuracy"]}

    os.makedirs(out_dir, exist_ok=True)
    # Drop the completeness marker first: a rebuild interrupted halfway
    # must not leave an old `demo.json` vouching for a mix of files.
    if os.path.exists(paths["metadata"]):
        os.remove(paths["metadata"])
    start = time.perf_counter()
    log(f"Generating {num_train} training and {num_test} test images...")
    x_train, y_train = make_dataset(num_train, seed=2 * seed)
    x_test, y_test = make_dataset(num_test, seed=2 * seed + 1)

    log(f"Training the demo model for {epochs} epochs...")
    model = train_demo_model(
        x_train, y_train, epochs=epochs, seed=seed, verbose=verbose
    )
    probabilities = model.predict(x_test, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(probabilities, axis=-1) == y_test))
    log(f"Float test accuracy: {accuracy:.4f}")

    # The optimizer state is only needed to resume training; the quantizer
    # reads the weights alone.
    _write_atomically(
        paths["model"],
        lambda p: model.save(p, include_optimizer=False),
    )
    _write_atomically(
        paths["test"], lambda p: np.savez(p, x=x_test, y=y_test)
    )
    _write_atomically(
        paths["calibration"],
        lambda p: np.save(p, x_train[:num_calibration]),
    )
    metadata = {
        "settings": settings,
        "test_accuracy": accuracy,
        # Data generation plus training, for the README's timing claims.
        "seconds": round(time.perf_counter() - start, 1),
    }
    _write_atomically(
        paths["metadata"],
        lambda p: _write_json(p, metadata),
    )
    log(f"Demo written to {out_dir} in {metadata['seconds']} s.")
    return {**paths, "accuracy": accuracy}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def main(argv=None):
    """Command-line entry: prepares the demo and prints its paths."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_powerquant.demo",
        description="Generate the demo data and train the demo model.",
    )
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if cached"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    result = prepare_demo(args.out_dir, seed=args.seed, force=args.force)
    for key in ("model", "test", "calibration", "metadata"):
        print(f"{key}: {result[key]}")
    print(f"float test accuracy: {result['accuracy']:.4f}")


if __name__ == "__main__":
    main()

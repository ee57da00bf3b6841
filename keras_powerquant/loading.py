"""Loading Keras models from files, including legacy Keras 2 / tf.keras HDF5.

Keras 3 reads `.keras` archives and most legacy `.h5` files, but refuses some
real Keras 2 files: layer configs that carry arguments Keras 3 layers no
longer accept (`groups=1` on `DepthwiseConv2D`, `time_major=False` on RNNs),
and Keras 2.1/2.2-era Sequential configs. `legacy_configs` repairs such configs
in memory, never touching the input file, and each repair is reported as a note.

The format of a file is detected from its content (HDF5 or zip signature), so
an unusual extension does not stop a valid model from loading.
"""

import copy
import io
import json
import logging
import os
import zipfile

import h5py
import keras

from keras_powerquant import backend  # noqa: F401  (fails early on a non-TensorFlow backend)
from keras_powerquant import keras_internals
from keras_powerquant.errors import ModelLoadError
from keras_powerquant.errors import UnsupportedModelError
from keras_powerquant.legacy_configs import repair_model_config
from keras_powerquant.legacy_configs import RepairError

logger = logging.getLogger("keras_powerquant")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")

def load_model_with_notes(path):
    """Loads a Keras model file and reports the legacy repairs applied.

    `.keras` archives are loaded with `keras.saving.load_model` in safe mode.
    Legacy HDF5 files (`.h5`, `.hdf5`, from Keras 2 or tf.keras) are loaded
    with Keras 3's legacy loader after their model config has been repaired
    in memory; the file itself is opened read-only and never modified. The
    format is detected from the file's content, not its extension.

    Args:
        path: `str` or `os.PathLike`, the model file (`.keras`, `.h5`,
            `.hdf5`, or any name holding one of those formats), or a folder
            saved by Keras 3 in its directory format.

    Returns:
        A tuple `(model, notes)`: the uncompiled `keras.Model` and a list of
        human-readable strings, one per legacy repair applied (for example
        "dropped unsupported argument groups=1 from DepthwiseConv2D
        'depthwise_conv2d'"). The list is empty when nothing was repaired.

    Raises:
        ModelLoadError: if the path does not exist, is a TensorFlow
            SavedModel or another folder, is not a model file (text, NumPy
            archive, empty, truncated or corrupt), holds only weights, or
            Keras cannot rebuild the model from it.
        UnsupportedModelError: if the file is a valid Keras 2 model that uses
            a layer argument Keras 3 cannot represent (e.g.
            `DepthwiseConv2D(groups=2)`).
        TypeError: if `path` is not a `str` or `os.PathLike`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            "load_model_with_notes() expects a file path (str or "
            f"os.PathLike); received {type(path).__name__}."
        )
    path = os.fspath(path)
    notes = []
    if not os.path.exists(path):
        raise ModelLoadError(f"Model path '{path}' does not exist.")
    if os.path.isdir(path):
        model = _load_directory(path)
    else:
        fmt = _sniff_format(path)
        if fmt == "hdf5":
            model = _load_hdf5(path, notes)
        elif fmt == "zip":
            model = _load_keras_archive(path)
        else:
            raise ModelLoadError(_not_a_model_message(path, fmt))
    if not isinstance(model, keras.Model):
        raise ModelLoadError(
            f"'{path}' describes a {type(model).__name__}, not a Keras model."
        )
    return model, notes


def load_model(path):
    """Loads a Keras model file, repairing legacy Keras 2 configs if needed.

    Same as `load_model_with_notes(path)` without the list of notes; the
    repairs are still logged at INFO level on the "keras_powerquant" logger.

    Args:
        path: `str` or `os.PathLike`, the model file (`.keras`, `.h5`,
            `.hdf5`) or a Keras 3 model folder.

    Returns:
        The uncompiled `keras.Model`.

    Raises:
        ModelLoadError: if the path cannot be read as a Keras model (see
            `load_model_with_notes`).
        UnsupportedModelError: if the file uses a layer argument Keras 3
            cannot represent.
        TypeError: if `path` is not a `str` or `os.PathLike`.
    """
    model, _ = load_model_with_notes(path)
    return model


def resolve_model(model):
    """`(model, notes)` for a model or a model file, as `convert` takes it.

    A path is loaded with `load_model_with_notes`; either way the model is
    checked with `check_convertible` (a model object comes back with no notes).
    """
    notes = []
    if isinstance(model, (str, os.PathLike)):
        model, notes = load_model_with_notes(model)
    check_convertible(model)
    return model, notes


def check_convertible(model):
    """Checks that a model's layer graph is known, so it can be converted.

    Functional models and built Sequential models pass. Subclassed models
    (a `keras.Model` subclass with its own `call`) do not: their computation
    is Python code, not a graph of layers.

    Args:
        model: the object to check.

    Returns:
        None.

    Raises:
        UnsupportedModelError: if `model` is not a `keras.Model`, is a
            subclassed model, is a Sequential model without a defined
            input shape, or was already quantized by Keras
            (`model.quantize(...)`). The message says what to do instead.
    """
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"Expected a keras.Model, got {type(model).__name__}; load the "
            "model first, e.g. with keras_powerquant.loading.load_model(path)."
        )
    if not keras_internals.has_layer_graph(model):
        raise UnsupportedModelError(_subclassed_message(model))
    name = getattr(model, "name", "?")
    if isinstance(model, keras.Sequential):
        if not model.layers:
            raise UnsupportedModelError(
                f"Sequential model '{name}' has no layers; add layers to it "
                "before converting."
            )
        try:
            _ = model.inputs  # raises while the Sequential has no input shape
        except (AttributeError, ValueError):
            raise UnsupportedModelError(
                f"Sequential model '{name}' has no defined input shape, so "
                "its layer graph is unknown; add keras.Input(shape=...) as "
                "its first layer, or call it once on a batch of data, before "
                "converting."
            ) from None
    _check_not_keras_quantized(model)


# Weight dtypes that only a quantized layer holds.
_QUANTIZED_WEIGHT_DTYPES = ("int4", "int8", "uint8", "float8_e4m3fn", "float8_e5m2")


def _check_not_keras_quantized(model):
    """Refuses a model quantized by Keras' `Model.quantize`: its kernels are no float weights to fit."""
    from keras_powerquant.layers import QuantizedKernelLayer

    for layer in keras_internals.all_layers(model):
        if isinstance(layer, QuantizedKernelLayer):
            raise UnsupportedModelError(
                f"Layer '{layer.name}' is already a {type(layer).__name__}: the model was converted "
                "by keras-powerquant before. Convert the float model it came from."
            )
        mode = getattr(layer, "quantization_mode", None)
        dtypes = {keras.backend.standardize_dtype(w.dtype) for w in layer.weights}
        quantized_dtypes = sorted(dtypes.intersection(_QUANTIZED_WEIGHT_DTYPES))
        if mode is None and not quantized_dtypes:
            continue
        what = f"quantization_mode={mode!r}" if mode is not None else f"{', '.join(quantized_dtypes)} weights"
        raise UnsupportedModelError(
            f"Layer '{layer.name}' ({type(layer).__name__}) is already quantized by Keras ({what}), "
            "so its float weights are gone. Convert the float model, before `model.quantize(...)`."
        )


def _subclassed_message(model):
    return (
        f"Model '{model.name}' is a subclassed model "
        f"({type(model).__name__}), whose computation is Python code rather "
        "than a graph of layers, so it cannot be converted; rebuild it with "
        "the functional API (keras.Input, layer calls, keras.Model(inputs, "
        "outputs)) or as a keras.Sequential, load the trained weights into "
        "it, and convert that."
    )


# ---------------------------------------------------------------------------
# Format detection and non-HDF5 inputs.


def _sniff_format(path):
    """Returns "hdf5", "zip", "empty" or "unknown" from the file's content."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelLoadError(
            f"Model file '{path}' cannot be read ({_brief(exc)})."
        ) from exc
    if not head:
        return "empty"
    if head == _HDF5_SIGNATURE:
        return "hdf5"
    if head[:4] in _ZIP_SIGNATURES:
        return "zip"
    # HDF5 files may start with a user block (signature at 512, 1024, ...).
    try:
        if h5py.is_hdf5(path):
            return "hdf5"
    except OSError:
        pass
    return "unknown"


def _not_a_model_message(path, fmt):
    if fmt == "empty":
        return f"Model file '{path}' is empty (0 bytes)."
    if os.path.basename(path) in ("saved_model.pb", "saved_model.pbtxt"):
        return _savedmodel_message(os.path.dirname(path) or ".")
    return (
        f"'{path}' is not a Keras model file: its content is neither a "
        ".keras (zip) archive nor a legacy .h5 (HDF5) file."
    )


def _savedmodel_message(path):
    return (
        f"'{path}' is a TensorFlow SavedModel, from which Keras 3 cannot "
        "rebuild layers; re-save the model as .keras or .h5 from the Keras "
        "that trained it (e.g. model.save(\"model.keras\"), or with tf_keras: "
        f"tf_keras.models.load_model(\"{path}\").save(\"model.h5\"))."
    )


def _load_directory(path):
    for name in ("saved_model.pb", "saved_model.pbtxt"):
        if os.path.isfile(os.path.join(path, name)):
            raise ModelLoadError(_savedmodel_message(path))
    if os.path.isfile(os.path.join(path, "config.json")):
        # Keras 3's directory format: an unzipped .keras archive.
        return _call_keras(
            path, lambda: keras.saving.load_model(path, compile=False)
        )
    raise ModelLoadError(
        f"'{path}' is a directory but neither a TensorFlow SavedModel nor a "
        "Keras model folder; pass the path of a .keras or .h5 model file."
    )


def _load_keras_archive(path):
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"'{path}' looks like a zip archive but is corrupt or truncated "
            f"({_brief(exc)})."
        ) from exc
    if "config.json" not in names:
        if names and all(n.endswith(".npy") for n in names):
            what = "a NumPy .npz archive"
        else:
            what = "a zip archive without config.json"
        raise ModelLoadError(
            f"'{path}' is {what}, not a Keras .keras model archive."
        )
    if path.endswith(".keras"):
        return _call_keras(
            path, lambda: keras.saving.load_model(path, compile=False)
        )
    # keras.saving.load_model insists on the .keras extension; the archive
    # loader it calls accepts an open file whatever its name.
    logger.info("Loading '%s' as a .keras archive (detected by content).", path)

    def load():
        with open(path, "rb") as fh:
            return keras_internals.load_keras_archive(fh)

    return _call_keras(path, load)


# ---------------------------------------------------------------------------
# Legacy HDF5.


def _load_hdf5(path, notes):
    try:
        src = h5py.File(path, "r")
    except OSError as exc:
        raise ModelLoadError(
            f"'{path}' is a truncated or corrupt HDF5 file and cannot be "
            f"opened ({_brief(exc)})."
        ) from exc
    with src:
        config = _read_model_config(src, path)
        repaired = copy.deepcopy(config)
        try:
            repair_model_config(repaired, notes)
        except RepairError as exc:
            raise UnsupportedModelError(
                f"Cannot load '{path}' with Keras 3: {exc}"
            ) from None
        for note in notes:
            logger.info("Repaired legacy model config of '%s': %s", path, note)
        if repaired == config:
            return _call_keras(
                path,
                lambda: keras_internals.load_hdf5_model(src),
            )
        with _in_memory_copy(src, repaired, path) as mem:
            return _call_keras(
                path,
                lambda: keras_internals.load_hdf5_model(mem),
            )


def _read_model_config(f, path):
    try:
        raw = f.attrs.get("model_config")
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(
            f"'{path}' is a corrupt HDF5 file: its model_config attribute "
            f"cannot be read ({_brief(exc)})."
        ) from exc
    if raw is None:
        if _looks_like_weights_file(f):
            raise ModelLoadError(
                f"'{path}' contains only weights, not a model architecture; "
                "it needs the code that defines the model: build the model, "
                "call model.load_weights(path) and pass the model object "
                "instead."
            )
        raise ModelLoadError(
            f"'{path}' is an HDF5 file but not a Keras model (it has no "
            "model_config attribute)."
        )
    if hasattr(raw, "decode"):
        raw = raw.decode("utf-8")
    try:
        config = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"'{path}' has a model_config attribute that is not valid JSON "
            f"({_brief(exc)})."
        ) from exc
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelLoadError(
            f"'{path}' has a model_config attribute that is not a Keras "
            "model config."
        )
    return config


def _looks_like_weights_file(f):
    try:
        # Keras 2 / tf.keras save_weights() writes layer_names at the root;
        # Keras 3 .weights.h5 files hold "layers" and "vars" groups.
        return "layer_names" in f.attrs or "layers" in f or "vars" in f
    except (OSError, KeyError, ValueError):
        return False


class _in_memory_copy:
    """An in-memory HDF5 file with `src`'s weights and a new model config."""

    def __init__(self, src, config, path):
        self._src, self._config, self._path = src, config, path
        self._file = None

    def __enter__(self):
        try:
            self._file = h5py.File(io.BytesIO(), "w")
            for key in ("keras_version", "backend"):
                if key in self._src.attrs:
                    self._file.attrs[key] = self._src.attrs[key]
            self._file.attrs["model_config"] = json.dumps(self._config)
            if "model_weights" in self._src:
                self._src.copy(self._src["model_weights"], self._file)
        except (OSError, KeyError, ValueError) as exc:
            self.__exit__(None, None, None)
            raise ModelLoadError(
                f"'{self._path}' is a corrupt HDF5 file: its weights cannot "
                f"be read ({_brief(exc)})."
            ) from exc
        return self._file

    def __exit__(self, *exc_info):
        if self._file is not None:
            self._file.close()
            self._file = None
        return False


def _call_keras(path, load):
    """Runs a Keras loader, turning its failures into one-line errors."""
    try:
        return load()
    except Exception as exc:  # Keras raises many types for a bad file.
        text = str(exc)
        if "safe_mode" in text or "unsafe_deserialization" in text:
            raise ModelLoadError(
                f"'{path}' contains a Lambda layer (Python code), which Keras "
                "refuses to load in safe mode; if you trust the file, load "
                "it yourself with keras.saving.load_model(path, "
                "safe_mode=False) and pass the model object instead."
            ) from exc
        hint = ""
        if "Unknown layer" in text or "Could not locate class" in text:
            hint = (
                "; it uses a custom layer: load it yourself with "
                "custom_objects=... and pass the model object instead"
            )
        raise ModelLoadError(
            f"Keras 3 cannot rebuild the model in '{path}' "
            f"({_brief(exc)}){hint}."
        ) from exc


def _brief(exc, limit=240):
    """The informative line of an exception's message, shortened.

    Keras' deserialization errors open with the whole layer config and give
    the cause last ("Exception encountered: ..."): prefer that line.
    """
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("Exception encountered:")]
    if causes:
        text = causes[-1][len("Exception encountered:"):].strip()
    else:
        text = lines[0] if lines else type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text

"""Export a converted model for TF Serving: versioned SavedModels, each version one folder.

Layout of an export folder `OUT`:

```
OUT/
  1/                       # version 1: everything that belongs to it
    saved_model.pb         # the SavedModel (tag "serve") with variables/
    variables/
    kpq-report.json        # conversion report, sizes, signature keys, versions
    kpq-model.keras        # the Keras model, when asked for
  2/
```

TF Serving loads the numeric folders and ignores files it does not know, so
the report and `.keras` file travel inside their version. A version is one
folder so that it can be published, and replaced, in a single rename:

- A version is written whole into a hidden staging folder of `OUT`
  (`.kpq-tmp-*`), then renamed to `OUT/<version>`. A reader (TF Serving,
  `kpq evaluate`, `kpq inspect`) sees all of a version or none of it.
- That rename is also the claim: it fails when `OUT/<version>` exists, so
  two exports can never both write one version. An export asked for a given
  version fails with `ExportError` when another took it meanwhile; an
  export asked for the next version takes the next free number.
- `overwrite=True` swaps the new folder with the old one in one atomic
  exchange (Linux `renameat2(RENAME_EXCHANGE)`) and deletes the old one only
  then. Where the exchange is not available, the old folder is renamed
  aside and the new one in (the version is missing, never mixed, in
  between), and the old one is put back if the second rename fails.
- Staging folders left by killed exports are deleted by the next export to
  the same folder: those whose process is gone (same host) or that are more
  than a day old. A live export's staging folder is never touched.
"""

import contextlib
import ctypes
import dataclasses
import errno
import json
import operator
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant import backend  # noqa: F401  (fails early on a non-TensorFlow backend)
from keras_powerquant import keras_internals
from keras_powerquant.errors import ExportError
from keras_powerquant.layers import QuantizedKernelLayer
from keras_powerquant.layers.load_time_decoding import decoded_kernels
from keras_powerquant.layers.load_time_decoding import DecodedKernel
from keras_powerquant.limits import DECODE_WEIGHTS
from keras_powerquant.warmup import check_warmup_count
from keras_powerquant.warmup import warmup_examples
from keras_powerquant.warmup import write_warmup_requests

SERVING_SIGNATURE = "serving_default"
REPORT_FILE = "kpq-report.json"
KERAS_FILE = "kpq-model.keras"
FORMATS = ("savedmodel", "keras", "both")
# TF Serving's version numbers are int64.
MAX_VERSION = 2**63 - 1
_STAGING_PREFIX = ".kpq-tmp-"
_ASIDE_PREFIX = ".kpq-old-"
# A staging folder whose owner cannot be checked (another host) is stale after this.
STALE_AFTER_SECONDS = 24 * 3600
# "<pid>@<host>-<random>": who staged a folder, so that others know when it is stale.
# Names TensorFlow accepts for the name scopes of the layers it traces.
_SCOPE_NAME = re.compile(r"[A-Za-z0-9_.\\/>-]*")
_OWNED_NAME = re.compile(r"(?:(?P<version>\d+)-)?(?P<pid>\d+)@(?P<host>[A-Za-z0-9._]+)-[A-Za-z0-9_]+")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export wrote its artifacts (None for those not written).

    Attributes:
        version: the version number written.
        version_dir: `OUT/<version>`, the folder holding all of them.
        saved_model_dir: the SavedModel folder (`version_dir`), or None.
        keras_path: `OUT/<version>/kpq-model.keras`, or None.
        report_path: `OUT/<version>/kpq-report.json`.
    """

    version: int
    version_dir: str
    saved_model_dir: str
    keras_path: str
    report_path: str


def _raw_variable(variable):
    """The `tf.Variable` behind a Keras variable (TF backend)."""
    value = getattr(variable, "value", variable)
    if not isinstance(value, tf.Variable):
        raise ExportError(f"Variable '{variable.path}' is not backed by a tf.Variable.")
    return value


def signature_keys(names):
    """Signature keys for tensor names: unique, and valid TensorFlow argument names.

    Characters other than ASCII letters, digits, "_", "." and "-" become
    "_" ("my input" -> "my_input"); a key must start with a letter or digit,
    and a clash gets a "_2", "_3"... suffix.

    Returns:
        A list of keys, one per name, in order.
    """
    keys = []
    for name in names:
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        if not key[:1].isalnum():
            key = "input" + ("_" + key if key else "")
        candidate, count = key, 1
        while candidate in keys:
            count += 1
            candidate = f"{key}_{count}"
        keys.append(candidate)
    return keys


class _ServingModule(tf.Module):
    """Tracks exactly the model's raw `tf.Variable`s and a serving function.

    Keras' `ExportArchive` tracks both the Keras variable wrappers and the
    `tf.Variable`s the traced function captures, so TensorFlow stores every
    weight twice (keras-team/keras#23553). Tracking only the raw variables
    avoids that: the checkpoint holds each weight once.

    With `decode_weights="load"`, each quantized layer's kernel is read from
    a `DecodedKernel`, filled from its codes when the SavedModel is loaded.
    """

    def __init__(self, model, decode_weights="load"):
        super().__init__(name="kpq_serving")
        self.model_variables = [_raw_variable(v) for v in model.variables]
        layers = keras_internals.all_layers(model)
        self.decoded_kernels = [
            DecodedKernel(layer)
            for layer in layers
            if decode_weights == "load" and isinstance(layer, QuantizedKernelLayer) and layer.decodes_at_load
        ]
        input_keys = signature_keys([t.name for t in model.inputs])
        output_keys = signature_keys(list(model.output_names))
        input_dtypes = [t.dtype for t in model.inputs]
        input_struct = keras_internals.input_structure(model)
        specs = [tf.TensorSpec(t.shape, tf.float32, name=key) for t, key in zip(model.inputs, input_keys)]

        @tf.function(input_signature=specs)
        def serve(*inputs):
            cast = [tf.cast(x, dtype) for x, dtype in zip(inputs, input_dtypes)]
            with decoded_kernels(self.decoded_kernels):
                outputs = model(keras.tree.pack_sequence_as(input_struct, cast), training=False)
            flat = keras.tree.flatten(outputs)
            return {key: tf.cast(y, tf.float32) for key, y in zip(output_keys, flat)}

        self.serve = serve


def variable_bytes(model):
    """Bytes of a model's variable values (the checkpoint payload)."""
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.variables))


def directory_bytes(path):
    """Total size of the files under `path`."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def save_serving_model(model, path, decode_weights="load"):
    """Writes `model` as a TF Serving SavedModel at `path` (a new or empty folder).

    The SavedModel has tag "serve" and one signature, `serving_default`
    (method tensorflow/serving/predict), float32 in and out. Its input and
    output keys are the model's input and output names, made valid where
    needed by `signature_keys`. Quantized kernels are stored as codes and
    decoded when the SavedModel is loaded (`decode_weights="load"`) or on
    every call ("call").

    Returns:
        The signature's input keys, in `model.inputs` order.
    """
    if decode_weights not in DECODE_WEIGHTS:
        raise ExportError(f"`decode_weights` must be one of {DECODE_WEIGHTS}; got {decode_weights!r}.")
    module = _ServingModule(model, decode_weights)
    tf.saved_model.save(
        module, path, signatures={SERVING_SIGNATURE: module.serve.get_concrete_function()}
    )
    return [spec.name for spec in module.serve.input_signature]


def existing_versions(export_dir):
    """Sorted version numbers (numeric folders) present in an export folder."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(
        int(name)
        for name in os.listdir(export_dir)
        if name.isdigit() and os.path.isdir(os.path.join(export_dir, name))
    )


def next_version(export_dir):
    """The version after the highest one in `export_dir` (1 for a new folder)."""
    versions = existing_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def check_version(version):
    """`version` as an int in 1..2**63-1 (TF Serving's int64), or None for "next".

    Raises:
        ExportError: not an integer (numpy integers are accepted) or out of range.
    """
    if version is None:
        return None
    try:
        number = None if isinstance(version, (bool, np.bool_)) else operator.index(version)
    except TypeError:
        number = None
    if number is None or not 1 <= number <= MAX_VERSION:
        raise ExportError(
            f"The version must be an integer from 1 to {MAX_VERSION} (TF Serving's int64); got {version!r}."
        )
    return number


def check_export_dir(export_dir):
    """The absolute path of `export_dir`, if it is or can become a folder.

    Raises:
        ExportError: the path is empty, or it or one of its parents is a file.
    """
    path = os.fspath(export_dir)
    if not path:
        raise ExportError("The output path is empty; give the export folder to write to.")
    path = os.path.abspath(path)
    ancestor = path
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ExportError(f"Output path '{ancestor}' exists and is not a folder.")
    return path


def check_exportable(model, formats="savedmodel"):
    """Raises ExportError for a model `export_model` cannot write in `formats`.

    Checked before any work (the CLI checks the float model before converting
    it): the model must be Functional or Sequential and, for a SavedModel,
    the names of its layers valid TensorFlow name scopes (input names need
    not be: their signature keys are made valid).
    """
    if not isinstance(model, keras.Model):
        raise ExportError(f"Only a keras.Model can be exported; got {type(model).__name__}.")
    try:
        inputs = model.inputs
    except AttributeError:
        inputs = None
    if not inputs:
        raise ExportError(
            f"Model '{model.name}' has no input tensors (a subclassed or unbuilt model): only "
            "Functional and Sequential models (such as those `convert` returns) can be exported."
        )
    if formats == "keras":
        return
    for layer in keras_internals.all_layers(model, include_self=True):
        if not isinstance(layer, keras.layers.InputLayer) and not _SCOPE_NAME.fullmatch(layer.name):
            raise ExportError(
                f"Layer '{layer.name}' has a name TensorFlow cannot trace (allowed: letters, digits "
                "and _ . - / >, no spaces): rename it to export the model."
            )


def _metadata(model, report, sizes, decode_weights, warmup_requests):
    input_keys = signature_keys([t.name for t in model.inputs])
    output_keys = signature_keys(list(model.output_names))
    return {
        "report": report.to_dict() if report is not None else None,
        "sizes": sizes,
        "serving": {"decode_weights": decode_weights, "warmup_requests": warmup_requests},
        "signature": {
            "name": SERVING_SIGNATURE,
            "inputs": {key: list(t.shape) for key, t in zip(input_keys, model.inputs)},
            "input_names": {key: t.name for key, t in zip(input_keys, model.inputs)},
            "outputs": output_keys,
            "output_names": dict(zip(output_keys, model.output_names)),
        },
        "versions": {
            "keras_powerquant": _package_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
    }


def _package_version():
    from keras_powerquant import __version__

    return __version__


def export_model(
    model,
    export_dir,
    version=1,
    *,
    formats="savedmodel",
    report=None,
    float_model=None,
    overwrite=False,
    decode_weights="load",
    warmup=0,
    warmup_data=None,
):
    """Exports a (converted) Keras model as one version of a TF Serving export folder.

    The version is staged whole and published with one rename (see the
    module docstring): readers never see part of a version, and a version
    is never replaced without `overwrite=True`, even by concurrent exports.

    Args:
        model: the Functional or Sequential `keras.Model` to export.
        export_dir: the export folder `OUT`; created (with its parents) if
            missing.
        version: an integer from 1 to 2**63-1, or None for the next free one
            (if another export takes it meanwhile, the one after).
        formats: "savedmodel" (the SavedModel in `OUT/<version>/`), "keras"
            (`OUT/<version>/kpq-model.keras` only) or "both".
        report: the `ConversionReport` to record in the version.
        float_model: the original float model, to record sizes against.
        overwrite: replace an existing version as a whole.
        decode_weights: "load" (default): the SavedModel decodes its weight
            codes once, when it is loaded, and then serves at the cost of a
            float model, holding float kernels in memory beside the codes;
            "call": it decodes them on every call (a gather and a scale per
            layer), holding only the codes. The files store codes either way.
        warmup: the number of TF Serving warm-up requests to write into the
            SavedModel (`assets.extra/tf_serving_warmup_requests`, at most
            1000), each calling `serving_default` with one example; 0 for none.
        warmup_data: the examples for them, in any form `convert` accepts as
            calibration data (taken in order, cycled if fewer); zeros without it.

    Returns:
        An `ExportResult`.

    Raises:
        ExportError: `export_dir` is empty or a file, the model cannot be
            exported, the version is invalid, or the version exists (or was
            written by another export meanwhile) and `overwrite` is False.
    """
    if formats not in FORMATS:
        raise ExportError(f"`formats` must be one of {FORMATS}; got {formats!r}.")
    if decode_weights not in DECODE_WEIGHTS:
        raise ExportError(f"`decode_weights` must be one of {DECODE_WEIGHTS}; got {decode_weights!r}.")
    version = check_version(version)
    if overwrite and version is None:
        raise ExportError("overwrite=True needs the version to replace; got version=None (the next one).")
    export_dir = check_export_dir(export_dir)
    check_exportable(model, formats)
    warmup = check_warmup_count(warmup)
    if warmup and formats == "keras":
        raise ExportError("Warm-up requests go into the SavedModel; formats='keras' writes none.")
    # Taken before anything is written: bad warm-up data fails the export early.
    warmup_inputs = warmup_examples(model, warmup, warmup_data) if warmup else []
    if version is not None and os.path.lexists(os.path.join(export_dir, str(version))) and not overwrite:
        raise _exists_error(export_dir, version)
    created = _make_folders(export_dir)
    try:
        with _folder_lock(export_dir):
            remove_stale_staging(export_dir)
        staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{_owner_tag()}-", dir=export_dir)
        try:
            _write_version(model, staging, formats, report, float_model, decode_weights, warmup_inputs)
            with _folder_lock(export_dir):
                version = _publish(staging, export_dir, version, overwrite)
        finally:
            # After an exchange, staging holds the replaced version.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        _remove_empty(created)
        raise
    version_dir = os.path.join(export_dir, str(version))
    return ExportResult(
        version=version,
        version_dir=version_dir,
        saved_model_dir=version_dir if formats in ("savedmodel", "both") else None,
        keras_path=os.path.join(version_dir, KERAS_FILE) if formats in ("keras", "both") else None,
        report_path=os.path.join(version_dir, REPORT_FILE),
    )


def _write_version(model, folder, formats, report, float_model, decode_weights, warmup_inputs):
    """Writes every artifact of a version into `folder`, the report last.

    `warmup_inputs`: one list of arrays (in `model.inputs` order) per warm-up request.
    """
    sizes = {"variable_bytes": variable_bytes(model)}
    if float_model is not None:
        sizes["float_variable_bytes"] = variable_bytes(float_model)
        sizes["variable_ratio"] = sizes["variable_bytes"] / sizes["float_variable_bytes"]
    saved_model = formats in ("savedmodel", "both")
    if saved_model:
        input_keys = save_serving_model(model, folder, decode_weights)
        if warmup_inputs:
            requests = [dict(zip(input_keys, example)) for example in warmup_inputs]
            write_warmup_requests(folder, requests, SERVING_SIGNATURE)
        sizes["saved_model_variables_dir_bytes"] = directory_bytes(os.path.join(folder, "variables"))
    if formats in ("keras", "both"):
        model.save(os.path.join(folder, KERAS_FILE))
    with open(os.path.join(folder, REPORT_FILE), "w", encoding="utf-8") as file:
        metadata = _metadata(model, report, sizes, decode_weights, len(warmup_inputs) if saved_model else 0)
        json.dump(metadata, file, indent=2)


def _exists_error(export_dir, version, meanwhile=False):
    when = " (another export wrote it while this one ran; nothing was written)" if meanwhile else ""
    return ExportError(
        f"Version {version} already exists in '{export_dir}'{when}; pass overwrite=True "
        "(--overwrite) to replace it, or choose another version."
    )


def _publish(staging, export_dir, version, overwrite):
    """Renames the staged folder to its version folder; returns the version number.

    Called with the folder lock held, which orders kpq's own writers; the
    renames alone already keep readers and other writers from seeing or
    making a mixed version.
    """
    if version is None:
        version = next_version(export_dir)
        while not _claim(staging, os.path.join(export_dir, str(version))):
            version += 1
        return version
    target = os.path.join(export_dir, str(version))
    if overwrite and os.path.lexists(target):
        _replace(staging, target, version)
    elif not _claim(staging, target):
        raise _exists_error(export_dir, version, meanwhile=True)
    return version


def _claim(staging, target):
    """Renames `staging` to `target` unless `target` exists; True if it did.

    `rename` of a folder fails when the target is a non-empty folder or a
    file, so the check and the claim are one atomic step. (An empty target
    folder holds no version and is replaced.)
    """
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) or isinstance(exc, FileExistsError):
            return False
        raise
    return True


def _replace(staging, target, version):
    """Puts `staging` in place of the existing `target` folder; the replaced one ends in `staging`."""
    if os.path.isdir(target) and _exchange(staging, target):
        return
    aside = tempfile.mkdtemp(
        prefix=f"{_ASIDE_PREFIX}{version}-{_owner_tag()}-", dir=os.path.dirname(target)
    )
    os.rmdir(aside)  # a unique name for the old version
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, staging)


def _exchange(first, second):
    """Swaps two paths atomically (Linux `renameat2` with RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange
    raise OSError(code, os.strerror(code), first, None, second)


@contextlib.contextmanager
def _folder_lock(folder):
    """Holds an exclusive `flock` on `folder` (no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _host():
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _owner_tag():
    return f"{os.getpid()}@{_host()}"


def _owner_alive(pid, host):
    """Whether the process that staged a folder may still run (True when unknowable)."""
    if host != _host() or os.name == "nt":  # os.kill(pid, 0) signals on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def remove_stale_staging(export_dir, max_age_seconds=STALE_AFTER_SECONDS):
    """Deletes what killed exports left in `export_dir`; returns the names removed.

    A staging folder is stale when the process that made it is gone (same
    host) or it is older than `max_age_seconds`. A version that a killed
    `overwrite` had renamed aside is put back if its place is still empty.
    """
    removed = []
    for name in os.listdir(export_dir):
        prefix = next((p for p in (_STAGING_PREFIX, _ASIDE_PREFIX) if name.startswith(p)), None)
        if prefix is None:
            continue
        path = os.path.join(export_dir, name)
        owner = _OWNED_NAME.fullmatch(name[len(prefix) :])
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            continue
        if owner is not None and _owner_alive(int(owner["pid"]), owner["host"]) and age < max_age_seconds:
            continue
        if owner is None and age < max_age_seconds:
            continue
        if prefix == _ASIDE_PREFIX and owner is not None and owner["version"]:
            target = os.path.join(export_dir, owner["version"])
            if not os.path.lexists(target):
                os.rename(path, target)
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


def _make_folders(path):
    """Creates `path` and its missing parents; returns the folders it created, deepest first."""
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    created = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise ExportError(f"Output path '{folder}' exists and is not a folder.") from None
        else:
            created.append(folder)
    return created[::-1]


def _remove_empty(folders):
    """Removes the folders a failed export created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return

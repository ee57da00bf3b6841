"""Export a converted model for TF Serving: versioned SavedModels, written atomically.

Layout of an export folder `OUT`:

```
OUT/
  1/                       # a version: saved_model.pb + variables/, tag "serve"
  2/
  kpq-report-1.json        # conversion report, sizes and versions of version 1
  kpq-model-1.keras        # the Keras model, when asked for
```

TF Serving loads the numeric folders and ignores everything else, so the
reports and `.keras` files can sit beside the versions. Each artifact is
written under a temporary name in `OUT` and renamed into place at the end:
an interrupted export leaves no partial version, and an existing version is
replaced only with `overwrite=True`.
"""

import dataclasses
import json
import os
import platform
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant import backend  # noqa: F401  (fails early on a non-TensorFlow backend)
from keras_powerquant.errors import ExportError
from keras_powerquant.warmup import check_warmup_count
from keras_powerquant.warmup import warmup_examples
from keras_powerquant.warmup import write_warmup_requests

SERVING_SIGNATURE = "serving_default"
REPORT_NAME = "kpq-report-{version}.json"
KERAS_NAME = "kpq-model-{version}.keras"
FORMATS = ("savedmodel", "keras", "both")
_TEMP_PREFIX = ".kpq-tmp-"


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export wrote its artifacts (None for those not written)."""

    version: int
    saved_model_dir: str
    keras_path: str
    report_path: str


def _raw_variable(variable):
    """The `tf.Variable` behind a Keras variable (TF backend)."""
    value = getattr(variable, "value", variable)
    if not isinstance(value, tf.Variable):
        raise ExportError(f"Variable '{variable.path}' is not backed by a tf.Variable.")
    return value


class _ServingModule(tf.Module):
    """Tracks exactly the model's raw `tf.Variable`s and a serving function.

    Keras' `ExportArchive` tracks both the Keras variable wrappers and the
    `tf.Variable`s the traced function captures, so TensorFlow stores every
    weight twice (keras-team/keras#23553). Tracking only the raw variables
    avoids that: the checkpoint holds each weight once.
    """

    def __init__(self, model):
        super().__init__(name="kpq_serving")
        self.model_variables = [_raw_variable(v) for v in model.variables]
        input_names = [t.name for t in model.inputs]
        output_names = list(model.output_names)
        input_dtypes = [t.dtype for t in model.inputs]
        input_struct = model._inputs_struct
        specs = [
            tf.TensorSpec(t.shape, tf.float32, name=name) for t, name in zip(model.inputs, input_names)
        ]

        @tf.function(input_signature=specs)
        def serve(*inputs):
            cast = [tf.cast(x, dtype) for x, dtype in zip(inputs, input_dtypes)]
            outputs = model(keras.tree.pack_sequence_as(input_struct, cast), training=False)
            flat = keras.tree.flatten(outputs)
            return {name: tf.cast(y, tf.float32) for name, y in zip(output_names, flat)}

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


def save_serving_model(model, path):
    """Writes `model` as a TF Serving SavedModel at `path` (which must not exist).

    The SavedModel has tag "serve" and one signature, `serving_default`
    (method tensorflow/serving/predict), whose input keys are the model's
    input names and output keys its output names, float32 in and out.

    Returns:
        The signature's input keys, in `model.inputs` order.
    """
    module = _ServingModule(model)
    tf.saved_model.save(
        module, path, signatures={SERVING_SIGNATURE: module.serve.get_concrete_function()}
    )
    return [spec.name for spec in module.serve.input_signature]


def existing_versions(export_dir):
    """Sorted version numbers present in an export folder."""
    if not os.path.isdir(export_dir):
        return []
    versions = set()
    for name in os.listdir(export_dir):
        if name.isdigit() and os.path.isdir(os.path.join(export_dir, name)):
            versions.add(int(name))
        for template in (REPORT_NAME, KERAS_NAME):
            prefix, suffix = template.split("{version}")
            if name.startswith(prefix) and name.endswith(suffix):
                number = name[len(prefix) : len(name) - len(suffix)]
                if number.isdigit():
                    versions.add(int(number))
    return sorted(versions)


def next_version(export_dir):
    """The version after the highest one in `export_dir` (1 for a new folder)."""
    versions = existing_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def _check_target(export_dir, version):
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ExportError(f"Output path '{export_dir}' exists and is not a folder.")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"The version must be an integer >= 1; got {version!r}.")


def _metadata(model, report, sizes):
    return {
        "report": report.to_dict() if report is not None else None,
        "sizes": sizes,
        "signature": {
            "name": SERVING_SIGNATURE,
            "inputs": {t.name: list(t.shape) for t in model.inputs},
            "outputs": list(model.output_names),
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
    warmup=0,
    warmup_data=None,
):
    """Exports a (converted) Keras model into a TF Serving export folder.

    Args:
        model: the `keras.Model` to export.
        export_dir: the export folder `OUT`; created if missing.
        version: the version number (an int >= 1), or None for the next free
            one.
        formats: "savedmodel" (`OUT/<version>/`), "keras"
            (`OUT/kpq-model-<version>.keras`) or "both".
        report: the `ConversionReport` to record beside the version.
        float_model: the original float model, to record sizes against.
        overwrite: replace an existing version, all its artifacts (an old
            SavedModel or .keras file not rewritten now is removed).
        warmup: the number of TF Serving warm-up requests to write into the
            SavedModel (`assets.extra/tf_serving_warmup_requests`, at most
            1000), each calling `serving_default` with one example; 0 for none.
        warmup_data: the examples for them, in any form `convert` accepts as
            calibration data (taken in order, cycled if fewer); zeros without it.

    Returns:
        An `ExportResult`.

    Raises:
        ExportError: `export_dir` is a file, the version is invalid, or its
            artifacts exist and `overwrite` is False.
    """
    if formats not in FORMATS:
        raise ExportError(f"`formats` must be one of {FORMATS}; got {formats!r}.")
    warmup = check_warmup_count(warmup)
    if warmup and formats == "keras":
        raise ExportError("Warm-up requests go into the SavedModel; formats='keras' writes none.")
    # Taken before anything is written: bad warm-up data fails the export early.
    warmup_inputs = warmup_examples(model, warmup, warmup_data) if warmup else []
    export_dir = os.path.abspath(os.fspath(export_dir))
    if version is None:
        version = next_version(export_dir)
    _check_target(export_dir, version)
    # Moved into place in this order: the report last, once its model is there.
    targets = {}
    if formats in ("savedmodel", "both"):
        targets["savedmodel"] = os.path.join(export_dir, str(version))
    if formats in ("keras", "both"):
        targets["keras"] = os.path.join(export_dir, KERAS_NAME.format(version=version))
    targets["report"] = os.path.join(export_dir, REPORT_NAME.format(version=version))
    existing = [path for path in targets.values() if os.path.exists(path)]
    if existing and not overwrite:
        raise ExportError(
            f"Version {version} already exists in '{export_dir}' ({', '.join(map(os.path.basename, existing))}); "
            "pass overwrite=True (--overwrite) to replace it, or choose another version."
        )
    created = not os.path.exists(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{version}-", dir=export_dir)
    succeeded = False
    try:
        staged = {name: os.path.join(staging, os.path.basename(path)) for name, path in targets.items()}
        sizes = {"variable_bytes": variable_bytes(model)}
        if float_model is not None:
            sizes["float_variable_bytes"] = variable_bytes(float_model)
            sizes["variable_ratio"] = sizes["variable_bytes"] / sizes["float_variable_bytes"]
        if "savedmodel" in staged:
            input_keys = save_serving_model(model, staged["savedmodel"])
            if warmup_inputs:
                requests = [dict(zip(input_keys, example)) for example in warmup_inputs]
                write_warmup_requests(staged["savedmodel"], requests, SERVING_SIGNATURE)
            sizes["saved_model_variables_dir_bytes"] = directory_bytes(
                os.path.join(staged["savedmodel"], "variables")
            )
        if "keras" in staged:
            model.save(staged["keras"])
        with open(staged["report"], "w", encoding="utf-8") as file:
            json.dump(_metadata(model, report, sizes), file, indent=2)
        if overwrite:
            _retire_other_artifacts(export_dir, version, targets, staging)
        _move_into_place(staged, targets)
        succeeded = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not succeeded and not os.listdir(export_dir):
            os.rmdir(export_dir)  # a failed first export leaves no empty folder
    return ExportResult(
        version=version,
        saved_model_dir=targets.get("savedmodel"),
        keras_path=targets.get("keras"),
        report_path=targets["report"],
    )


def _retire_other_artifacts(export_dir, version, targets, staging):
    """Moves this version's artifacts that are not being rewritten into staging (deleted with it).

    Replacing a version must not leave, say, its old .keras file beside a
    new SavedModel and a report that describes only the new conversion.
    """
    artifacts = (os.path.join(export_dir, str(version)), os.path.join(export_dir, KERAS_NAME.format(version=version)))
    for path in artifacts:
        if path not in targets.values() and os.path.exists(path):
            os.rename(path, os.path.join(staging, os.path.basename(path) + ".stale"))


def _move_into_place(staged, targets):
    """Renames staged artifacts onto their targets; replaced ones go back to staging."""
    for name, target in targets.items():
        if os.path.exists(target):
            retired = staged[name] + ".old"
            os.rename(target, retired)
        os.rename(staged[name], target)

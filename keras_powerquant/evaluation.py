"""Top-k accuracy of Keras models and SavedModels on the same images.

The data are checked before any model runs: inputs against each model's
input shape, labels (integers or one-hot rows) against the images and the
number of classes the models score. A result is either right or an
`EvaluationDataError` that says what does not fit.
"""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from keras_powerquant import keras_internals
from keras_powerquant.errors import EvaluationDataError
from keras_powerquant.errors import ModelLoadError
from keras_powerquant.export import existing_versions
from keras_powerquant.export import SERVING_SIGNATURE
from keras_powerquant.loading import load_model


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A single-input, single-output model that maps a batch to scores.

    Attributes:
        source: the path it was loaded from.
        kind: "keras" or "savedmodel".
        predict: function from a float32 batch to a `(batch, classes)` array.
        input_shape: the input shape it accepts, `None` for free dimensions.
        output_shape: the shape of its scores, `(None, classes)` for a classifier.
    """

    source: str
    kind: str
    predict: object
    input_shape: tuple = None
    output_shape: tuple = None


def _shape(shape):
    return tuple(None if d is None else int(d) for d in shape)


def _describe(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def resolve_saved_model(path):
    """The SavedModel folder for `path`: itself, or an export folder's newest version."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [
        v for v in existing_versions(path) if os.path.isfile(os.path.join(path, str(v), "saved_model.pb"))
    ]
    if versions:
        return os.path.join(path, str(versions[-1]))
    return None


def _saved_model_predictor(path, folder):
    try:
        loaded = tf.saved_model.load(folder)
    except Exception as exc:  # noqa: BLE001 - TF raises many types for a bad folder
        raise ModelLoadError(f"Cannot load the SavedModel in '{folder}': {str(exc).splitlines()[0]}") from exc
    if SERVING_SIGNATURE not in loaded.signatures:
        raise ModelLoadError(f"SavedModel '{folder}' has no '{SERVING_SIGNATURE}' signature.")
    signature = loaded.signatures[SERVING_SIGNATURE]
    _, inputs = signature.structured_input_signature
    outputs = signature.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(
            f"SavedModel '{folder}' has {len(inputs)} inputs and {len(outputs)} outputs; "
            "evaluation needs exactly one of each."
        )
    ((input_name, input_spec),) = inputs.items()
    ((output_name, output_spec),) = outputs.items()

    def predict(batch):
        return signature(**{input_name: tf.constant(batch)})[output_name].numpy()

    # Keep the loaded object alive as long as the predictor.
    predict.loaded = loaded
    return Predictor(path, "savedmodel", predict, _shape(input_spec.shape), _shape(output_spec.shape))


def load_predictor(path):
    """Loads a `.keras`/`.h5` model, a SavedModel folder or an export folder.

    Raises:
        ModelLoadError: the path cannot be loaded or has several inputs/outputs.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = resolve_saved_model(path)
        if folder is not None:
            return _saved_model_predictor(path, folder)
    model = load_model(path)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelLoadError(
            f"'{path}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "evaluation needs exactly one of each."
        )
    structure = keras_internals.input_structure(model)

    def predict(batch):
        inputs = keras.tree.pack_sequence_as(structure, [batch])
        return np.asarray(model(inputs, training=False))

    return Predictor(path, "keras", predict, _shape(model.inputs[0].shape), _shape(model.outputs[0].shape))


def check_images(x):
    """`x` as float32 after checking it is a non-empty, finite, numeric batch.

    Raises:
        EvaluationDataError: no images, a non-numeric dtype, NaN or Inf.
    """
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or x.ndim == 0:
        raise EvaluationDataError(
            f"The inputs must be a numeric array (images, ...); got dtype {x.dtype}, shape {x.shape}."
        )
    if len(x) == 0:
        raise EvaluationDataError(f"The inputs hold no images (shape {x.shape}).")
    x = x.astype(np.float32, copy=False)
    bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if bad:
        raise EvaluationDataError(f"The inputs hold {bad} NaN or Inf values (or overflow float32).")
    return x


def class_labels(y, count):
    """Integer class labels `(count,)` from integer labels or one-hot rows.

    Args:
        y: labels of shape `(count,)` or `(count, 1)` holding whole numbers
            >= 0, or one-hot rows `(count, classes)` (one 1 per row, zeros
            elsewhere), which are taken as their argmax.
        count: the number of images.

    Returns:
        `(labels, classes)`: int64 labels and, for one-hot rows, their
        number of classes (else None).

    Raises:
        EvaluationDataError: labels that do not match the images or are not
            class indices or one-hot rows.
    """
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_) or y.ndim == 0:
        raise EvaluationDataError(f"The labels must be a numeric array; got dtype {y.dtype}, shape {y.shape}.")
    if len(y) != count:
        raise EvaluationDataError(f"{count} inputs but {len(y)} labels.")
    if not np.all(np.isfinite(y)):
        raise EvaluationDataError("The labels hold NaN or Inf values.")
    classes = None
    if y.ndim == 2 and y.shape[1] > 1:
        one_hot = np.all((y == 0) | (y == 1), axis=1) & (np.count_nonzero(y, axis=1) == 1)
        if not np.all(one_hot):
            row = int(np.argmin(one_hot))
            raise EvaluationDataError(
                f"Labels of shape {y.shape} must be one-hot rows (a single 1 per row); row {row} is "
                f"{np.array2string(y[row], threshold=12)}. Give class indices of shape ({count},) instead."
            )
        y, classes = np.argmax(y, axis=1), y.shape[1]
    elif y.ndim == 2:
        y = y[:, 0]
    elif y.ndim != 1:
        raise EvaluationDataError(
            f"Labels must have shape ({count},) (class indices) or ({count}, classes) (one-hot); got {y.shape}."
        )
    if np.any(y != np.round(y)):
        raise EvaluationDataError("The labels must be whole numbers (class indices); some have a fraction.")
    if np.any(y < 0):
        raise EvaluationDataError(f"The labels must be class indices >= 0; the smallest is {y.min()}.")
    return y.astype(np.int64), classes


def check_predictor(predictor, x_shape, labels, classes=None):
    """Raises EvaluationDataError if `predictor` cannot be scored on these data.

    Args:
        predictor: a `Predictor`.
        x_shape: the shape of the inputs, `(n, ...)`.
        labels: int64 class labels.
        classes: the number of classes of one-hot labels, or None.
    """
    expected = predictor.input_shape
    if expected is not None and (
        len(expected) != len(x_shape) or any(e is not None and e != g for e, g in zip(expected[1:], x_shape[1:]))
    ):
        raise EvaluationDataError(
            f"'{predictor.source}' expects inputs of shape {_describe(expected)}; the data's inputs have "
            f"shape {_describe(x_shape)}."
        )
    output = predictor.output_shape
    if output is None:
        return
    if len(output) != 2:
        raise EvaluationDataError(
            f"'{predictor.source}' outputs shape {_describe(output)}; accuracy needs scores of shape "
            "(batch, classes)."
        )
    if output[1] is not None:
        if classes is not None and classes != output[1]:
            raise EvaluationDataError(
                f"The labels are one-hot over {classes} classes; '{predictor.source}' scores {output[1]}."
            )
        if labels.max() >= output[1]:
            raise EvaluationDataError(
                f"The labels go up to {labels.max()}; '{predictor.source}' scores {output[1]} classes "
                f"(0 to {output[1] - 1})."
            )


def top_k_accuracy(predictor, x, y, batch_size=128, k=(1, 5)):
    """Top-k accuracies of `predictor` on `(x, y)`.

    Args:
        predictor: a `Predictor`.
        x: inputs, `(n, ...)`, converted to float32.
        y: class indices `(n,)` or `(n, 1)`, or one-hot rows `(n, classes)`.
        batch_size: evaluation batch size.
        k: the k values to report.

    Returns:
        A dict `{"top1": ..., "top5": ..., "images": n}`.

    Raises:
        EvaluationDataError: the data do not fit each other or the model,
            checked before the model runs, or the model scores NaN.
    """
    x = check_images(x)
    labels, classes = class_labels(y, len(x))
    check_predictor(predictor, x.shape, labels, classes)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
    hits = {value: 0 for value in k}
    for start in range(0, len(x), batch_size):
        scores = np.asarray(predictor.predict(x[start : start + batch_size]))
        batch_labels = labels[start : start + batch_size]
        if scores.ndim != 2 or len(scores) != len(batch_labels):
            raise EvaluationDataError(
                f"'{predictor.source}' returned scores of shape {scores.shape} for {len(batch_labels)} "
                "images; accuracy needs (batch, classes)."
            )
        if not np.all(np.isfinite(scores)):
            raise EvaluationDataError(
                f"'{predictor.source}' returned NaN or Inf scores for images {start} to "
                f"{start + len(batch_labels) - 1}."
            )
        ranked = np.argsort(-scores, axis=1, kind="stable")
        for value in k:
            hits[value] += int(np.sum(np.any(ranked[:, :value] == batch_labels[:, None], axis=1)))
    result = {f"top{value}": hits[value] / len(labels) for value in k}
    result["images"] = int(len(labels))
    return result

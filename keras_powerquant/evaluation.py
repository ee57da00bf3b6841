"""Top-k accuracy of Keras models and SavedModels on the same images."""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

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
    """

    source: str
    kind: str
    predict: object


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
    (input_name,) = inputs
    (output_name,) = outputs

    def predict(batch):
        return signature(**{input_name: tf.constant(batch)})[output_name].numpy()

    # Keep the loaded object alive as long as the predictor.
    predict.loaded = loaded
    return Predictor(path, "savedmodel", predict)


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
    structure = model._inputs_struct

    def predict(batch):
        inputs = keras.tree.pack_sequence_as(structure, [batch])
        return np.asarray(model(inputs, training=False))

    return Predictor(path, "keras", predict)


def top_k_accuracy(predictor, x, y, batch_size=128, k=(1, 5)):
    """Top-k accuracies of `predictor` on `(x, y)`.

    Args:
        predictor: a `Predictor`.
        x: float32 inputs, `(n, ...)`.
        y: integer labels, `(n,)`.
        batch_size: evaluation batch size.
        k: the k values to report.

    Returns:
        A dict `{"top1": ..., "top5": ..., "images": n}`.
    """
    y = np.asarray(y).astype(np.int64).ravel()
    hits = {value: 0 for value in k}
    for start in range(0, len(x), batch_size):
        scores = np.asarray(predictor.predict(x[start : start + batch_size]))
        labels = y[start : start + batch_size]
        ranked = np.argsort(-scores, axis=1, kind="stable")
        for value in k:
            hits[value] += int(np.sum(np.any(ranked[:, :value] == labels[:, None], axis=1)))
    result = {f"top{value}": hits[value] / len(y) for value in k}
    result["images"] = int(len(y))
    return result

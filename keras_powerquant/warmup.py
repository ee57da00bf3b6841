"""TF Serving warm-up requests: `assets.extra/tf_serving_warmup_requests` in a version folder.

TF Serving runs the records of this file through a model version after
loading it and before it serves it, so the first real request does not pay
for TensorFlow's lazy start-up (graph optimisation, kernel selection, memory
allocation). The file is a TFRecord file of `tensorflow.serving.PredictionLog`
protos; each record written here is a `predict_log` whose `PredictRequest`
calls the `serving_default` signature with one example. TF Serving reads at
most `MAX_WARMUP_REQUESTS` (1000) records.

The PredictionLog, PredictLog, PredictRequest and ModelSpec messages belong
to the tensorflow-serving-api package, which pins a TensorFlow version of its
own, so this module writes their protobuf wire format itself (field numbers
from tensorflow_serving/apis/prediction_log.proto, predict.proto and
model.proto) around TensorFlow's own `TensorProto`s.
"""

import os

import numpy as np
import tensorflow as tf

from keras_powerquant.converter.calibration import calibration_batches
from keras_powerquant.errors import ExportError
from keras_powerquant.limits import MAX_WARMUP_REQUESTS

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")

# Field numbers of the TF Serving messages written here.
_PREDICTION_LOG_PREDICT_LOG = 6  # PredictionLog.predict_log (PredictLog)
_PREDICT_LOG_REQUEST = 1  # PredictLog.request (PredictRequest)
_PREDICT_REQUEST_MODEL_SPEC = 1  # PredictRequest.model_spec (ModelSpec)
_PREDICT_REQUEST_INPUTS = 2  # PredictRequest.inputs (map<string, TensorProto>)
_MODEL_SPEC_SIGNATURE_NAME = 3  # ModelSpec.signature_name (string)
_MAP_ENTRY_KEY, _MAP_ENTRY_VALUE = 1, 2  # how protobuf encodes a map entry
_LENGTH_DELIMITED = 2  # wire type of strings, bytes and messages


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, payload):
    """A length-delimited field: tag, length, payload."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def predict_log_record(inputs, signature_name):
    """One serialized `PredictionLog` whose PredictRequest feeds `inputs` to a signature.

    Args:
        inputs: `{signature input key: numpy array}`.
        signature_name: the SignatureDef to call, e.g. "serving_default".

    Returns:
        The serialized message (bytes). The model name is left empty: TF
        Serving warms up the model it is loading whatever the request names.
    """
    request = _field(_PREDICT_REQUEST_MODEL_SPEC, _field(_MODEL_SPEC_SIGNATURE_NAME, signature_name.encode()))
    for key in sorted(inputs):
        tensor = tf.make_tensor_proto(inputs[key]).SerializeToString()
        entry = _field(_MAP_ENTRY_KEY, key.encode()) + _field(_MAP_ENTRY_VALUE, tensor)
        request += _field(_PREDICT_REQUEST_INPUTS, entry)
    return _field(_PREDICTION_LOG_PREDICT_LOG, _field(_PREDICT_LOG_REQUEST, request))


def check_warmup_count(count):
    """Returns `count` as an int, or raises ExportError outside 0..MAX_WARMUP_REQUESTS."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= MAX_WARMUP_REQUESTS:
        raise ExportError(
            f"The number of warm-up requests must be an integer from 0 to {MAX_WARMUP_REQUESTS} "
            f"(TF Serving reads at most {MAX_WARMUP_REQUESTS}); got {count!r}."
        )
    return int(count)


def warmup_examples(model, count, data=None):
    """`count` single examples of the model's inputs, each a list of float32 arrays in `model.inputs` order.

    Examples are taken in order from `data` (any form `convert` accepts as
    calibration data), cycling when it holds fewer; zeros without it.

    Raises:
        ExportError: without `data`, an input has an unknown dimension
            other than the batch (the example's shape cannot be guessed).
        CalibrationDataError: `data` does not match the model's inputs.
    """
    if data is None:
        unknown = [t.name for t in model.inputs if any(d is None for d in t.shape[1:])]
        if unknown:
            raise ExportError(
                f"Inputs {unknown} have dimensions of unknown size, so zero warm-up requests cannot be "
                "shaped; pass example inputs (the calibration data) for the warm-up requests."
            )
        zeros = [np.zeros((1,) + tuple(t.shape[1:]), np.float32) for t in model.inputs]
        return [zeros] * count
    examples = []
    for batch in calibration_batches(data, model.inputs):
        for index in range(len(batch[0])):
            examples.append([np.asarray(array[index : index + 1], np.float32) for array in batch])
            if len(examples) == count:
                return examples
    return [examples[i % len(examples)] for i in range(count)]


def write_warmup_requests(saved_model_dir, requests, signature_name):
    """Writes `assets.extra/tf_serving_warmup_requests` into a SavedModel folder.

    Args:
        saved_model_dir: the version folder.
        requests: a list of `{signature input key: array}`, one per request.
        signature_name: the signature each request calls.

    Returns:
        The path of the file written.
    """
    path = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for inputs in requests:
            writer.write(predict_log_record(inputs, signature_name))
    return path

"""The TF Serving REST example of the usage guide (docs/usage.md) is exact for the exports kpq writes.

No TF Serving runs here (no Docker engine on the development machines): a
local HTTP server answers `POST /v1/models/<name>:predict` in TF Serving's
columnar JSON format (tensorflow_serving/g3doc/api_rest.md) by feeding the
request to the real export's `serving_default` signature, and refuses input
keys that are not the signature's, as TF Serving does. The guide's Python
example then runs as written, with only its host and data file replaced.
"""

import ast
import http.server
import json
import pathlib
import re
import threading

import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.export import export_model
from tests import models

USAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "usage.md"
_PREDICT_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/\d+)?:predict$")


def columnar_predict(signature, body):
    """TF Serving's REST predict in columnar format: `{"inputs": ...}` -> `{"outputs": ...}`.

    "inputs" is an object keyed by the signature's input keys (or the bare
    value for a one-input signature); "outputs" is an object keyed by the
    output keys, or the bare value when there is one output.
    """
    specs = signature.structured_input_signature[1]
    inputs = body["inputs"]
    if not isinstance(inputs, dict):
        if len(specs) != 1:
            raise ValueError("a bare 'inputs' value needs a signature with one input")
        inputs = {next(iter(specs)): inputs}
    if sorted(inputs) != sorted(specs):
        raise ValueError(f"input keys {sorted(inputs)} are not the signature's {sorted(specs)}")
    tensors = {key: tf.constant(np.asarray(value, specs[key].dtype.as_numpy_dtype)) for key, value in inputs.items()}
    outputs = {key: value.numpy().tolist() for key, value in signature(**tensors).items()}
    return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}


class _PredictServer(http.server.ThreadingHTTPServer):
    """Serves `{model name: SavedModel signature}` at /v1/models/<name>:predict."""

    def __init__(self, signatures):
        super().__init__(("127.0.0.1", 0), _PredictHandler)
        self.signatures = signatures

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _PredictHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        match = _PREDICT_PATH.match(self.path)
        signature = self.server.signatures.get(match["name"]) if match else None
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if signature is None:
            status, answer = 404, {"error": f"Servable not found for request: {self.path}"}
        else:
            try:
                status, answer = 200, columnar_predict(signature, json.loads(body))
            except (ValueError, KeyError, TypeError) as exc:
                status, answer = 400, {"error": str(exc)}
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _serving(signatures):
    server = _PredictServer(signatures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _readme_rest_example():
    """The usage guide's Python REST example and the model name its docker command serves."""
    text = USAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [block for block in blocks if ":predict" in block]
    (model_name,) = re.findall(r"MODEL_NAME=(\w+)", text)
    return code, model_name


def test_readme_rest_example_runs_against_a_real_export(resnet8_model, cifar_test, tmp_path, monkeypatch, capsys):
    code, model_name = _readme_rest_example()
    quantized, report = kpq.convert(resnet8_model, 4, 4)
    saved_model_dir = export_model(quantized, tmp_path / "export", 1, report=report).saved_model_dir
    signature = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    np.savez(tmp_path / "test.npz", x=cifar_test[0][:4], y=cifar_test[1][:4])
    server = _serving({model_name: signature})
    try:
        assert "http://localhost:8501" in code
        monkeypatch.chdir(tmp_path)  # the example reads "test.npz"
        exec(code.replace("http://localhost:8501", server.url), {})  # noqa: S102 - the guide's own code
    finally:
        server.shutdown()
    printed = ast.literal_eval(capsys.readouterr().out.strip())
    feed = {key: tf.constant(cifar_test[0][:2]) for key in signature.structured_input_signature[1]}
    (expected,) = signature(**feed).values()
    np.testing.assert_allclose(np.array(printed), expected.numpy(), atol=1e-6)


def test_json_body_from_the_signature_of_a_multi_io_export(tmp_path):
    model = models.build("multi_io")
    quantized, report = kpq.convert(model, 4, 4, calibration_data=models.reference_inputs(model))
    signature = tf.saved_model.load(export_model(quantized, tmp_path, 1).saved_model_dir).signatures["serving_default"]
    inputs = models.reference_inputs(model, n=3, seed=7)
    body = json.dumps({"inputs": {key: value.tolist() for key, value in inputs.items()}})
    answer = columnar_predict(signature, json.loads(body))
    # Several outputs: an object keyed by the signature's output keys, the model's output names.
    assert sorted(answer["outputs"]) == sorted(signature.structured_outputs) == ["label", "score"]
    expected = quantized(inputs, training=False)
    for key, value in answer["outputs"].items():
        np.testing.assert_allclose(np.array(value), np.asarray(expected[key]), atol=1e-5)
    with pytest.raises(ValueError, match="not the signature's"):
        columnar_predict(signature, {"inputs": {"image": inputs["image"].tolist()}})

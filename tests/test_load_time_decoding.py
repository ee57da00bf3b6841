"""Weight codes decoded once when the SavedModel is loaded (`decode_weights="load"`), or on every call."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.errors import ExportError
from keras_powerquant.export import export_model
from tests import models
from tests.serving_graph import load_nodes
from tests.serving_graph import nodes_without_gpu_kernel
from tests.serving_graph import serving_nodes
from tests.test_export import _serve_in_fresh_process

# Loads a SavedModel the way TF Serving's C++ `LoadSavedModel` does: a
# Session over the stored GraphDef, restore op, then init op, then the
# signature run by tensor names (several runs: each reruns VarHandleOp).
_SESSION_SERVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    inputs = dict(np.load(sys.argv[2]))
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], sys.argv[1])
        signature = meta_graph.signature_def["serving_default"]
        feed = {signature.inputs[name].name: value for name, value in inputs.items()}
        fetches = {name: info.name for name, info in signature.outputs.items()}
        runs = [session.run(fetches, feed) for _ in range(2)]
    for name in fetches:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
    np.savez(sys.argv[3], **runs[1])
    """
)


@pytest.fixture(scope="module")
def converted():
    """A W4/A4 model with Conv2D, DepthwiseConv2D (multiplier 2) and Dense kernels."""
    model = models.build("mobilenet")
    quantized, report = kpq.convert(model, 4, 4, quantize_first_last=True)
    return model, quantized, report


@pytest.fixture(scope="module")
def exports(converted, tmp_path_factory):
    _, quantized, report = converted
    out = tmp_path_factory.mktemp("decode")
    return {
        mode: export_model(quantized, out / mode, report=report, decode_weights=mode).saved_model_dir
        for mode in ("load", "call")
    }


@pytest.fixture(scope="module")
def inputs(converted):
    model = converted[0]
    return {model.inputs[0].name: models.reference_inputs(model, n=8)}


def _expected(converted, inputs):
    _, quantized, _ = converted
    (expected,) = models.predict(quantized, next(iter(inputs.values())))
    return expected


def test_load_time_decoding_serves_the_keras_outputs_in_a_fresh_process(exports, converted, inputs, tmp_path):
    served = _serve_in_fresh_process(exports["load"], inputs, tmp_path)
    (output,) = served.values()
    assert np.max(np.abs(output - _expected(converted, inputs))) <= 1e-5


def test_load_time_decoding_in_a_session_as_the_cpp_loader_runs_it(exports, converted, inputs, tmp_path):
    inputs_path, outputs_path = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    np.savez(inputs_path, **inputs)
    result = subprocess.run(
        [sys.executable, "-c", _SESSION_SERVER, exports["load"], inputs_path, outputs_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (output,) = dict(np.load(outputs_path)).values()
    assert np.max(np.abs(output - _expected(converted, inputs))) <= 1e-5


def test_serving_graph_reads_decoded_kernels_and_the_load_graph_decodes_them(exports, converted):
    _, quantized, report = converted
    serving = {node.op for node in serving_nodes(exports["load"])}
    at_load = load_nodes(exports["load"])
    assert "GatherV2" not in serving and "ReadVariableOp" in serving
    assigned = [node for node in at_load if node.op == "AssignVariableOp"]
    assert len(assigned) == len(report.quantized_layers)
    assert nodes_without_gpu_kernel(serving_nodes(exports["load"]) + at_load) == []
    # Per call instead: the gather is in the serving graph and nothing is decoded at load.
    assert "GatherV2" in {node.op for node in serving_nodes(exports["call"])}
    assert not [node for node in load_nodes(exports["call"]) if node.op == "AssignVariableOp"]


def test_both_modes_store_only_the_codes(exports, converted):
    _, quantized, _ = converted
    stored = {}
    for mode, folder in exports.items():
        names = tf.train.list_variables(os.path.join(folder, "variables", "variables"))
        stored[mode] = sorted((name, tuple(shape)) for name, shape in names if "VARIABLE_VALUE" in name)
    assert stored["load"] == stored["call"]
    assert len(stored["load"]) == len(quantized.variables)


def test_call_mode_serves_the_same_outputs(exports, converted, inputs):
    signature = tf.saved_model.load(exports["call"]).signatures["serving_default"]
    (output,) = signature(**{k: tf.constant(v) for k, v in inputs.items()}).values()
    assert np.max(np.abs(output.numpy() - _expected(converted, inputs))) <= 1e-5


def test_two_loads_in_one_process_stay_valid_when_one_is_released(exports, converted, inputs):
    expected = _expected(converted, inputs)
    first = tf.saved_model.load(exports["load"])
    second = tf.saved_model.load(exports["load"])
    del first
    gc.collect()
    (output,) = second.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()}).values()
    assert np.max(np.abs(output.numpy() - expected)) <= 1e-5


def test_different_models_with_the_same_layer_names_do_not_share_kernels(tmp_path, inputs):
    """Two models of one architecture, different weights, loaded side by side."""
    served = []
    for seed in (0, 1):
        model = models.build("mobilenet", seed=seed)
        quantized, _ = kpq.convert(model, 4, 4, quantize_first_last=True)
        folder = export_model(quantized, tmp_path / str(seed)).saved_model_dir
        served.append((tf.saved_model.load(folder), models.predict(quantized, next(iter(inputs.values())))[0]))
    for loaded, expected in served:
        (output,) = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()}).values()
        assert np.max(np.abs(output.numpy() - expected)) <= 1e-5


def test_report_records_the_decoding_and_bad_values_are_refused(converted, tmp_path):
    import json

    _, quantized, _ = converted
    result = export_model(quantized, tmp_path / "out", decode_weights="call")
    with open(result.report_path, encoding="utf-8") as file:
        assert json.load(file)["serving"] == {"decode_weights": "call", "warmup_requests": 0}
    with pytest.raises(ExportError, match="decode_weights"):
        export_model(quantized, tmp_path / "bad", decode_weights="never")
    assert not os.path.exists(tmp_path / "bad")


def test_cli_decode_weights_option_and_inspect(tmp_path):
    from tests.cli_helpers import invoke

    path = tmp_path / "model.keras"
    models.build("mobilenet").save(path)
    for mode in ("call", "load"):
        result = invoke("convert", path, "-o", tmp_path / mode, "--decode-weights", mode)
        assert result.exit_code == 0, result.output
        folder = tmp_path / mode / "1"
        assert ("GatherV2" in {node.op for node in serving_nodes(str(folder))}) == (mode == "call")
        inspected = invoke("inspect", tmp_path / mode)
        assert inspected.exit_code == 0, inspected.output
        expected = "decoded on every call" if mode == "call" else "decoded once when the SavedModel loads"
        assert f"Serving: weight codes {expected}" in inspected.stdout
    dry_run = invoke("inspect", path)
    assert dry_run.exit_code == 0, dry_run.output
    assert "Export (kpq convert): weight codes decoded once when the SavedModel loads" in dry_run.stdout
    assert "Activation exponents: among 1, 1/2, 1/4" in dry_run.stdout
    bad = invoke("convert", path, "-o", tmp_path / "bad", "--decode-weights", "never")
    assert bad.exit_code == 2 and "--decode-weights" in bad.stderr
    assert not os.path.exists(tmp_path / "bad")

"""SavedModel export: TF Serving layout, standard ops only, integer weights, atomic writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.errors import ExportError
from keras_powerquant.export import export_model
from keras_powerquant.export import next_version
from tests.models import activation_forms_model
from tests.serving_graph import load_nodes
from tests.serving_graph import nodes_without_gpu_kernel
from tests.serving_graph import optimized_serving_nodes
from tests.serving_graph import serving_nodes

# Loads a SavedModel where keras_powerquant cannot be imported, runs
# serving_default on the arrays of an .npz and saves the outputs.
_FRESH_PROCESS_SERVER = textwrap.dedent(
    """
    import sys

    class BlockKerasPowerQuant:
        def find_spec(self, name, path=None, target=None):
            if name == "keras_powerquant" or name.startswith("keras_powerquant."):
                raise ImportError("keras_powerquant is blocked in this process")
            return None

    sys.meta_path.insert(0, BlockKerasPowerQuant())
    import numpy as np
    import tensorflow as tf

    try:
        import keras_powerquant  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("keras_powerquant was importable")
    serving = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    inputs = dict(np.load(sys.argv[2]))
    outputs = serving(**{name: tf.constant(value) for name, value in inputs.items()})
    np.savez(sys.argv[3], **{name: value.numpy() for name, value in outputs.items()})
    """
)


def _serve_in_fresh_process(saved_model_dir, inputs, tmp_path):
    inputs_path, outputs_path = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    np.savez(inputs_path, **inputs)
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_SERVER, saved_model_dir, inputs_path, outputs_path],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Grappler must optimize the serving graph without errors in the log.
    assert "remapper failed" not in result.stderr, result.stderr[-3000:]
    return dict(np.load(outputs_path))


@pytest.fixture(scope="module")
def resnet8_w4(resnet8_model):
    return kpq.convert(resnet8_model, 4, 4)


@pytest.fixture(scope="module")
def resnet8_export(resnet8_w4, resnet8_model, tmp_path_factory):
    quantized, report = resnet8_w4
    out = tmp_path_factory.mktemp("export")
    return export_model(quantized, out, formats="both", report=report, float_model=resnet8_model)


def test_tf_serving_layout_and_signature(resnet8_export, resnet8_w4):
    quantized, _ = resnet8_w4
    assert os.path.basename(resnet8_export.saved_model_dir) == "1"
    assert os.path.isfile(os.path.join(resnet8_export.saved_model_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(resnet8_export.saved_model_dir, "variables"))
    loaded = tf.saved_model.load(resnet8_export.saved_model_dir, tags=["serve"])
    signature = loaded.signatures["serving_default"]
    _, input_specs = signature.structured_input_signature
    assert sorted(input_specs) == sorted(t.name for t in quantized.inputs)
    assert all(spec.dtype == tf.float32 for spec in input_specs.values())
    assert sorted(signature.structured_outputs) == sorted(quantized.output_names)


def test_saved_model_serves_without_keras_powerquant(resnet8_export, resnet8_w4, cifar_test, tmp_path):
    quantized, _ = resnet8_w4
    x = cifar_test[0][:64]
    served = _serve_in_fresh_process(resnet8_export.saved_model_dir, {"input_1": x}, tmp_path)
    expected = quantized.predict(x, verbose=0)
    assert np.max(np.abs(served["dense"] - expected)) <= 1e-5
    # Called eagerly (no Grappler), the layers compute the same square roots.
    assert np.max(np.abs(served["dense"] - quantized(x).numpy())) <= 1e-5


def test_every_serving_op_has_a_gpu_kernel(resnet8_export):
    nodes, at_load = serving_nodes(resnet8_export.saved_model_dir), load_nodes(resnet8_export.saved_model_dir)
    ops = {node.op for node in nodes}
    # Activations (default exponents 1, 1/2, 1/4): FakeQuant between square
    # roots (the first as Pow(x, 1/2), see below) and squares; kernels:
    # decoded by a gather when the SavedModel is loaded, read on each call.
    # No exp/log, no Python.
    assert {"FakeQuantWithMinMaxArgs", "Pow", "Square", "ReadVariableOp"} <= ops
    assert not ops & {"GatherV2", "Exp", "Log"}
    assert {"GatherV2", "AssignVariableOp"} <= {node.op for node in at_load}
    assert not (ops | {node.op for node in at_load}) & {"EagerPyFunc", "PyFunc", "PyFuncStateless"}
    assert nodes_without_gpu_kernel(nodes + at_load) == []


def test_grappler_fuses_the_relu_into_convolutions_and_takes_square_roots(resnet8_export, cifar_test):
    nodes = optimized_serving_nodes(resnet8_export.saved_model_dir, {"input_1": cifar_test[0][:2]})
    ops = {node.op for node in nodes}
    # Pow(x, 1/2) ran as a Sqrt, and no Maximum guards it: the Relu before it
    # is an epilogue of the convolution that produced x.
    assert "Sqrt" in ops and not ops & {"Pow", "Maximum"}
    fused = [node for node in nodes if "FusedConv2D" in node.op]
    assert any(b"Relu" in node.attr["fused_ops"].list.s for node in fused), [n.op for n in fused]


def test_every_activation_form_has_gpu_kernels(tmp_path):
    """Signed and unsigned quantizers with exp/log, square roots and a = 1, exported."""
    nodes = serving_nodes(export_model(activation_forms_model(), tmp_path, 1).saved_model_dir)
    ops = {node.op for node in nodes}
    assert {"Sign", "Abs", "Log", "Exp", "Sqrt", "Square", "Maximum", "FakeQuantWithMinMaxArgs"} <= ops
    assert nodes_without_gpu_kernel(nodes) == []


def test_converted_model_with_signed_inputs_has_gpu_kernels(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(8, 3, activation="tanh", name="conv_tanh")(inputs)
    h = keras.layers.Conv2D(8, 3, name="conv_mid")(h)  # signed input (after tanh)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.Conv2D(8, 3, name="conv_relu")(h)  # unsigned input
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    calibration = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    # The default exponents (1, 1/2, 1/4) and continuous ones (Sign, Abs, exp/log).
    for fast, expected_ops in ((True, {"FakeQuantWithMinMaxArgs"}), (False, {"Sign", "Abs", "Exp", "Log"})):
        quantized, report = kpq.convert(
            model, 4, 4, calibration_data=calibration, quantize_first_last=True, fast_activations=fast
        )
        assert any(a.signed for a in report.activations) and any(not a.signed for a in report.activations)
        nodes = serving_nodes(export_model(quantized, tmp_path / str(fast), 1).saved_model_dir)
        assert expected_ops <= {node.op for node in nodes}
        assert nodes_without_gpu_kernel(nodes) == []


def test_gpu_kernel_check_flags_cpu_only_ops(tmp_path):
    # A control: AsString has no GPU kernel, so the check must report it.
    module = tf.Module()
    module.fn = tf.function(
        lambda x: {"text": tf.strings.as_string(x)},
        input_signature=[tf.TensorSpec([None], tf.float32, name="x")],
    )
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": module.fn.get_concrete_function()})
    missing = nodes_without_gpu_kernel(serving_nodes(str(tmp_path)))
    assert [op for op, _ in missing] == ["AsString"]


def test_weights_are_int8_codes_packed_at_4_bits(resnet8_export, resnet8_w4):
    quantized, report = resnet8_w4
    loaded = tf.saved_model.load(resnet8_export.saved_model_dir)
    codes = {v.name.split("/")[0]: v for v in loaded.model_variables if "kernel_codes" in v.name}
    assert codes and all(v.dtype == tf.int8 for v in codes.values())
    for layer in report.quantized_layers:
        expected = (layer.params + 1) // 2 if layer.weight_bits <= 4 else layer.params
        assert int(np.prod(codes[layer.name].shape)) == expected
    # Each weight is stored once (Keras' ExportArchive would store it twice).
    stored = tf.train.list_variables(os.path.join(resnet8_export.saved_model_dir, "variables", "variables"))
    assert len([name for name, _ in stored if "VARIABLE_VALUE" in name]) == len(quantized.variables)


def test_report_records_sizes_and_versions(resnet8_export, resnet8_w4):
    with open(resnet8_export.report_path, encoding="utf-8") as file:
        metadata = json.load(file)
    sizes = metadata["sizes"]
    assert sizes["variable_bytes"] < 0.15 * sizes["float_variable_bytes"]
    assert metadata["versions"]["tensorflow"] == tf.__version__
    assert metadata["signature"]["outputs"] == ["dense"]
    report = kpq.ConversionReport.from_dict(metadata["report"])
    assert [layer.name for layer in report.layers] == [layer.name for layer in resnet8_w4[1].layers]


def test_keras_file_beside_the_version_reloads(resnet8_export, resnet8_w4, cifar_test):
    import keras

    reloaded = keras.saving.load_model(resnet8_export.keras_path)
    x = cifar_test[0][:16]
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), resnet8_w4[0].predict(x, verbose=0))


def _tiny_model():
    import keras

    inputs = keras.Input((6,), name="features")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="scores")(hidden)
    return keras.Model(inputs, outputs)


def test_existing_version_is_never_overwritten_without_overwrite(tmp_path):
    model = _tiny_model()
    first = export_model(model, tmp_path, 1)
    before = open(os.path.join(first.saved_model_dir, "saved_model.pb"), "rb").read()
    with pytest.raises(ExportError, match="already exists"):
        export_model(_tiny_model(), tmp_path, 1)
    assert open(os.path.join(first.saved_model_dir, "saved_model.pb"), "rb").read() == before
    export_model(_tiny_model(), tmp_path, 1, overwrite=True)
    assert os.listdir(tmp_path) == ["1"]


def test_next_version_counts_folders_and_reports(tmp_path):
    assert next_version(tmp_path / "missing") == 1
    export_model(_tiny_model(), tmp_path, 3)
    assert next_version(tmp_path) == 4
    assert export_model(_tiny_model(), tmp_path, None).version == 4


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("keep me")
    with pytest.raises(ExportError, match="not a folder"):
        export_model(_tiny_model(), target, 1)
    assert target.read_text() == "keep me"


def test_killed_export_leaves_no_partial_version(tmp_path):
    """SIGKILL mid-export: the version folder never appears half-written."""
    script = textwrap.dedent(
        f"""
        import keras, time
        import keras_powerquant.export as export
        original = export.save_serving_model
        def slow_save(*args, **kwargs):
            original(*args, **kwargs)
            time.sleep(60)  # killed here: the SavedModel is staged, not yet moved
        export.save_serving_model = slow_save
        inputs = keras.Input((6,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        export.export_model(model, {str(tmp_path)!r}, 1)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            staged = [n for n in os.listdir(tmp_path) if n.startswith(".kpq-tmp-")]
            if staged and os.path.exists(os.path.join(tmp_path, staged[0], "saved_model.pb")):
                break
            assert process.poll() is None, "export ended before it could be interrupted"
            time.sleep(0.2)
        else:
            pytest.fail("the export never staged a SavedModel")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not os.path.exists(tmp_path / "1")
    assert next_version(tmp_path) == 1


def test_failed_first_export_leaves_no_empty_folder(tmp_path):
    target = tmp_path / "a" / "b" / "new-export"
    # Not a report: the export fails after it created the folders and staged the SavedModel.
    with pytest.raises(AttributeError):
        export_model(_tiny_model(), target, 1, report=object())
    assert os.listdir(tmp_path) == []

"""TF Serving warm-up records: decoded independently of the writer, and run by the C++ loader.

The records are decoded with message classes built here from the field
numbers of tensorflow_serving/apis/{prediction_log,predict,model}.proto
(tensorflow-serving-api pins a TensorFlow of its own, so it is not
installed), around TensorFlow's own TensorProto.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from tensorflow.core.framework import tensor_pb2

import keras_powerquant as kpq
from keras_powerquant.errors import CalibrationDataError
from keras_powerquant.errors import ExportError
from keras_powerquant.export import export_model
from keras_powerquant.warmup import WARMUP_FILE
from tests import models
from tests.cli_helpers import invoke
from tests.cli_helpers import random_images
from tests.cli_helpers import save_small_model
from tests.cli_helpers import snapshot
from tests.cpp_loader import serve


def _prediction_log_class():
    """`tensorflow.serving.PredictionLog`, declared from TF Serving's field numbers."""
    pool = descriptor_pool.DescriptorPool()
    added = set()

    def add(file):  # TensorFlow's tensor.proto, its dependencies first
        if file.name not in added:
            for dependency in file.dependencies:
                add(dependency)
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            pool.Add(proto)
            added.add(file.name)

    add(tensor_pb2.DESCRIPTOR)
    fields = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="kpq_tests/prediction_log.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=[tensor_pb2.DESCRIPTOR.name],
    )

    def message(name, *specs):
        msg = proto.message_type.add(name=name)
        for field_name, number, kind, type_name, label in specs:
            msg.field.add(name=field_name, number=number, type=kind, type_name=type_name, label=label)
        return msg

    optional, repeated = fields.LABEL_OPTIONAL, fields.LABEL_REPEATED
    string, submessage = fields.TYPE_STRING, fields.TYPE_MESSAGE
    message("ModelSpec", ("name", 1, string, None, optional), ("signature_name", 3, string, None, optional))
    request = message(
        "PredictRequest",
        ("model_spec", 1, submessage, ".tensorflow.serving.ModelSpec", optional),
        ("inputs", 2, submessage, ".tensorflow.serving.PredictRequest.InputsEntry", repeated),
    )
    entry = request.nested_type.add(name="InputsEntry")
    entry.field.add(name="key", number=1, type=string, label=optional)
    entry.field.add(name="value", number=2, type=submessage, type_name=".tensorflow.TensorProto", label=optional)
    entry.options.map_entry = True
    message("PredictLog", ("request", 1, submessage, ".tensorflow.serving.PredictRequest", optional))
    log = message("PredictionLog", ("predict_log", 6, submessage, ".tensorflow.serving.PredictLog", optional))
    log.oneof_decl.add(name="log_type")
    log.field[0].oneof_index = 0
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.PredictionLog"))


PredictionLog = _prediction_log_class()


def read_warmup_requests(saved_model_dir):
    """`[(PredictionLog, serialized record)]` of a version's warm-up file, read as TF Serving's TFRecord reader does."""
    records = [r.numpy() for r in tf.data.TFRecordDataset(f"{saved_model_dir}/{WARMUP_FILE}")]
    return [(PredictionLog.FromString(record), record) for record in records]


def _request_inputs(log):
    assert log.WhichOneof("log_type") == "predict_log"
    request = log.predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    return {key: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()}


def _signature(saved_model_dir):
    return tf.saved_model.load(saved_model_dir).signatures["serving_default"]


def test_requests_hold_the_calibration_inputs_and_run_in_the_cpp_loader(cpp_loader, tmp_path):
    model = models.build("multi_io")
    calibration = models.reference_inputs(model, n=5)
    quantized, report = kpq.convert(model, 4, 4, calibration_data=calibration)
    result = export_model(quantized, tmp_path / "out", 1, report=report, warmup=7, warmup_data=calibration)
    requests = read_warmup_requests(result.saved_model_dir)
    assert len(requests) == 7
    signature = _signature(result.saved_model_dir)
    keys = sorted(signature.structured_input_signature[1])
    decoded = []
    for index, (log, record) in enumerate(requests):
        # Canonical encoding: re-serializing the decoded message gives the record back byte for byte.
        assert log.SerializeToString(deterministic=True) == record
        inputs = _request_inputs(log)
        assert sorted(inputs) == keys == ["features", "image"]
        for key, value in inputs.items():
            assert value.dtype == np.float32
            # One example each, in order, cycling through the 5 calibration samples.
            np.testing.assert_array_equal(value, calibration[key][index % 5 : index % 5 + 1])
        decoded.append(inputs)
    # TF Serving runs each request through the signature: Python and the C++ loader agree on them.
    served = serve(cpp_loader, [(result.saved_model_dir, inputs) for inputs in decoded[:2]], tmp_path / "served")
    for inputs, (_, outputs) in zip(decoded, served):
        expected = signature(**{key: tf.constant(value) for key, value in inputs.items()})
        assert sorted(outputs) == sorted(expected)
        for key, value in expected.items():
            assert np.max(np.abs(outputs[key] - value.numpy())) <= 1e-5


def test_requests_are_zeros_without_data(tmp_path):
    model = models.activation_forms_model()
    result = export_model(model, tmp_path, 1, warmup=2)
    requests = read_warmup_requests(result.saved_model_dir)
    assert len(requests) == 2
    for log, _ in requests:
        (value,) = _request_inputs(log).values()
        np.testing.assert_array_equal(value, np.zeros((1, 6), np.float32))


def test_no_warmup_writes_no_assets_extra(tmp_path):
    result = export_model(models.activation_forms_model(), tmp_path, 1)
    assert not (tmp_path / "1" / "assets.extra").exists()
    assert json.loads((tmp_path / "1" / "kpq-report.json").read_text())["serving"]["warmup_requests"] == 0
    assert result.saved_model_dir


@pytest.mark.parametrize("count", [-1, 1001, 2.5, True])
def test_bad_counts_are_refused_before_writing(count, tmp_path):
    with pytest.raises(ExportError, match="warm-up requests"):
        export_model(models.activation_forms_model(), tmp_path / "out", 1, warmup=count)
    assert not (tmp_path / "out").exists()


def test_bad_warmup_data_leaves_the_existing_version_untouched(tmp_path):
    model = models.activation_forms_model()
    export_model(model, tmp_path, 1)
    before = snapshot(tmp_path)
    with pytest.raises(CalibrationDataError, match="expected shape"):
        export_model(model, tmp_path, 1, overwrite=True, warmup=3, warmup_data=np.zeros((4, 5), np.float32))
    assert snapshot(tmp_path) == before


def test_unknown_dimensions_need_warmup_data(tmp_path):
    import keras

    inputs = keras.Input((None, 3), name="sequence")
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ExportError, match="unknown size"):
        export_model(model, tmp_path, 1, warmup=1)
    result = export_model(model, tmp_path, 1, warmup=1, warmup_data=np.ones((2, 4, 3), np.float32))
    (log, _), = read_warmup_requests(result.saved_model_dir)
    assert _request_inputs(log)["sequence"].shape == (1, 4, 3)


def test_cli_writes_warmup_requests_from_the_calibration_data(tmp_path):
    _, paths = save_small_model(tmp_path)
    calibration = random_images(3).astype(np.float32)
    np.save(tmp_path / "calibration.npy", calibration)
    result = invoke("convert", paths["keras"], "-o", tmp_path / "out", "--warmup", "4",
                    "--calibration-data", tmp_path / "calibration.npy")
    assert result.exit_code == 0, result.output
    requests = read_warmup_requests(tmp_path / "out" / "1")
    values = [_request_inputs(log)["image"] for log, _ in requests]
    np.testing.assert_array_equal(np.concatenate(values), calibration[[0, 1, 2, 0]])
    assert f"Warm-up requests: 4 in {tmp_path / 'out' / '1' / WARMUP_FILE}" in result.stdout
    inspected = invoke("inspect", tmp_path / "out")
    assert inspected.exit_code == 0 and "Warm-up requests: 4\n" in inspected.stdout
    metadata = json.loads((tmp_path / "out" / "1" / "kpq-report.json").read_text())
    assert metadata["serving"]["warmup_requests"] == 4


@pytest.mark.parametrize("args", [["--warmup", "1001"], ["--warmup", "-1"], ["--warmup", "2", "--format", "keras"]])
def test_cli_refuses_bad_warmup_options(args, tmp_path):
    _, paths = save_small_model(tmp_path)
    result = invoke("convert", paths["keras"], "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert "--warmup" in result.stderr
    assert not (tmp_path / "out").exists()


def test_callback_writes_warmup_requests_from_its_calibration_data(tmp_path):
    import keras

    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(2, name="scores")(keras.layers.Dense(8, activation="relu")(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    callback = kpq.PowerQuantExport(tmp_path, warmup=2, calibration_data=x, verbose=0)
    model.fit(x, np.zeros((16, 2), "float32"), epochs=1, verbose=0, callbacks=[callback])
    values = [_request_inputs(log)["features"] for log, _ in read_warmup_requests(callback.result.saved_model_dir)]
    np.testing.assert_array_equal(np.concatenate(values), x[:2])


def test_callback_refuses_a_generator_it_would_read_twice(tmp_path):
    batches = (np.zeros((2, 4), "float32") for _ in range(2))
    with pytest.raises(ValueError, match="not an iterator or generator"):
        kpq.PowerQuantExport(tmp_path, warmup=2, calibration_data=batches)

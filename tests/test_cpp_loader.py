"""Every kind of export serves in TensorFlow's C++ loader (as TF Serving loads it) with Python's outputs.

The loader (tests/cpp/load_saved_model.cc, compiled once per session) restores
each export with `tensorflow::LoadSavedModel`, tag "serve", and runs
`serving_default` by the SignatureDef's tensor names. Each export's outputs
must match what the same SavedModel's signature gives in Python.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.export import export_model
from tests import models
from tests.cpp_loader import serve
from tests.serving_graph import serving_nodes

TOLERANCE = 1e-5


def _export(model, folder, decode_weights="load", **options):
    """`(saved_model_dir, report)` of `model` converted with `options` (or as is, without)."""
    report = None
    if options:
        model, report = kpq.convert(model, **options)
    return export_model(model, folder, 1, decode_weights=decode_weights).saved_model_dir, report


def _python_outputs(saved_model_dir, inputs):
    signature = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    outputs = signature(**{key: tf.constant(value) for key, value in inputs.items()})
    return {key: value.numpy() for key, value in outputs.items()}


def _check_served(exports, loader, workdir):
    """Runs every export in one C++ process and compares each with Python."""
    results = serve(loader, [(path, inputs) for _, path, inputs in exports], workdir)
    for (label, path, inputs), (signature, served) in zip(exports, results):
        expected = _python_outputs(path, inputs)
        assert signature == (
            f"tensorflow/serving/predict inputs={','.join(sorted(inputs))} outputs={','.join(sorted(expected))}"
        ), label
        assert sorted(served) == sorted(expected), label
        for key, value in expected.items():
            assert served[key].shape == value.shape, (label, key)
            difference = float(np.max(np.abs(served[key] - value)))
            assert difference <= TOLERANCE, f"{label} output '{key}': max |C++ - Python| = {difference}"


def _ops(saved_model_dir):
    return {node.op for node in serving_nodes(saved_model_dir)}


def test_built_models_serve_in_the_cpp_loader(cpp_loader, tmp_path):
    rng = np.random.default_rng(0)
    multi = models.build("multi_io")
    activations = models.build("activations")
    mobilenet = models.build("mobilenet")
    exports = []

    # Several inputs and outputs (dict-structured model), every layer at 4 bits.
    path, _ = _export(multi, tmp_path / "multi_io", wbits=4, abits=4, quantize_first_last=True,
                      calibration_data=models.reference_inputs(multi))
    assert len(multi.inputs) == 2 and len(multi.outputs) == 2
    exports.append(("multi_io W4/A4", path, {k: v[:8] for k, v in models.reference_inputs(multi, seed=5).items()}))

    # Signed activations (tanh, swish, Add without ReLU), sigmoid, leaky ReLU: fitted exponents.
    path, report = _export(activations, tmp_path / "activations", wbits=4, abits=4,
                           calibration_data=models.reference_inputs(activations))
    assert any(a.signed for a in report.activations) and any(not a.signed for a in report.activations)
    exports.append(("activations W4/A4", path, {"image": models.reference_inputs(activations, n=8, seed=5)}))

    # Depthwise convolutions, per-tensor weight scales, square-root activation forms, W8.
    path, report = _export(mobilenet, tmp_path / "mobilenet", wbits=8, abits=8, per_channel=False,
                           fast_activations=True)
    assert report.options["per_channel"] is False
    assert {"Pow", "Square"} <= _ops(path)  # square roots, the first as Pow(x, 1/2)
    inputs = {"image": models.reference_inputs(mobilenet, n=8, seed=5)}
    exports.append(("mobilenet W8/A8 per-tensor, fast", path, inputs))

    # Conv1D (causal), Conv3D, grouped Conv2D, Dense on sequences, BatchNorms folded forward.
    layer_types = models.build("layer_types")
    path, report = _export(layer_types, tmp_path / "layer_types", wbits=4, abits=4)
    assert {"Conv1D", "Conv3D"} <= {e.class_name for e in report.quantized_layers}
    assert {"Conv2D", "Conv3D"} <= _ops(path)
    exports.append(("layer types W4/A4", path, {"image": models.reference_inputs(layer_types, n=8, seed=5)}))

    # Each form of the activation quantizer's graph, chained.
    path, _ = _export(models.activation_forms_model(), tmp_path / "forms")
    assert {"Sign", "Abs", "Log", "Exp", "Sqrt", "Square", "FakeQuantWithMinMaxArgs"} <= _ops(path)
    exports.append(("activation forms", path, {"features": rng.uniform(-3, 3, (16, 6)).astype("float32")}))

    _check_served(exports, cpp_loader, tmp_path / "served")


def test_resnet8_exports_serve_in_the_cpp_loader(cpp_loader, resnet8_model, cifar_test, cifar_calibration, tmp_path):
    images = {"input_1": cifar_test[0][:16]}
    calibration = cifar_calibration[:128]
    exports = []
    variants = {
        # The default: packed 4-bit codes, exp/log activations, float input.
        "W4/A4 data-free": dict(wbits=4, abits=4),
        # int8 codes, the input quantized from calibration, per-tensor scales, square roots.
        "W8/A8 calibrated per-tensor fast": dict(wbits=8, abits=8, calibration_data=calibration,
                                                 per_channel=False, fast_activations=True),
        # The uniform baseline: a = 1 everywhere, FakeQuant only; codes decoded on every call.
        "W4/A4 uniform, decoded per call": dict(wbits=4, abits=4, method="uniform", calibration_data=calibration,
                                                decode_weights="call"),
        # Weight-only: activations stay float.
        "W4 weight-only": dict(wbits=4, abits=None),
    }
    for index, (label, options) in enumerate(variants.items()):
        path, report = _export(resnet8_model, tmp_path / str(index), **options)
        assert report.quantized_layers, label
        exports.append((f"ResNet-8 {label}", path, images))
    _check_served(exports, cpp_loader, tmp_path / "served")


def test_new_layer_types_serve_in_the_cpp_loader(cpp_loader, tmp_path):
    """SeparableConv2D (split), Conv2DTranspose and EinsumDense (also over several axes, as attention
    projections), kernels decoded at load and per call."""
    from tests.test_einsum_conversion import tokens
    from tests.test_einsum_conversion import transformer
    from tests.test_new_layers_export import converted

    images = {"image": np.random.default_rng(5).standard_normal((8, 8, 8, 3)).astype("float32")}
    quantized = converted(wbits=4, abits=4)
    projections, _ = kpq.convert(transformer(), 4, 4, calibration_data=tokens())
    exports = []
    for decode_weights in ("load", "call"):
        path = export_model(quantized, tmp_path / decode_weights, 1, decode_weights=decode_weights).saved_model_dir
        assert "Conv2DBackpropInput" in _ops(path)
        exports.append((f"new layer types, decoded at {decode_weights}", path, images))
        folder = tmp_path / f"projections_{decode_weights}"
        path = export_model(projections, folder, 1, decode_weights=decode_weights).saved_model_dir
        exports.append((f"attention projections, decoded at {decode_weights}", path, {"tokens": tokens(8, seed=5)}))
    _check_served(exports, cpp_loader, tmp_path / "served")


def test_nested_layers_serve_in_the_cpp_loader(cpp_loader, tmp_path):
    """MultiHeadAttention's projections and custom layers' kernel layers, quantized in place (W4/A8)."""
    from tests.test_nested_layers import custom_vit
    from tests.test_nested_layers import images
    from tests.test_nested_layers import plain_vit

    exports = []
    for label, model in (("plain ViT", plain_vit(seed=11)), ("custom-layer ViT", custom_vit(seed=12))):
        path, report = _export(model, tmp_path / label.replace(" ", "_"), wbits=4, abits=8,
                               calibration_data=images(32, seed=13))
        assert any(row.nested_in for row in report.quantized_layers)
        exports.append((label, path, {"images": images(8, seed=14)}))
    _check_served(exports, cpp_loader, tmp_path / "served")


def test_sequence_models_serve_in_the_cpp_loader(cpp_loader, tmp_path):
    """A BERT-style encoder (token and nested position Embeddings, W4/A8) and an Embedding+LSTM classifier,
    kernels decoded at load and per call (an Embedding decodes its looked-up rows in both)."""
    from tests.test_sequence_layers import converted_bert
    from tests.test_sequence_layers import text_classifier
    from tests.test_sequence_layers import token_ids

    _, bert, _ = converted_bert()
    classifier, _ = kpq.convert(text_classifier(keras.layers.LSTM), 4, None)
    ids = token_ids(8, seed=12).astype("float32")
    exports = []
    for decode_weights in ("load", "call"):
        for label, model, key in (("BERT encoder", bert, "tokens"), ("LSTM classifier", classifier, "ids")):
            folder = tmp_path / f"{label.replace(' ', '_')}_{decode_weights}"
            path = export_model(model, folder, 1, decode_weights=decode_weights).saved_model_dir
            exports.append((f"{label}, decoded at {decode_weights}", path, {key: ids}))
    _check_served(exports, cpp_loader, tmp_path / "served")

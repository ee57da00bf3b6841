"""SeparableConv2D, Conv2DTranspose and EinsumDense, converted and exported: serving graphs with GPU kernels."""

import keras
import pytest

import keras_powerquant as kpq
from keras_powerquant.export import export_model
from tests import models
from tests.serving_graph import load_nodes
from tests.serving_graph import nodes_without_gpu_kernel
from tests.serving_graph import serving_nodes

QUANTIZED = {
    "sep_depthwise": "PowerQuantDepthwiseConv2D",
    "sep_pointwise": "PowerQuantConv2D",
}


def new_layer_types_model(seed=0):
    """Conv+BN+ReLU, SeparableConv2D+BN+ReLU, Conv2DTranspose+BN+ReLU, EinsumDense over positions, Dense."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Reshape((16 * 16, 6))(x)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 4), bias_axes="d", activation="relu", name="mix")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    models._randomize(model, seed)
    return model


def converted(seed=0, **options):
    model = new_layer_types_model(seed)
    quantized, report = kpq.convert(model, **options)
    classes = {entry.name: entry.class_name for entry in report.layers if entry.status == "quantized"}
    for name, class_name in QUANTIZED.items():
        assert type(quantized.get_layer(name)).__name__ == class_name
        assert name in classes, name
    return quantized


@pytest.mark.parametrize("decode_weights", ["load", "call"])
def test_serving_ops_have_gpu_kernels(decode_weights, tmp_path):
    quantized = converted(wbits=4, abits=4)
    export = export_model(quantized, tmp_path, 1, decode_weights=decode_weights)
    nodes, at_load = serving_nodes(export.saved_model_dir), load_nodes(export.saved_model_dir)
    ops = {node.op for node in nodes}
    assert {"DepthwiseConv2dNative", "Conv2D", "Conv2DBackpropInput"} <= ops
    if decode_weights == "load":
        # Kernels decoded (and reordered for the op) once, when loaded.
        assert "GatherV2" not in ops and "GatherV2" in {node.op for node in at_load}
    else:
        assert "GatherV2" in ops
    assert nodes_without_gpu_kernel(nodes + at_load) == []

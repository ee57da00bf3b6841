"""Kernel layers inside layers the graph rewrite cannot see into: MultiHeadAttention's projections and the
Dense/Conv2D/MultiHeadAttention held by custom subclassed layers, quantized in place (`converter.nested`).

Tiny ViTs (Conv2D patches, MultiHeadAttention, LayerNorm, GELU MLP), written with Keras layers in the
graph and with custom `PatchEmbed` / `Block` layers, with random weights: no plain Keras kernel layer left,
outputs close to float at W8/A8, the `.keras` round trip exact, the SavedModel export serving the same
outputs, and the report counting kernel layers and values with the nested ones.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant import keras_internals
from keras_powerquant.converter.registry import LINEAR_LAYER_TYPES
from keras_powerquant.export import export_model
from keras_powerquant.layers import PowerQuantInputQuantized
from keras_powerquant.layers import PowerQuantSublayers
from tests import models

L = keras.layers
IMAGE, PATCH, WIDTH, HEADS, CLASSES = 8, 4, 16, 2, 4
PLAIN_KERNEL_CLASSES = tuple(entry.keras_class for entry in LINEAR_LAYER_TYPES)


@keras.saving.register_keras_serializable(package="kpq_tests")
class PatchEmbed(L.Layer):
    """Conv2D patches, flattened to tokens, plus a learned position embedding (a weight of its own)."""

    def __init__(self, width, patch, **kwargs):
        super().__init__(**kwargs)
        self.width, self.patch = width, patch
        self.projection = L.Conv2D(width, patch, strides=patch)

    def build(self, input_shape):
        tokens = (input_shape[1] // self.patch) * (input_shape[2] // self.patch)
        self.projection.build(input_shape)
        self.position = self.add_weight(name="position", shape=(tokens, self.width), initializer="zeros")

    def call(self, images):
        x = self.projection(images)
        return keras.ops.reshape(x, (-1, x.shape[1] * x.shape[2], self.width)) + self.position

    def get_config(self):
        return {**super().get_config(), "width": self.width, "patch": self.patch}


@keras.saving.register_keras_serializable(package="kpq_tests")
class Block(L.Layer):
    """Pre-norm transformer block: its MLP a list of Dense layers, its attention a MultiHeadAttention."""

    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads = width, heads
        self.norm_1 = L.LayerNormalization()
        self.attention = L.MultiHeadAttention(heads, width // heads)
        self.norm_2 = L.LayerNormalization()
        self.mlp = [L.Dense(2 * width, activation="gelu"), L.Dense(width)]

    def build(self, input_shape):
        for layer in (self.norm_1, self.norm_2):
            layer.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.mlp[0].build(input_shape)
        self.mlp[1].build(tuple(input_shape[:-1]) + (2 * self.width,))

    def call(self, x):
        y = self.norm_1(x)
        x = x + self.attention(y, y)
        y = self.norm_2(x)
        for layer in self.mlp:
            y = layer(y)
        return x + y

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads}


def plain_vit(seed=0):
    inputs = keras.Input((IMAGE, IMAGE, 1), name="images")
    x = L.Conv2D(WIDTH, PATCH, strides=PATCH, name="patches")(inputs)
    x = L.Reshape(((IMAGE // PATCH) ** 2, WIDTH))(x)
    for i in range(2):
        y = L.LayerNormalization(name=f"norm_{i}a")(x)
        x = L.Add()([x, L.MultiHeadAttention(HEADS, WIDTH // HEADS, name=f"attention_{i}")(y, y)])
        y = L.LayerNormalization(name=f"norm_{i}b")(x)
        y = L.Dense(2 * WIDTH, activation="gelu", name=f"mlp_{i}a")(y)
        x = L.Add()([x, L.Dense(WIDTH, name=f"mlp_{i}b")(y)])
    x = L.GlobalAveragePooling1D()(L.LayerNormalization(name="norm")(x))
    model = keras.Model(inputs, L.Dense(CLASSES, name="head")(x), name="vit")
    models._randomize(model, seed)
    return model


def custom_vit(seed=0):
    inputs = keras.Input((IMAGE, IMAGE, 1), name="images")
    x = PatchEmbed(WIDTH, PATCH, name="embed")(inputs)
    for i in range(2):
        x = Block(WIDTH, HEADS, name=f"block_{i}")(x)
    x = L.GlobalAveragePooling1D()(L.LayerNormalization(name="norm")(x))
    model = keras.Model(inputs, L.Dense(CLASSES, name="head")(x), name="custom_vit")
    models._randomize(model, seed)
    return model


def images(n=32, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, IMAGE, IMAGE, 1)).astype("float32")


def _plain_kernel_layers(model):
    return [layer.name for layer in keras_internals.all_layers(model) if type(layer) in PLAIN_KERNEL_CLASSES]


def _relative_error(model, quantized, data):
    expected = model.predict(data, verbose=0)
    return float(np.max(np.abs(quantized.predict(data, verbose=0) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module", params=["plain", "custom"])
def vit(request):
    return (plain_vit if request.param == "plain" else custom_vit)(seed=3)


@pytest.fixture(scope="module")
def calibrated(vit):
    return kpq.convert(vit, 8, 8, calibration_data=images(64, seed=1))


def test_no_plain_kernel_layer_is_left_and_outputs_stay_close(vit, calibrated):
    quantized, report = calibrated
    assert _plain_kernel_layers(quantized) == []
    _, float_layers, _, float_values = report.kernel_counts()
    assert (float_layers, float_values) == (0, 0), report.summary()
    assert _relative_error(vit, quantized, images(32, seed=2)) < 0.05
    nested = [row for row in report.quantized_layers if row.nested_in is not None]
    assert nested and all(row.input_bits == 8 and row.rule == "calibration" for row in nested)


def test_keras_round_trip_is_exact_and_the_export_serves_the_same(vit, calibrated, tmp_path):
    quantized, _ = calibrated
    data = images(8, seed=4)
    quantized.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), quantized.predict(data, verbose=0))
    assert _plain_kernel_layers(loaded) == []
    assert any(isinstance(layer, PowerQuantInputQuantized) for layer in keras_internals.all_layers(loaded))
    saved_model_dir = export_model(quantized, tmp_path / "export", 1).saved_model_dir
    serve = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    served = next(iter(serve(images=tf.constant(data)).values())).numpy()
    np.testing.assert_allclose(served, quantized.predict(data, verbose=0), atol=1e-5)


def test_data_free_attention_inputs_come_from_the_layer_norm_before_it():
    model = plain_vit(seed=5)
    quantized, report = kpq.convert(model, 8, 8)
    projections = [row for row in report.quantized_layers if row.nested_in == "attention_0"]
    assert sorted(row.name for row in projections) == [
        "attention_0/attention_output", "attention_0/key", "attention_0/query", "attention_0/value"
    ]
    for row in projections:
        assert row.input_bits == 8 and "data-free" in row.rule and "layernorm" in row.rule.lower(), row
    assert _plain_kernel_layers(quantized) == []
    assert _relative_error(model, quantized, images(32, seed=6)) < 0.05


def test_data_free_without_statistics_quantizes_the_weights_and_says_why_the_input_stays_float():
    model = custom_vit(seed=7)
    quantized, report = kpq.convert(model, 8, 8)
    embed = report.layer("embed/" + model.get_layer("embed").projection.name)
    assert embed.status == "quantized" and embed.input_bits is None
    assert "model input" in embed.input_reason and "calibration data" in embed.input_reason
    assert "input float" in report.summary()
    assert _plain_kernel_layers(quantized) == []


def test_the_outer_layer_keeps_its_call_and_its_own_weights():
    model = custom_vit(seed=8)
    quantized, report = kpq.convert(model, 8, 8, calibration_data=images(32, seed=8))
    wrapper = quantized.get_layer("embed")
    assert isinstance(wrapper, PowerQuantSublayers) and type(wrapper.layer) is PatchEmbed
    position = keras.ops.convert_to_numpy(model.get_layer("embed").position)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrapper.layer.position), position)
    # Its own position embedding is no kernel: it is not counted as a float kernel layer.
    assert "embed" not in {row.name for row in report.kernel_layers}


def test_report_counts_kernel_values_and_warns_when_the_bits_reach_no_layer():
    inputs = keras.Input((6, WIDTH))
    x = L.MultiHeadAttention(HEADS, WIDTH // HEADS, name="attention")(inputs, inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    models._randomize(model, 9)
    report = kpq.inspect_model(model, 4, 4)
    quantized_layers, float_layers, quantized, floating = report.kernel_counts()
    assert (quantized_layers, float_layers, floating) == (5, 0, 0)
    assert quantized == sum(int(np.prod(w.shape)) for w in model.weights if w.name == "kernel")
    assert "5 kernel layers" in report.summary()

    # Only the head is a graph layer: first and last, kept at 8 bits; the nested projections take 4.
    inputs = keras.Input((WIDTH,))
    lone = keras.Model(inputs, L.Dense(3, name="head")(inputs))
    _, report = kpq.convert(lone, 4, 4, calibration_data=np.ones((8, WIDTH), "float32"))
    assert any("wbits=4 reaches no layer" in w for w in report.warnings), report.warnings
    assert any("abits=4 reaches no layer" in w for w in report.warnings), report.warnings
    assert "warning: wbits=4 reaches no layer" in report.summary()


@keras.saving.register_keras_serializable(package="kpq_tests")
class Mixer(L.Layer):
    """Dense layers in a dict, an LSTM (weight-only) and a Conv1DTranspose (no PowerQuant layer: stays float)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.heads = {"first": L.Dense(WIDTH, activation="relu"), "second": L.Dense(WIDTH)}
        self.recurrent = L.LSTM(WIDTH, return_sequences=True)
        self.upsample = L.Conv1DTranspose(WIDTH, 1)

    def call(self, x):
        return self.upsample(self.recurrent(self.heads["second"](self.heads["first"](x))))


def test_layers_in_dicts_convert_weight_only_and_what_cannot_convert_is_listed(tmp_path):
    inputs = keras.Input((6, WIDTH))
    x = Mixer(name="mixer")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    models._randomize(model, 10)
    data = np.random.default_rng(10).standard_normal((16, 6, WIDTH)).astype("float32")
    quantized, report = kpq.convert(model, 8, None, calibration_data=data)
    rows = {row.name: row for row in report.layers if row.nested_in == "mixer"}
    dense = [row for row in rows.values() if row.class_name == "Dense"]
    assert len(dense) == 2 and all(row.status == "quantized" and row.input_bits is None for row in dense)
    (lstm,) = [row for row in rows.values() if row.class_name == "LSTM"]
    assert lstm.status == "quantized" and lstm.input_bits is None and lstm.kernel_params == 2 * 4 * WIDTH * WIDTH
    (transposed,) = [row for row in rows.values() if row.status == "float"]
    assert "Conv1DTranspose" in transposed.reason and transposed.kernel_params == WIDTH * WIDTH
    assert any("kernel layers stay float" in w for w in report.warnings)
    assert _relative_error(model, quantized, data) < 0.05
    quantized.save(tmp_path / "mixer.keras")
    loaded = keras.saving.load_model(tmp_path / "mixer.keras")
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), quantized.predict(data, verbose=0))


def test_graph_layers_between_nested_ones_are_neither_first_nor_last():
    inputs = keras.Input((6, WIDTH))
    x = Block(WIDTH, HEADS, name="block_a")(inputs)
    x = L.Dense(WIDTH, name="between")(x)
    x = Block(WIDTH, HEADS, name="block_b")(x)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    models._randomize(model, 11)
    report = kpq.inspect_model(model, 4, 4)
    between, head = report.layer("between"), report.layer("head")
    assert (between.position, between.weight_bits) == (None, 4)
    # Its input (a block's output) has no data-free statistics, but is planned at 4 bits.
    assert {a.name: a.bits for a in report.activations}["between_input_quantizer"] == 4
    assert (head.position, head.weight_bits) == ("last", 8)
    assert all(row.weight_bits == 4 for row in report.quantized_layers if row.nested_in)

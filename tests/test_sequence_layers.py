"""Embedding, SimpleRNN/LSTM/GRU and DepthwiseConv1D: their PowerQuant layers and their conversion (issue 21).

Tiny text models with Keras' own random initialization: each PowerQuant layer computes what the float
Keras layer computes with its decoded weights, the `.keras` round trip is exact, a text classifier keeps no
float kernel value and its W4 export stores at most 0.15x the float variable bytes, and a BERT-style encoder
(token and position embeddings, MultiHeadAttention, LayerNorm, Dense FFN, residual adds) converts, reloads
and exports (its C++ loader check is in test_cpp_loader).
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_powerquant as kpq
from keras_powerquant.export import export_model
from keras_powerquant.layers import PowerQuantDepthwiseConv1D
from keras_powerquant.layers import PowerQuantEmbedding
from keras_powerquant.layers import PowerQuantGRU
from keras_powerquant.layers import PowerQuantLSTM
from keras_powerquant.layers import PowerQuantSimpleRNN
from keras_powerquant.layers import PowerQuantSublayers

L = keras.layers
VOCAB, STEPS, WIDTH, HEADS, CLASSES = 200, 12, 64, 2, 3
FLOAT_TOLERANCE = 1e-5


def token_ids(count=16, seed=0):
    """Integer ids `(count, STEPS)`, id 0 (padding) at the end of some rows."""
    ids = np.random.default_rng(seed).integers(1, VOCAB, (count, STEPS)).astype("int32")
    ids[::3, -3:] = 0
    return ids


def _float_recurrent(quantized, keras_class, **options):
    """The Keras recurrent layer with the decoded weights of `quantized` (a built PowerQuant RNN)."""
    cell = quantized.cell
    kernel = cell.dequantized_kernel().numpy()
    input_dim = kernel.shape[0] - cell.units
    layer = keras_class(cell.units, **options)
    layer.build((None, None, input_dim))
    bias = [] if cell.bias is None else [cell.bias.numpy()]
    layer.set_weights([kernel[:input_dim], kernel[input_dim:]] + bias)
    return layer


@pytest.mark.parametrize("bits, output_dim, per_channel", [(4, 6, True), (4, 5, True), (3, 5, False), (8, 6, True)])
def test_embedding_lookup_is_the_decoded_table_row(bits, output_dim, per_channel):
    table = np.random.default_rng(1).standard_normal((VOCAB, output_dim)).astype("float32")
    layer = PowerQuantEmbedding(VOCAB, output_dim, weight_bits=bits, weight_exponent=0.6, per_channel=per_channel)
    layer.build(None)
    layer.set_float_weights(table)
    assert layer.kernel_codes.dtype == "int8"
    assert layer.kernel_codes.shape == (VOCAB, (output_dim + 1) // 2 if bits <= 4 else output_dim)
    assert layer.kernel_scale.shape == ((VOCAB,) if per_channel else ())
    decoded = layer.dequantized_kernel().numpy()
    ids = token_ids(4)
    np.testing.assert_array_equal(layer(ids).numpy(), decoded[ids])
    # Per-row scales: each row's largest magnitude is on the grid, exactly.
    if per_channel:
        np.testing.assert_allclose(np.abs(decoded).max(axis=1), np.abs(table).max(axis=1), rtol=1e-6)
    levels = 2 ** (bits - 1) - 1
    assert np.abs(decoded - table).max() < np.abs(table).max() / levels


def test_embedding_call_decodes_only_the_looked_up_rows():
    layer = PowerQuantEmbedding(5000, 8)
    layer.build(None)
    graph = tf.function(layer.call).get_concrete_function(tf.TensorSpec((2, 3), tf.int32)).graph
    float_sizes = [
        output.shape.num_elements() or 0
        for op in graph.get_operations()
        for output in op.outputs
        if output.dtype == tf.float32
    ]
    # The largest float values are the per-row scales read for the gather: no decoded table.
    assert max(float_sizes) == 5000


def test_embedding_config_and_mask_follow_keras():
    layer = PowerQuantEmbedding(VOCAB, 4, mask_zero=True, weight_bits=5, weight_exponent=0.8, name="tokens")
    config = layer.get_config()
    again = PowerQuantEmbedding.from_config(config)
    assert again.get_config() == config and "activation" not in config and "use_bias" not in config
    mask = layer.compute_mask(tf.constant([[3, 0]]))
    np.testing.assert_array_equal(mask.numpy(), [[True, False]])


@pytest.mark.parametrize(
    "keras_class, quantized_class, options",
    [
        (L.LSTM, PowerQuantLSTM, {"return_sequences": True}),
        (L.LSTM, PowerQuantLSTM, {"go_backwards": True, "recurrent_activation": "hard_sigmoid"}),
        (L.GRU, PowerQuantGRU, {"return_sequences": True}),
        (L.GRU, PowerQuantGRU, {"reset_after": False, "use_bias": False}),
        (L.SimpleRNN, PowerQuantSimpleRNN, {"activation": "relu", "return_state": True}),
    ],
)
def test_converted_recurrent_layer_is_the_float_layer_with_its_decoded_weights(
    keras_class, quantized_class, options, tmp_path
):
    keras.utils.set_random_seed(2)
    ids = keras.Input((STEPS,), dtype="int32", name="ids")
    x = L.Embedding(VOCAB, 16, mask_zero=True, name="tokens")(ids)
    outputs = keras_class(8, name="recurrent", **options)(x)
    model = keras.Model(ids, outputs)
    quantized, report = kpq.convert(model, 4, 4)
    layer = quantized.get_layer("recurrent")
    assert type(layer) is quantized_class and layer.cell.kernel_codes.dtype == "int8"
    row = report.layer("recurrent")
    assert row.status == "quantized" and row.input_bits is None and row.kernel_params == (16 + 8) * 8 * (
        {L.LSTM: 4, L.GRU: 3, L.SimpleRNN: 1}[keras_class]
    )
    data = token_ids(8, seed=3)
    embedded = quantized.get_layer("tokens")(data)
    mask = embedded._keras_mask if hasattr(embedded, "_keras_mask") else data != 0
    reference = _float_recurrent(layer, keras_class, **options)(embedded, mask=mask)
    for got, expected in zip(keras.tree.flatten(quantized(data)), keras.tree.flatten(reference)):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=FLOAT_TOLERANCE)
    quantized.save(tmp_path / "recurrent.keras")
    loaded = keras.saving.load_model(tmp_path / "recurrent.keras")
    assert loaded.get_layer("recurrent").get_config() == layer.get_config()
    for got, expected in zip(keras.tree.flatten(loaded(data)), keras.tree.flatten(quantized(data))):
        np.testing.assert_array_equal(got.numpy(), expected.numpy())


def test_recurrent_layer_decodes_its_kernel_once_per_sequence():
    layer = PowerQuantLSTM(4, weight_bits=4, return_sequences=True)
    data = np.random.default_rng(15).standard_normal((2, STEPS, 3)).astype("float32")
    layer(data)
    calls = []
    decode = layer.cell.call_kernel
    layer.cell.call_kernel = lambda: calls.append(1) or decode()
    steps = layer(data)
    assert steps.shape == (2, STEPS, 4) and len(calls) == 1
    # A step called on its own decodes for itself.
    layer.cell(data[:, 0], [np.zeros((2, 4), "float32")] * 2)
    assert len(calls) == 2


def test_shared_embedding_and_bidirectional_lstm_convert_and_round_trip(tmp_path):
    keras.utils.set_random_seed(12)
    first, second = keras.Input((STEPS,), dtype="int32"), keras.Input((STEPS,), dtype="int32")
    shared = L.Embedding(VOCAB, 8, name="shared")
    x = L.Concatenate()([shared(first), shared(second)])
    x = L.Bidirectional(L.LSTM(4), name="bidirectional")(x)
    model = keras.Model([first, second], L.Dense(2)(x))
    quantized, report = kpq.convert(model, 8, None)
    assert report.kernel_counts()[1] == 0
    inner = sorted(row.name.split("/")[1].split("_")[0] for row in report.quantized_layers
                   if row.nested_in == "bidirectional" and row.class_name == "LSTM")
    assert inner == ["backward", "forward"]
    assert type(quantized.get_layer("shared")) is PowerQuantEmbedding
    data = [token_ids(8, seed=13), token_ids(8, seed=14)]
    expected, got = model(data).numpy(), quantized(data).numpy()
    assert np.linalg.norm(got - expected) < 0.05 * np.linalg.norm(expected)
    quantized.save(tmp_path / "bidirectional.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "bidirectional.keras")(data).numpy(), got)


@pytest.mark.parametrize("window", [{"strides": 2, "padding": "same"}, {"dilation_rate": 2, "padding": "valid"}])
def test_depthwise_conv1d_converts_and_is_the_float_layer_with_its_decoded_kernel(window, tmp_path):
    keras.utils.set_random_seed(4)
    signal = keras.Input((16, 3))
    x = L.Conv1D(4, 3, padding="same", activation="relu")(signal)
    x = L.DepthwiseConv1D(3, depth_multiplier=2, name="depthwise", **window)(x)
    model = keras.Model(signal, L.Dense(2)(L.GlobalAveragePooling1D()(x)))
    quantized, report = kpq.convert(model, 8, 8)
    layer = quantized.get_layer("depthwise")
    assert type(layer) is PowerQuantDepthwiseConv1D and report.layer("depthwise").status == "quantized"
    assert layer.kernel_scale.shape == (4, 2)
    data = np.random.default_rng(5).standard_normal((4, 16, 4)).astype("float32")
    reference = L.DepthwiseConv1D(3, depth_multiplier=2, **window)
    reference.build(data.shape)
    reference.set_weights([layer.dequantized_kernel().numpy(), layer.bias.numpy()])
    np.testing.assert_allclose(layer(data).numpy(), reference(data).numpy(), atol=FLOAT_TOLERANCE)
    quantized.save(tmp_path / "depthwise.keras")
    signals = np.random.default_rng(6).standard_normal((4, 16, 3)).astype("float32")
    loaded = keras.saving.load_model(tmp_path / "depthwise.keras")
    np.testing.assert_array_equal(loaded(signals).numpy(), quantized(signals).numpy())


def text_classifier(recurrent_class, seed=7):
    """Embedding -> recurrent layer -> Dense classifier."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((STEPS,), dtype="int32", name="ids")
    x = L.Embedding(VOCAB, WIDTH, mask_zero=True)(ids)
    x = recurrent_class(WIDTH)(x)
    return keras.Model(ids, L.Dense(CLASSES)(x))


@pytest.mark.parametrize("recurrent_class", [L.LSTM, L.GRU])
def test_text_classifier_keeps_no_float_kernel_and_exports_at_most_0_15_of_its_float_size(
    recurrent_class, tmp_path
):
    model = text_classifier(recurrent_class)
    quantized, report = kpq.convert(model, 4, 4)
    quantized_layers, float_layers, _, float_values = report.kernel_counts()
    assert (quantized_layers, float_layers, float_values) == (3, 0, 0)
    assert not any("stay float" in warning for warning in report.warnings)
    data = token_ids(32, seed=8)
    expected, got = model(data).numpy(), quantized(data).numpy()
    assert np.linalg.norm(got - expected) < 0.2 * np.linalg.norm(expected)
    exported = export_model(quantized, tmp_path / "export", 1, report=report, float_model=model)
    with open(exported.report_path, encoding="utf-8") as file:
        sizes = json.load(file)["sizes"]
    assert sizes["variable_ratio"] <= 0.15, sizes
    loaded = tf.saved_model.load(exported.saved_model_dir)
    codes = [v for v in loaded.model_variables if "kernel_codes" in v.name]
    assert len(codes) == 3 and all(v.dtype == tf.int8 for v in codes)
    served = loaded.signatures["serving_default"](ids=tf.constant(data, tf.float32))
    np.testing.assert_allclose(next(iter(served.values())).numpy(), got, atol=FLOAT_TOLERANCE)


@keras.saving.register_keras_serializable(package="kpq_tests")
class PositionEmbedding(L.Layer):
    """Adds a learned embedding of each position (a Keras Embedding it holds) to its input."""

    def __init__(self, length, width, **kwargs):
        super().__init__(**kwargs)
        self.length, self.width = length, width
        self.positions = L.Embedding(length, width)

    def build(self, input_shape):
        self.positions.build((input_shape[1],))

    def call(self, x):
        return x + self.positions(keras.ops.arange(keras.ops.shape(x)[1]))

    def get_config(self):
        return {**super().get_config(), "length": self.length, "width": self.width}


def bert_encoder(seed=9, layers=2):
    """A BERT-style encoder of Keras layers: post-norm blocks of attention and a GELU FFN, mean-pooled."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((STEPS,), dtype="int32", name="tokens")
    x = L.Embedding(VOCAB, WIDTH, name="token_embedding")(ids)
    x = PositionEmbedding(STEPS, WIDTH, name="position_embedding")(x)
    x = L.LayerNormalization(name="embedding_norm")(x)
    for i in range(layers):
        attended = L.MultiHeadAttention(HEADS, WIDTH // HEADS, name=f"attention_{i}")(x, x)
        x = L.LayerNormalization(name=f"attention_norm_{i}")(L.Add()([x, attended]))
        hidden = L.Dense(2 * WIDTH, activation="gelu", name=f"ffn_in_{i}")(x)
        x = L.LayerNormalization(name=f"ffn_norm_{i}")(L.Add()([x, L.Dense(WIDTH, name=f"ffn_out_{i}")(hidden)]))
    pooled = L.GlobalAveragePooling1D()(x)
    return keras.Model(ids, L.Dense(CLASSES, name="classifier")(pooled))


def converted_bert(calibration_seed=10):
    model = bert_encoder()
    quantized, report = kpq.convert(model, 4, 8, calibration_data=token_ids(32, seed=calibration_seed))
    return model, quantized, report


def test_bert_encoder_quantizes_every_kernel_and_round_trips(tmp_path):
    model, quantized, report = converted_bert()
    _, float_layers, _, float_values = report.kernel_counts()
    assert (float_layers, float_values) == (0, 0)
    assert report.layer("token_embedding").status == "quantized"
    (position,) = [row for row in report.quantized_layers if row.nested_in == "position_embedding"]
    assert position.class_name == "Embedding" and position.input_bits is None
    assert isinstance(quantized.get_layer("position_embedding"), PowerQuantSublayers)
    assert isinstance(quantized.get_layer("position_embedding").layer.positions, PowerQuantEmbedding)
    data = token_ids(16, seed=11)
    expected, got = model(data).numpy(), quantized(data).numpy()
    assert np.linalg.norm(got - expected) < 0.25 * np.linalg.norm(expected)
    quantized.save(tmp_path / "bert.keras")
    loaded = keras.saving.load_model(tmp_path / "bert.keras")
    np.testing.assert_array_equal(loaded(data).numpy(), got)
    exported = export_model(loaded, tmp_path / "export", 1)
    served = tf.saved_model.load(exported.saved_model_dir).signatures["serving_default"]
    outputs = served(tokens=tf.constant(data, tf.float32))
    np.testing.assert_allclose(next(iter(outputs.values())).numpy(), got, atol=FLOAT_TOLERANCE)


def test_a_size_target_counts_the_weight_only_layers_at_their_quantized_size(tmp_path):
    # The Embedding and the GRU stay at 4 bits; only the Dense head's bits are chosen.
    model = text_classifier(L.GRU)
    data = token_ids(64, seed=9)
    quantized, report = kpq.convert(model, 4, 4, calibration_data=data, target_size=0.2, refine=[])
    exported = export_model(quantized, tmp_path / "export", 1, report=report, float_model=model)
    with open(exported.report_path, encoding="utf-8") as file:
        sizes = json.load(file)["sizes"]
    assert sizes["variable_ratio"] <= 0.2, sizes

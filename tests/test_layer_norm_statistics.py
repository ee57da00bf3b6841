"""Data-free statistics after a LayerNormalization (ConvNeXt blocks) and the activation quantizers they enable."""

import keras
import numpy as np

import keras_powerquant as kpq
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.statistics import propagate_statistics


def _convnext_like(seed=0):
    """Depthwise conv -> LayerNormalization -> Dense -> gelu -> Dense, channels last, random weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 16))
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(inputs)
    h = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")(h)
    h = keras.layers.Dense(32, activation="gelu", name="expand")(h)
    outputs = keras.layers.Dense(16, name="project")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    norm = model.get_layer("norm")
    norm.gamma.assign(rng.uniform(0.3, 2.0, 16).astype(np.float32))
    norm.beta.assign(rng.normal(0.0, 1.0, 16).astype(np.float32))
    return model


def test_layer_norm_output_statistics_match_measured_values():
    model = _convnext_like()
    graph = FlatGraph(model)
    key = graph.calls(model.get_layer("norm"))[0].output_key
    gaussians = propagate_statistics(graph, {})[key].gaussians
    assert gaussians is not None and gaussians.rule == "layernorm"
    norm = model.get_layer("norm")
    np.testing.assert_allclose(gaussians.mean, np.asarray(norm.beta))
    np.testing.assert_allclose(gaussians.var, np.square(np.asarray(norm.gamma)), rtol=1e-6)
    # Measured over positions and samples. The model is exact on average over
    # the channels; per channel it is off where the channels before the norm
    # differ in spread (here by the random depthwise kernels): measured
    # spreads within 30 % per channel, 3 % on average.
    x = np.random.default_rng(3).standard_normal((128, 8, 8, 16)).astype(np.float32)
    probe = keras.Model(model.inputs, norm.output)
    values = np.asarray(probe.predict(x, verbose=0)).reshape(-1, 16)
    gamma = np.abs(np.asarray(norm.gamma))
    np.testing.assert_allclose(values.mean(axis=0), gaussians.mean, atol=0.15 * gamma.max())
    ratios = values.std(axis=0) / np.sqrt(gaussians.var)
    assert np.all(np.abs(ratios - 1.0) < 0.35), ratios
    assert abs(np.mean(ratios) - 1.0) < 0.1, ratios


def test_a_norm_over_other_axes_has_no_rule():
    inputs = keras.Input((4, 6))
    model = keras.Model(inputs, keras.layers.LayerNormalization(axis=1, name="over_time")(inputs))
    graph = FlatGraph(model)
    stats = propagate_statistics(graph, {})[graph.calls(model.get_layer("over_time"))[0].output_key]
    assert stats.gaussians is None and "LayerNormalization" in stats.rule


def test_data_free_conversion_quantizes_the_dense_input_after_layer_norm():
    model = _convnext_like()
    _, report = kpq.convert(model, 4, 4)
    rules = {a.name: a.rule for a in report.activations}
    after_norm = [a for a in report.activations if (a.rule or "").startswith("layernorm")]
    assert after_norm, rules
    assert all(a.status == "quantized" for a in after_norm), after_norm

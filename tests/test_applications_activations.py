"""The activations keras.applications models use get the right quantizer
(tests/models.py `applications_activations_model`): the activation it
applies, signed or not from the graph, and data-free statistics."""

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from tests import models as M


@pytest.fixture(scope="module")
def model():
    return M.applications_activations_model()


@pytest.fixture(scope="module")
def data_free(model):
    return kpq.convert(model, 8, 8)


def test_activation_layers_become_quantized_activations(data_free):
    _, report = data_free
    by_name = {a.name: a for a in report.activations}
    # Keras 3 names swish "silu" and hard_swish "hard_silu"; LeakyReLU is relu with a slope.
    expected = {"swish": "silu", "hard_swish": "hard_silu", "gelu_exact": "gelu", "leaky": "relu"}
    for name, activation in expected.items():
        quantizer = by_name[name]
        assert (quantizer.kind, quantizer.activation, quantizer.status) == ("activation", activation, "quantized")
        # All four take negative values: signed codes.
        assert quantizer.signed is True
        assert quantizer.rule == f"batchnorm -> {activation}"


def test_approximate_gelu_and_prelu_are_carried_over_with_statistics(data_free):
    quantized, report = data_free
    by_name = {a.name: a for a in report.activations}
    # keras.ops.gelu defaults to the tanh approximation, which PowerQuantActivation's
    # "gelu" is not: the operation stays and an input quantizer follows it.
    tanh_gelu = by_name["c_gelu_tanh_input_quantizer"]
    assert (tanh_gelu.kind, tanh_gelu.status, tanh_gelu.rule) == ("input", "quantized", "batchnorm -> gelu")
    prelu = by_name["c_prelu_input_quantizer"]
    assert (prelu.status, prelu.signed, prelu.rule) == ("quantized", True, "batchnorm -> prelu 'prelu'")
    assert [(layer.name, layer.reason.split(":")[0]) for layer in report.float_layers] == [
        ("prelu", "activation with weights")
    ]
    assert isinstance(quantized.get_layer("prelu"), keras.layers.PReLU)


def test_squeeze_and_excitation_gates_are_signed_from_the_graph(data_free):
    _, report = data_free
    by_name = {a.name: a for a in report.activations}
    # x * sigmoid(...) is signed for a BatchNorm x and unsigned for a ReLU x.
    assert (by_name["c_se_input_quantizer"].signed, by_name["c_se_relu_input_quantizer"].signed) == (True, False)
    assert by_name["c_se_relu_input_quantizer"].rule == "propagated: product (2 steps from a normalization)"


def test_data_free_statistics_of_activations_match_the_model(model):
    """Each modelled tensor's data-free channel moments against its values on the data its
    BatchNorm statistics were taken from (tests/models.py)."""
    from keras_powerquant.converter.folding import plan_folds
    from keras_powerquant.converter.graph import FlatGraph
    from keras_powerquant.converter.statistics import propagate_statistics

    graph = FlatGraph(model)
    stats = propagate_statistics(graph, plan_folds(graph)[0])
    # (mean, spread) tolerances. Measured: means within 0.03 standard deviations and spreads
    # within 11 % for the activations; the product assumes the gate independent of x, which it
    # is not (the gate is computed from x): means off by up to 0.6 of the spread, spreads 1.05-1.8x.
    names = {n: (0.1, 0.2) for n in ("swish", "hard_swish", "leaky", "prelu")}
    names.update(gelu_exact=(0.1, 0.25), se_scale=(1.0, 1.0))
    keys = {graph.calls(model.get_layer(n))[0].output_key: n for n in names}
    x = M.reference_inputs(model, 256, seed=3)
    _, values = graph.evaluate([x], lambda op, args, kwargs: op.run(args, kwargs, training=False), keep=set(keys))
    for key, name in keys.items():
        observed = np.asarray(values[key]).reshape(-1, 8)
        gaussians = stats[key].gaussians
        assert gaussians is not None, name
        spread = observed.std(axis=0)
        mean_tolerance, spread_tolerance = names[name]
        mean_error = np.abs(gaussians.mean - observed.mean(axis=0))
        np.testing.assert_array_less(mean_error, mean_tolerance * spread + 0.01, name)
        ratio = np.sqrt(gaussians.var) / spread
        assert 0.75 < ratio.min() and ratio.max() < 1 + spread_tolerance, (name, ratio)


def test_converted_outputs_stay_close(model, data_free):
    quantized, _ = data_free
    x = M.reference_inputs(model, 64, seed=5)
    reference, outputs = M.predict(model, x)[0], M.predict(quantized, x)[0]
    assert np.linalg.norm(outputs - reference) / np.linalg.norm(reference) < 0.1  # W8/A8, measured 0.04

"""PowerQuantEinsumDense against keras.layers.EinsumDense, run for real through Keras / TensorFlow."""

import keras
import numpy as np
import pytest

from keras_powerquant.layers import PowerQuantEinsumDense
from keras_powerquant.layers.einsum_dense import EinsumEquation
from keras_powerquant.quantization.weights import WeightQuantizer

# (equation, output_shape, bias_axes, input_shape, scale axes of the Keras kernel)
CASES = [
    ("ab,bc->ac", (4,), "c", (2, 3), (1,)),
    ("abc,cd->abd", (None, 5), "d", (2, 3, 4), (1,)),
    ("abc,cde->abde", (None, 2, 5), "de", (2, 3, 4), (1, 2)),
    ("abc,cde->abde", (None, 2, 5), "d", (2, 3, 4), (1, 2)),
    ("abc,dc->abd", (None, 5), None, (2, 3, 4), (0,)),
    ("...b,bc->...c", 5, "c", (2, 3, 7, 4), (1,)),
    ("abc...,cd->abd...", (3, 6), "d", (2, 3, 4, 5), (1,)),
    ("abcd,cde->abe", (None, 6), "e", (2, 3, 4, 5), (2,)),
    ("abc,bcd->abd", (3, 6), "bd", (2, 3, 4), (0, 2)),
    ("ab,b->a", (), None, (2, 3), ()),
]


def float_and_quantized(case, bits, per_channel=True, exponent=1.0, seed=0):
    """A built Keras EinsumDense with random weights, its quantized twin, and an input batch."""
    equation, output_shape, bias_axes, input_shape, _ = case
    rng = np.random.default_rng(seed)
    reference = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    reference.build(input_shape)
    reference.kernel.assign(rng.standard_normal(reference.kernel.shape).astype(np.float32))
    layer = PowerQuantEinsumDense(
        equation, output_shape, bias_axes=bias_axes, weight_bits=bits, weight_exponent=exponent,
        per_channel=per_channel,
    )
    layer.build(input_shape)
    bias = None
    if bias_axes is not None:
        reference.bias.assign(rng.standard_normal(reference.bias.shape).astype(np.float32))
        bias = reference.bias.numpy()
    permutation = layer.equation_parts.storage_permutation()
    layer.set_float_weights(np.transpose(reference.kernel.numpy(), permutation), bias)
    return reference, layer, rng.standard_normal(input_shape).astype(np.float32)


def to_keras_layout(layer, kernel):
    return np.transpose(kernel, np.argsort(layer.equation_parts.storage_permutation()))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equals_the_float_layer_with_the_decoded_kernel(bits, per_channel, case):
    reference, layer, x = float_and_quantized(CASES[case], bits, per_channel, exponent=0.65, seed=case)
    kernel = reference.kernel.numpy()
    decoded = to_keras_layout(layer, layer.dequantized_kernel().numpy())
    # One scale per slice along the kernel axes that appear in the output.
    scale_axes = CASES[case][4] if per_channel else ()
    assert layer.kernel_scale.shape == tuple(kernel.shape[a] for a in scale_axes)
    reduced = tuple(a for a in range(kernel.ndim) if a not in scale_axes)
    np.testing.assert_array_equal(layer.kernel_scale.numpy(), np.abs(kernel).max(axis=reduced))
    stored = np.transpose(kernel, layer.equation_parts.storage_permutation())
    expected_kernel = WeightQuantizer(bits, 0.65, per_channel).quantize(stored, len(scale_axes))
    np.testing.assert_array_equal(layer.dequantized_kernel().numpy(), expected_kernel)
    if reference.bias is not None:
        assert layer.bias.shape == reference.bias.shape
    reference.kernel.assign(decoded)
    outputs = layer(x).numpy()
    expected = reference(x).numpy()
    assert outputs.shape == expected.shape
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_8_bit_output_within_the_rounding_bound_of_the_float_layer(case):
    """At 8 bits, a = 1, each weight moves at most (its scale) / 254: `|y_hat - y| <= einsum(|x|, that)`."""
    reference, layer, x = float_and_quantized(CASES[case], 8, seed=20 + case)
    expected = reference(x).numpy()
    outputs = layer(x).numpy()
    steps = to_keras_layout(layer, np.broadcast_to(layer.kernel_scale.numpy() / 254, layer._kernel_shape))
    reference.kernel.assign(steps)
    if reference.bias is not None:
        reference.bias.assign(np.zeros(reference.bias.shape, np.float32))
    bound = reference(np.abs(x)).numpy()
    assert np.all(np.abs(outputs - expected) <= bound + 1e-5)
    assert np.max(np.abs(outputs - expected)) > 0  # really quantized


def test_equation_parts():
    parts = EinsumEquation.parse("abc,dce->abde")
    assert parts.output_axes == "de" and parts.contracted_axes == "c"
    assert parts.stored_kernel == "cde" and parts.storage_permutation() == (1, 0, 2)
    assert parts.with_kernel("cde") == "abc,cde->abde"
    left = EinsumEquation.parse("...b,bc->...c")
    assert left.ellipsis == "left" and left.with_kernel("bc") == "...b,bc->...c"
    assert EinsumEquation.parse("ab...,bc->ac...").ellipsis == "right"
    for bad in ("ab,bc", "...ab,bc->ac", "ab...,bc->...ac", "a1,bc->ac", "a...,b->b..."):
        with pytest.raises(ValueError, match="Invalid EinsumDense equation"):
            EinsumEquation.parse(bad)


def test_rejects_bias_axes_outside_the_output():
    layer = PowerQuantEinsumDense("ab,bc->ac", 4, bias_axes="b")
    with pytest.raises(ValueError, match="Bias axes 'b'"):
        layer.build((None, 3))


def test_built_lazily_on_first_call():
    layer = PowerQuantEinsumDense("abc,cd->abd", (None, 4), bias_axes="d", activation="relu")
    assert not layer.built and layer.weights == []
    outputs = layer(np.ones((2, 3, 5), np.float32))
    assert layer.built and outputs.shape == (2, 3, 4)
    assert {w.name for w in layer.weights} == {"kernel_codes", "kernel_scale", "bias"}
    assert PowerQuantEinsumDense("ab,bc->ac", 4)(np.ones((1, 2), np.float32)).shape == (1, 4)


def test_config_and_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    layer = PowerQuantEinsumDense(
        "abc,dc->abd", (None, 6), bias_axes="d", weight_bits=4, weight_exponent=0.7, activation="gelu", name="mix"
    )
    config = layer.get_config()
    assert config["equation"] == "abc,dc->abd" and config["output_shape"] == (None, 6)
    assert config["bias_axes"] == "d" and "use_bias" not in config
    assert PowerQuantEinsumDense.from_config(config).get_config() == config

    inputs = keras.Input((3, 5))
    model = keras.Model(inputs, layer(inputs))
    layer.set_float_weights(rng.standard_normal(layer._kernel_shape).astype(np.float32), rng.standard_normal(6))
    data = rng.standard_normal((4, 3, 5)).astype(np.float32)
    path = tmp_path / "einsum.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    restored = loaded.get_layer("mix")
    assert type(restored) is PowerQuantEinsumDense and restored.get_config() == config
    np.testing.assert_array_equal(restored.kernel_codes.numpy(), layer.kernel_codes.numpy())
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), model.predict(data, verbose=0))


def test_use_bias_puts_a_bias_on_the_kernel_output_axes():
    layer = PowerQuantEinsumDense("abc,dce->abde", (None, 2, 5), use_bias=True)
    assert layer.bias_axes == "de"
    layer.build((None, 3, 4))
    assert layer.bias.shape == (2, 5) and layer.output_channels(layer._kernel_shape) == 10
    assert PowerQuantEinsumDense("abc,cd->abd", (None, 5), use_bias=False).bias_axes is None
    with pytest.raises(ValueError, match="contradicts"):
        PowerQuantEinsumDense("abc,cd->abd", (None, 5), bias_axes="d", use_bias=False)
    with pytest.raises(ValueError, match="no"):
        PowerQuantEinsumDense("ab,b->a", (), use_bias=True)

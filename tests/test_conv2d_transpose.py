"""PowerQuantConv2DTranspose against keras.layers.Conv2DTranspose, run for real through Keras / TensorFlow."""

import keras
import numpy as np
import pytest

from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.statistics import propagate_statistics
from keras_powerquant.layers import PowerQuantConv2DTranspose
from keras_powerquant.quantization.packing import unpack_nibbles
from keras_powerquant.quantization.weights import WeightQuantizer
from tests.cpu_kernels import skip_unless_runs

VARIANTS = [
    dict(kernel_size=3),
    dict(kernel_size=3, strides=2, padding="same"),
    dict(kernel_size=(3, 2), strides=(2, 3), output_padding=(1, 0)),
    dict(kernel_size=3, dilation_rate=2, padding="same"),
    dict(kernel_size=2, strides=2, data_format="channels_first"),
]
FILTERS = 4


def to_keras_layout(kernel):
    """(kh, kw, in, filters) -> Keras' (kh, kw, filters, in); the swap is its own inverse."""
    return np.transpose(kernel, (0, 1, 3, 2))


def float_and_quantized(options, bits, per_channel=True, exponent=1.0, seed=0):
    """A built Keras Conv2DTranspose with random weights, its quantized twin, and an input batch."""
    rng = np.random.default_rng(seed)
    channels_first = options.get("data_format") == "channels_first"
    shape = (2, 3, 5, 6) if channels_first else (2, 5, 6, 3)
    reference = keras.layers.Conv2DTranspose(FILTERS, **options)
    skip_unless_runs(reference, shape[1:])
    reference.build(shape)
    reference.kernel.assign(rng.standard_normal(reference.kernel.shape).astype(np.float32))
    reference.bias.assign(rng.standard_normal(FILTERS).astype(np.float32))
    layer = PowerQuantConv2DTranspose(
        FILTERS, weight_bits=bits, weight_exponent=exponent, per_channel=per_channel, **options
    )
    layer.build(shape)
    layer.set_float_weights(to_keras_layout(reference.kernel.numpy()), reference.bias.numpy())
    return reference, layer, rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_equals_the_float_layer_with_the_decoded_kernel(bits, per_channel, variant):
    reference, layer, x = float_and_quantized(VARIANTS[variant], bits, per_channel, exponent=0.7, seed=variant)
    decoded = layer.dequantized_kernel().numpy()
    quantizer = WeightQuantizer(bits, 0.7, per_channel)
    np.testing.assert_array_equal(decoded, quantizer.quantize(to_keras_layout(reference.kernel.numpy())))
    reference.kernel.assign(to_keras_layout(decoded))
    outputs = layer(x).numpy()
    expected = reference(x).numpy()
    assert outputs.shape == expected.shape
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_8_bit_output_within_the_rounding_bound_of_the_float_layer(variant):
    """At 8 bits, a = 1, each weight moves at most s / 254 (s: its filter's max |W|).

    So `|y_hat - y| <= conv_transpose(|x|, s / 254)` elementwise, a bound
    computed from the float kernel alone. Rounding errors of independent
    weights mostly cancel, so the typical error is far smaller: its RMS stays
    under 1% of the output's spread (about 0.5% here).
    """
    reference, layer, x = float_and_quantized(VARIANTS[variant], 8, seed=10 + variant)
    expected = reference(x).numpy()
    outputs = layer(x).numpy()
    steps = np.abs(reference.kernel.numpy()).max(axis=(0, 1, 3)) / (2 * 127)
    reference.kernel.assign(np.broadcast_to(steps[None, None, :, None], reference.kernel.shape))
    reference.bias.assign(np.zeros(FILTERS, np.float32))
    bound = reference(np.abs(x)).numpy()
    assert np.all(np.abs(outputs - expected) <= bound + 1e-5)
    assert np.sqrt(np.mean(np.square(outputs - expected))) < 0.01 * np.std(expected)


def numpy_conv_transpose(x, kernel, strides=1, padding="valid", dilation_rate=1, output_padding=None):
    """Transposed convolution by its definition: each input pixel adds `kernel[a, b] @ x` at `i s + a d`.

    `x` is `(batch, rows, cols, in)`, `kernel` Keras' `(kh, kw, out, in)`;
    "same" crops the full result as the gradient of a "same" convolution does.
    """
    s, d = (strides,) * 2 if isinstance(strides, int) else strides, (dilation_rate,) * 2
    kh, kw = kernel.shape[:2]
    span = [d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1]
    full = np.zeros((x.shape[0], (x.shape[1] - 1) * s[0] + span[0], (x.shape[2] - 1) * s[1] + span[1], kernel.shape[2]))
    for a, b in np.ndindex(kh, kw):
        contribution = np.einsum("nijc,oc->nijo", x, kernel[a, b])
        full[:, a * d[0] :: s[0], b * d[1] :: s[1]][:, : x.shape[1], : x.shape[2]] += contribution
    if padding == "same":
        assert output_padding is None
        top = [max(span[i] - s[i], 0) // 2 for i in range(2)]
        return full[:, top[0] : top[0] + x.shape[1] * s[0], top[1] : top[1] + x.shape[2] * s[1]]
    extra = output_padding or (0, 0)
    return np.pad(full, [(0, 0), (0, extra[0]), (0, extra[1]), (0, 0)])


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_equals_the_transposed_convolution_by_its_definition(variant):
    """Runs on every kernel set, dilated and channels_first included, where the float Keras layer may not."""
    options = dict(VARIANTS[variant])
    channels_first = options.pop("data_format", None) == "channels_first"
    rng = np.random.default_rng(20 + variant)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    layer = PowerQuantConv2DTranspose(
        FILTERS,
        weight_bits=8,
        use_bias=False,
        data_format="channels_first" if channels_first else "channels_last",
        **options,
    )
    layer.build(np.transpose(x, (0, 3, 1, 2)).shape if channels_first else x.shape)
    layer.set_float_weights(rng.standard_normal(layer._kernel_shape).astype(np.float32))
    outputs = layer(np.transpose(x, (0, 3, 1, 2)) if channels_first else x).numpy()
    if channels_first:
        outputs = np.transpose(outputs, (0, 2, 3, 1))
    options.pop("kernel_size")  # the kernel's own shape
    expected = numpy_conv_transpose(x, to_keras_layout(layer.dequantized_kernel().numpy()), **options)
    assert outputs.shape == expected.shape
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_stored_codes_and_scales_hold_output_channels_last(bits):
    reference, layer, _ = float_and_quantized(VARIANTS[1], bits, exponent=0.6)
    kernel = to_keras_layout(reference.kernel.numpy())
    assert layer._kernel_shape == (3, 3, 3, FILTERS)
    assert layer.op_kernel_shape() == tuple(reference.kernel.shape)
    codes, scales = WeightQuantizer(bits, 0.6).encode(kernel)
    assert layer.kernel_codes.dtype == "int8"
    stored = layer.kernel_codes.numpy()
    if bits <= 4:
        assert stored.shape == ((kernel.size + 1) // 2,)
        np.testing.assert_array_equal(unpack_nibbles(stored, kernel.size), codes.ravel())
    else:
        np.testing.assert_array_equal(stored, codes)
    np.testing.assert_array_equal(layer.kernel_scale.numpy(), np.abs(kernel).max(axis=(0, 1, 2)))
    np.testing.assert_array_equal(layer.kernel_scale.numpy(), scales)
    assert layer.bias.shape == (FILTERS,)
    assert not layer.trainable_weights


def test_built_lazily_on_first_call():
    layer = PowerQuantConv2DTranspose(2, 3, strides=2)
    assert not layer.built and layer.weights == []
    outputs = layer(np.zeros((1, 4, 4, 3), np.float32))
    assert layer.built and outputs.shape == (1, 9, 9, 2)
    assert {w.name for w in layer.weights} == {"kernel_codes", "kernel_scale", "bias"}


def test_rejects_what_keras_rejects():
    with pytest.raises(ValueError, match="output_padding"):
        PowerQuantConv2DTranspose(2, 3, strides=2, output_padding=2)
    with pytest.raises(ValueError, match="dilation_rate"):
        PowerQuantConv2DTranspose(2, 3, strides=2, dilation_rate=2)


def test_config_and_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    options = dict(
        kernel_size=(3, 2),
        strides=2,
        # Not "same" with output_padding: oneDNN's CPU kernel fails on that
        # in graph mode, for keras.layers.Conv2DTranspose too.
        output_padding=(1, 0),
        weight_bits=3,
        weight_exponent=0.55,
        activation="relu",
        use_bias=False,
    )
    layer = PowerQuantConv2DTranspose(5, name="up", **options)
    config = layer.get_config()
    assert config["output_padding"] == (1, 0) and config["filters"] == 5
    assert PowerQuantConv2DTranspose.from_config(config).get_config() == config

    inputs = keras.Input((4, 5, 3))
    model = keras.Model(inputs, layer(inputs))
    layer.set_float_weights(rng.standard_normal(layer._kernel_shape).astype(np.float32))
    data = rng.standard_normal((3, 4, 5, 3)).astype(np.float32)
    path = tmp_path / "transpose.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    restored = loaded.get_layer("up")
    assert type(restored) is PowerQuantConv2DTranspose
    assert restored.get_config() == config
    np.testing.assert_array_equal(restored.kernel_codes.numpy(), layer.kernel_codes.numpy())
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), model.predict(data, verbose=0))


@pytest.mark.parametrize("variant", range(len(VARIANTS) - 1))
def test_tap_coverage_is_where_each_tap_writes(variant):
    """The registry's coverage of each tap equals the mean output of a one-hot kernel on an all-ones input."""
    options = VARIANTS[variant]
    layer = keras.layers.Conv2DTranspose(1, use_bias=False, **options)
    x = np.ones((1, 5, 6, 1), np.float32)
    skip_unless_runs(layer, x.shape[1:])
    outputs = layer(x)
    coverage = linear_type(layer).tap_coverage(layer, x.shape, outputs.shape)
    for tap in np.ndindex(*layer.kernel_size):
        kernel = np.zeros(layer.kernel.shape, np.float32)
        kernel[tap] = 1.0
        layer.kernel.assign(kernel)
        expected = float(np.mean(layer(x).numpy()))
        assert np.prod([c[i] for c, i in zip(coverage, tap)]) == pytest.approx(expected, abs=1e-6), tap


@pytest.mark.parametrize("zero_mean", [False, True])
def test_statistics_propagate_through_the_transposed_convolution(zero_mean):
    """Per-channel moments of a strided transposed convolution of Normal(beta, gamma^2) inputs, data-free vs sampled.

    Output positions of different phases (position mod stride) sum different
    taps; the propagated variance is their average variance, without the
    spread of their means: exact for zero-mean inputs, too low otherwise.
    """
    inputs = keras.Input((6, 6, 3))
    normalized = keras.layers.BatchNormalization(name="bn")(inputs)  # moving statistics 0 and 1: gamma x + beta
    up = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")
    model = keras.Model(inputs, up(normalized))
    rng = np.random.default_rng(8)
    bn = model.get_layer("bn")
    bn.gamma.assign(rng.uniform(0.5, 1.5, 3).astype(np.float32))
    bn.beta.assign(rng.normal(0, 1, 3).astype(np.float32) if zero_mean is False else np.zeros(3, np.float32))
    up.kernel.assign(rng.normal(0, 0.5, up.kernel.shape).astype(np.float32))
    graph = FlatGraph(model)
    stats = propagate_statistics(graph, {})[graph.output_keys[0]].gaussians
    sampled = model.predict(rng.standard_normal((400, 6, 6, 3)).astype(np.float32), verbose=0)
    np.testing.assert_allclose(stats.mean, sampled.mean(axis=(0, 1, 2)), atol=0.02)
    if zero_mean:
        np.testing.assert_allclose(stats.var, sampled.var(axis=(0, 1, 2)), rtol=0.1)
    else:
        assert np.all(stats.var < sampled.var(axis=(0, 1, 2)))

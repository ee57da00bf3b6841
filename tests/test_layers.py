"""Tests of the Keras layers, run for real through Keras / TensorFlow.

References are the plain TensorFlow ops applied to the kernel that the numpy
`WeightQuantizer` produces, and the numpy `ActivationQuantizer` applied to
the Keras activation's output.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_powerquant.layers import PowerQuantActivation
from keras_powerquant.layers import PowerQuantConv2D
from keras_powerquant.layers import PowerQuantDense
from keras_powerquant.layers import PowerQuantDepthwiseConv2D
from keras_powerquant.quantization.activation_functions import NUMPY_ACTIVATIONS
from keras_powerquant.quantization.activation_functions import relu as numpy_relu
from keras_powerquant.quantization.activations import ActivationQuantizer
from keras_powerquant.quantization.packing import unpack_nibbles
from keras_powerquant.quantization.weights import WeightQuantizer

BITS = [2, 4, 5, 8]


def hash_key(value):
    """A process-independent integer for a test parameter."""
    return sum((i + 1) * ord(c) for i, c in enumerate(repr(value)))


def build_with_weights(layer, input_shape, rng, zero_channel=False):
    """Builds `layer`, sets a random float kernel (and bias); returns them."""
    layer.build(input_shape)
    kernel = rng.standard_normal(layer._kernel_shape).astype(np.float32)
    if zero_channel:
        kernel[..., 0] = 0.0
    channels = layer.output_channels(layer._kernel_shape)
    bias = rng.standard_normal(channels).astype(np.float32) if layer.use_bias else None
    layer.set_float_weights(kernel, bias)
    return kernel, bias


def reference_kernel(layer, kernel):
    quantizer = WeightQuantizer(
        layer.weight_bits, layer.weight_exponent, per_channel=layer.quantizer.per_channel
    )
    return quantizer.quantize(kernel, layer.channel_ndim)


def check_variables(layer, kernel):
    """dtypes, shapes and stored values of the layer's variables."""
    assert layer.kernel_codes.dtype == "int8"
    assert layer.kernel_scale.dtype == "float32"
    quantizer = WeightQuantizer(
        layer.weight_bits, layer.weight_exponent, per_channel=layer.quantizer.per_channel
    )
    codes, scales = quantizer.encode(kernel, layer.channel_ndim)
    stored = layer.kernel_codes.numpy()
    if layer.weight_bits <= 4:
        assert layer.kernel_codes.shape == (math.ceil(kernel.size / 2),)
        np.testing.assert_array_equal(unpack_nibbles(stored, kernel.size), codes.ravel())
    else:
        assert layer.kernel_codes.shape == kernel.shape
        np.testing.assert_array_equal(stored, codes)
    np.testing.assert_array_equal(layer.kernel_scale.numpy(), scales)
    expected_scale_shape = kernel.shape[kernel.ndim - layer.channel_ndim :]
    assert layer.kernel_scale.shape == (expected_scale_shape if layer.quantizer.per_channel else ())
    if layer.use_bias:
        assert layer.bias.dtype == "float32"
        assert layer.bias.shape == (layer.output_channels(kernel.shape),)
    else:
        assert layer.bias is None
    assert not layer.trainable_weights
    # The kernel the layer computes with is the numpy quantizer's, bit for bit.
    np.testing.assert_array_equal(
        layer.dequantized_kernel().numpy(), reference_kernel(layer, kernel)
    )


# ---------------------------------------------------------------------------
# Dense.


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_equals_matmul_with_quantized_kernel(bits, per_channel, use_bias):
    rng = np.random.default_rng(hash_key((bits, per_channel, use_bias)))
    layer = PowerQuantDense(
        5, weight_bits=bits, weight_exponent=0.6, per_channel=per_channel, use_bias=use_bias
    )
    kernel, bias = build_with_weights(layer, (None, 7), rng, zero_channel=True)
    check_variables(layer, kernel)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    expected = tf.matmul(x, reference_kernel(layer, kernel)).numpy()
    if use_bias:
        expected = expected + bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_dense_on_3d_input_with_activation(bits):
    rng = np.random.default_rng(bits)
    layer = PowerQuantDense(6, weight_bits=bits, weight_exponent=1.3, activation="relu")
    kernel, bias = build_with_weights(layer, (None, 3, 5), rng)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    expected = tf.nn.relu(tf.matmul(x, reference_kernel(layer, kernel)) + bias).numpy()
    outputs = layer(x).numpy()
    assert outputs.shape == (2, 3, 6)
    assert layer.compute_output_shape((2, 3, 5)) == (2, 3, 6)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Conv2D and DepthwiseConv2D.

CONV_VARIANTS = [
    dict(kernel_size=3),
    dict(kernel_size=(3, 2), strides=(2, 1), padding="same"),
    dict(kernel_size=3, dilation_rate=2, padding="same"),
    dict(kernel_size=1, strides=2),
]


def _runs_unequal_depthwise_strides():
    """Whether this platform's TensorFlow runs a depthwise conv with strides (2, 1).

    oneDNN's kernels (CPUs with AVX-512) do; TensorFlow's plain CPU kernels
    refuse them, for `keras.layers.DepthwiseConv2D` and for our layer alike.
    """
    try:
        tf.nn.depthwise_conv2d(tf.ones((1, 4, 4, 1)), tf.ones((1, 1, 1, 1)), (1, 2, 1, 1), "VALID")
    except tf.errors.InvalidArgumentError:
        return False
    return True


UNEQUAL_DEPTHWISE_STRIDES = _runs_unequal_depthwise_strides()


def nhwc_to(x, data_format):
    return x if data_format == "channels_last" else np.transpose(x, (0, 3, 1, 2))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("variant", range(len(CONV_VARIANTS)))
def test_conv2d_equals_conv2d_with_quantized_kernel(bits, per_channel, use_bias, variant):
    options = CONV_VARIANTS[variant]
    rng = np.random.default_rng(hash_key((bits, per_channel, use_bias, variant)))
    layer = PowerQuantConv2D(
        4,
        weight_bits=bits,
        weight_exponent=0.7,
        per_channel=per_channel,
        use_bias=use_bias,
        **options,
    )
    kernel, bias = build_with_weights(layer, (None, 9, 8, 3), rng, zero_channel=True)
    check_variables(layer, kernel)
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    expected = tf.nn.conv2d(
        x,
        reference_kernel(layer, kernel),
        strides=options.get("strides", 1),
        padding=options.get("padding", "valid").upper(),
        dilations=options.get("dilation_rate", 1),
    ).numpy()
    if use_bias:
        expected = expected + bias
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("variant", range(len(CONV_VARIANTS)))
@pytest.mark.parametrize("depth_multiplier", [1, 2])
def test_depthwise_equals_depthwise_conv2d_with_quantized_kernel(
    bits, per_channel, use_bias, variant, depth_multiplier
):
    options = CONV_VARIANTS[variant]
    if _unequal_strides(options) and not UNEQUAL_DEPTHWISE_STRIDES:
        pytest.skip("this platform's DepthwiseConv2dNative kernel refuses unequal strides (float op probed)")
    rng = np.random.default_rng(hash_key((bits, per_channel, use_bias, variant, depth_multiplier)))
    layer = PowerQuantDepthwiseConv2D(
        depth_multiplier=depth_multiplier,
        weight_bits=bits,
        weight_exponent=0.55,
        per_channel=per_channel,
        use_bias=use_bias,
        **options,
    )
    kernel, bias = build_with_weights(layer, (None, 9, 8, 3), rng, zero_channel=True)
    assert kernel.shape[-2:] == (3, depth_multiplier)
    check_variables(layer, kernel)
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    strides = options.get("strides", 1)
    strides = (strides, strides) if isinstance(strides, int) else strides
    dilation = options.get("dilation_rate", 1)
    expected = tf.nn.depthwise_conv2d(
        x,
        reference_kernel(layer, kernel),
        strides=(1,) + tuple(strides) + (1,),
        padding=options.get("padding", "valid").upper(),
        dilations=(dilation, dilation),
    ).numpy()
    if use_bias:
        expected = expected + bias
    outputs = layer(x).numpy()
    assert outputs.shape[-1] == 3 * depth_multiplier
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def _unequal_strides(options):
    strides = options.get("strides", 1)
    return not isinstance(strides, int) and strides[0] != strides[1]


@pytest.mark.skipif(UNEQUAL_DEPTHWISE_STRIDES, reason="this platform runs unequal depthwise strides")
def test_unequal_depthwise_strides_fail_like_the_float_layer():
    """Where TensorFlow cannot run them, our layer fails as Keras' own layer does."""
    x = np.ones((1, 6, 6, 2), np.float32)
    float_layer = keras.layers.DepthwiseConv2D(3, strides=(2, 1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="equal length strides"):
        float_layer(x)
    layer = PowerQuantDepthwiseConv2D(3, strides=(2, 1))
    build_with_weights(layer, (None, 6, 6, 2), np.random.default_rng(0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="equal length strides"):
        layer(x)


@pytest.mark.parametrize("depthwise", [False, True])
def test_channels_first(depthwise):
    rng = np.random.default_rng(7)
    if depthwise:
        layer = PowerQuantDepthwiseConv2D(3, depth_multiplier=2, data_format="channels_first")
    else:
        # softmax reduces the last axis: it must see the channels_first output.
        layer = PowerQuantConv2D(4, 3, padding="same", data_format="channels_first", activation="softmax")
    kernel, bias = build_with_weights(layer, (None, 3, 6, 5), rng)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    quantized = reference_kernel(layer, kernel)
    x_last = np.transpose(x, (0, 2, 3, 1))
    if depthwise:
        expected = tf.nn.depthwise_conv2d(x_last, quantized, [1, 1, 1, 1], "VALID")
    else:
        expected = tf.nn.conv2d(x_last, quantized, 1, "SAME")
    expected = np.transpose(expected.numpy() + bias, (0, 3, 1, 2))
    if not depthwise:
        expected = keras.ops.softmax(expected, axis=-1).numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# set_float_weights, lazy build, config.


def make_kernel_layers(**kwargs):
    return [
        (PowerQuantDense(3, **kwargs), (None, 4)),
        (PowerQuantConv2D(3, 2, **kwargs), (None, 5, 5, 2)),
        (PowerQuantDepthwiseConv2D(2, depth_multiplier=2, **kwargs), (None, 5, 5, 2)),
    ]


@pytest.mark.parametrize("index", range(3))
def test_set_float_weights_validation(index):
    layer, input_shape = make_kernel_layers()[index]
    layer.build(input_shape)
    shape = layer._kernel_shape
    channels = layer.output_channels(shape)
    kernel = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match="shape"):
        layer.set_float_weights(np.ones(shape + (1,), np.float32), np.zeros(channels))
    with pytest.raises(ValueError, match="shape"):
        layer.set_float_weights(np.ones(shape[:-1] + (shape[-1] + 1,), np.float32), None)
    with pytest.raises(ValueError, match="bias"):
        layer.set_float_weights(kernel)
    layer.set_float_weights(kernel, np.zeros(channels))

    no_bias, _ = make_kernel_layers(use_bias=False)[index]
    no_bias.build(input_shape)
    with pytest.raises(ValueError, match="bias"):
        no_bias.set_float_weights(kernel, np.zeros(channels))
    no_bias.set_float_weights(kernel)
    assert no_bias.bias is None
    assert len(no_bias.weights) == 2


@pytest.mark.parametrize("index", range(3))
def test_layers_are_built_lazily(index):
    layer, input_shape = make_kernel_layers()[index]
    assert not layer.built
    assert layer.weights == []
    x = np.zeros((1,) + input_shape[1:], np.float32)
    layer(x)
    assert layer.built
    assert {w.name for w in layer.weights} == {"kernel_codes", "kernel_scale", "bias"}


LAYER_CONFIGS = [
    (PowerQuantDense, dict(units=5, weight_bits=3, weight_exponent=0.6, activation="relu")),
    (PowerQuantDense, dict(units=2, per_channel=False, use_bias=False, name="dense_x")),
    (
        PowerQuantConv2D,
        dict(
            filters=4,
            kernel_size=(3, 1),
            strides=2,
            padding="same",
            dilation_rate=1,
            weight_bits=8,
            weight_exponent=1.7,
            activation="tanh",
        ),
    ),
    (PowerQuantConv2D, dict(filters=2, kernel_size=3, data_format="channels_first")),
    (
        PowerQuantDepthwiseConv2D,
        dict(kernel_size=5, depth_multiplier=3, dilation_rate=(2, 2), per_channel=False),
    ),
    (PowerQuantActivation, dict(activation="relu6", bits=3, exponent=0.4, clip=5.5)),
    (
        PowerQuantActivation,
        dict(activation="relu", max_value=4.0, negative_slope=0.1, threshold=0.2, signed=True),
    ),
    (PowerQuantActivation, dict(activation="linear", bits=8, signed=True, clip=3.0)),
]


@pytest.mark.parametrize("index", range(len(LAYER_CONFIGS)))
def test_from_config_rebuilds_an_identical_layer(index):
    cls, kwargs = LAYER_CONFIGS[index]
    layer = cls(**kwargs)
    config = layer.get_config()
    for key, value in kwargs.items():
        if key in ("kernel_size", "strides", "dilation_rate"):
            value = (value, value) if isinstance(value, int) else tuple(value)
        if key == "activation" and cls is not PowerQuantActivation:
            value = keras.activations.serialize(keras.activations.get(value))
        assert config[key] == value, key
    clone = cls.from_config(config)
    assert type(clone) is cls
    assert clone.get_config() == config


def test_keras_file_round_trip(tmp_path):
    rng = np.random.default_rng(2024)
    inputs = keras.Input((8, 8, 3))
    x = PowerQuantActivation("linear", bits=8, exponent=1.0, clip=3.0, signed=True)(inputs)
    conv = PowerQuantConv2D(6, 3, padding="same", weight_bits=4, weight_exponent=0.6)
    x = conv(x)
    x = PowerQuantActivation("relu", bits=4, exponent=0.7, clip=2.0)(x)
    depthwise = PowerQuantDepthwiseConv2D(
        3, depth_multiplier=2, weight_bits=5, per_channel=False, use_bias=False
    )
    x = depthwise(x)
    x = PowerQuantActivation("relu6", bits=3, exponent=0.8, clip=4.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = PowerQuantDense(10, weight_bits=2, weight_exponent=1.2, activation="softmax")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    for layer in (conv, depthwise, dense):
        kernel = rng.standard_normal(layer._kernel_shape).astype(np.float32)
        channels = layer.output_channels(layer._kernel_shape)
        bias = rng.standard_normal(channels) if layer.use_bias else None
        layer.set_float_weights(kernel, bias)

    data = rng.standard_normal((16, 8, 8, 3)).astype(np.float32) * 2
    expected = model.predict(data, verbose=0)
    path = tmp_path / "quantized.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), expected)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    for original, restored in zip(model.layers, loaded.layers):
        assert restored.get_config() == original.get_config()
        for a, b in zip(original.weights, restored.weights):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert loaded.get_layer(conv.name).kernel_codes.dtype == "int8"


# ---------------------------------------------------------------------------
# PowerQuantActivation.


def keras_activation(layer, x):
    """The Keras activation of `layer`, computed explicitly (float32)."""
    if layer.activation == "relu":
        y = keras.activations.relu(
            x,
            negative_slope=layer.negative_slope,
            max_value=layer.max_value,
            threshold=layer.threshold,
        )
    else:
        y = keras.activations.get(layer.activation)(x)
    return keras.ops.convert_to_numpy(y)


def activation_inputs(quantizer, rng, preimage=None):
    """Random values, every threshold and its float32 neighbours, +-clip, extremes."""
    thresholds = quantizer.thresholds()
    if preimage is not None:
        thresholds = preimage(thresholds)
    pieces = [
        (rng.standard_normal(200) * 3).astype(np.float32),
        thresholds,
        np.nextafter(thresholds, np.float32(-np.inf)),
        np.nextafter(thresholds, np.float32(np.inf)),
        quantizer.levels(),
        np.array([0.0, -0.0, quantizer.clip, -quantizer.clip, 6.0, 1e30, -1e30]),
    ]
    return np.concatenate([p.astype(np.float32) for p in pieces])[None, :]


def _logit(t):
    t = np.clip(t.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(t / (1 - t))


ACTIVATION_CASES = [
    dict(activation="relu", clip=2.5),
    dict(activation="relu", clip=8.0, signed=True),
    dict(activation="relu6", clip=4.0),
    dict(activation="relu6", clip=7.0),
    dict(activation="sigmoid", clip=1.0),
    dict(activation="sigmoid", clip=0.8),
    dict(activation="tanh", clip=1.0, signed=True),
    dict(activation="tanh", clip=0.6, signed=True),
    dict(activation="linear", clip=3.0, signed=True),
    dict(activation="linear", clip=3.0),
    dict(activation="relu", clip=4.0, max_value=3.0),
    dict(activation="relu", clip=2.0, max_value=3.0),
    dict(activation="relu", clip=2.0, negative_slope=0.1),
    dict(activation="relu", clip=2.0, negative_slope=0.1, signed=True),
    dict(activation="relu", clip=2.0, threshold=0.5),
    dict(
        activation="relu", clip=2.0, threshold=0.5, negative_slope=0.2, max_value=1.5, signed=True
    ),
]


def assert_matches_reference(outputs, activated, quantizer):
    """Outputs equal the numpy reference up to float32 rounding of exp/log.

    Only values lying on a decision threshold (within float32 rounding) may
    take the neighbouring code, and then the output is that code's level.
    """
    expected = quantizer.quantize(activated)
    scale = quantizer.clip
    close = np.isclose(outputs, expected, rtol=2e-6, atol=2e-6 * scale)
    magnitudes = np.abs(activated[~close]).astype(np.float64)
    thresholds = quantizer.magnitude_thresholds()
    distance = np.min(np.abs(magnitudes[:, None] - thresholds[None, :]), axis=1, initial=np.inf)
    assert np.all(distance <= 4e-7 * np.maximum(magnitudes, scale)), activated[~close][:5]
    levels = quantizer.levels()
    nearest = np.min(np.abs(outputs[~close][:, None] - levels[None, :]), axis=1, initial=0.0)
    assert np.all(nearest <= 2e-6 * scale)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("exponent", [0.45, 1.0, 1.6])
@pytest.mark.parametrize("case", range(len(ACTIVATION_CASES)))
def test_activation_layer_equals_numpy_quantizer(bits, exponent, case):
    kwargs = ACTIVATION_CASES[case]
    layer = PowerQuantActivation(bits=bits, exponent=exponent, **kwargs)
    quantizer = ActivationQuantizer(bits, exponent, kwargs["clip"], kwargs.get("signed", False))
    rng = np.random.default_rng(hash_key((bits, exponent, case)))
    preimage = _logit if kwargs["activation"] == "sigmoid" else None
    if kwargs["activation"] == "tanh":
        preimage = lambda t: np.arctanh(np.clip(t, -0.999999, 0.999999))  # noqa: E731
    x = activation_inputs(quantizer, rng, preimage)
    outputs = layer(x).numpy()
    assert outputs.dtype == np.float32 and outputs.shape == x.shape
    assert np.all(np.isfinite(outputs))
    assert_matches_reference(outputs[0], keras_activation(layer, x)[0], quantizer)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("exponent", [0.45, 1.0, 1.6])
@pytest.mark.parametrize("signed", [False, True])
def test_values_clearly_off_thresholds_take_the_reference_code(bits, exponent, signed):
    quantizer = ActivationQuantizer(bits, exponent, 2.0, signed)
    layer = PowerQuantActivation("linear", bits, exponent, 2.0, signed)
    thresholds = quantizer.magnitude_thresholds()
    # 1e-4 relative away from each threshold, both sides: far beyond rounding.
    x = np.concatenate([thresholds * (1 - 1e-4), thresholds * (1 + 1e-4)]).astype(np.float32)
    if signed:
        x = np.concatenate([x, -x])
    codes = quantizer.encode(x)
    decoded = quantizer.decode(codes)
    np.testing.assert_allclose(layer(x[None, :]).numpy()[0], decoded, rtol=2e-6, atol=1e-7)
    # Just below a threshold gives the lower code, just above the upper one.
    n = len(thresholds)
    np.testing.assert_array_equal(np.abs(codes[:n]), np.arange(n))
    np.testing.assert_array_equal(np.abs(codes[n : 2 * n]), np.arange(1, n + 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(activation="relu", clip=2.5),
        dict(activation="relu", clip=2.5, max_value=2.5),
        dict(activation="relu", clip=2.5, max_value=10.0),
        dict(activation="relu6", clip=6.0),
        dict(activation="relu6", clip=1.5),
    ],
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_absorbed_relu_equals_explicit_relu(kwargs, bits):
    layer = PowerQuantActivation(bits=bits, exponent=0.6, **kwargs)
    assert layer.activation_absorbed
    quantizer = layer.quantizer
    x = activation_inputs(quantizer, np.random.default_rng(bits))
    x = np.concatenate([x, [[np.inf, -np.inf]]], axis=1).astype(np.float32)
    assert_matches_reference(layer(x).numpy()[0], keras_activation(layer, x)[0], quantizer)
    # The shortcut really skips the activation op: at a = 1 FakeQuant alone
    # clips and rounds; otherwise one Maximum guards the logarithm (not a
    # Relu: Grappler's remapper fails on Relu+Log after an Add), and a plain
    # Relu the square root, taken as Pow(x, 1/2) so Grappler fuses the Relu
    # into a convolution before it.
    uniform = PowerQuantActivation(bits=bits, exponent=1.0, **kwargs)
    rooted = PowerQuantActivation(bits=bits, exponent=0.5, **kwargs)
    spec = tf.TensorSpec([None, 5], tf.float32)
    assert op_types(uniform, spec) & ACTIVATION_OPS == set()
    assert op_types(layer, spec) & ACTIVATION_OPS == {"Maximum"}
    assert op_types(rooted, spec) & ACTIVATION_OPS == {"Relu"}
    assert {"Pow", "Square"} <= op_types(rooted, spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(activation="relu", clip=2.5, signed=True),
        dict(activation="relu", clip=2.5, max_value=2.0),
        dict(activation="relu", clip=2.5, negative_slope=0.1),
        dict(activation="relu", clip=2.5, threshold=0.1),
        dict(activation="relu6", clip=6.5),
        dict(activation="sigmoid", clip=1.0),
    ],
)
def test_activation_not_absorbed_when_it_changes_the_result(kwargs):
    assert not PowerQuantActivation(**kwargs).activation_absorbed


def test_activation_layer_rejects_bad_arguments():
    with pytest.raises(ValueError):
        PowerQuantActivation(activation=keras.activations.relu)
    with pytest.raises(ValueError):
        PowerQuantActivation(bits=9)
    with pytest.raises(ValueError):
        PowerQuantActivation(exponent=0.0)
    with pytest.raises(ValueError):
        PowerQuantActivation(clip=-1.0)


@pytest.mark.parametrize("name", sorted(NUMPY_ACTIVATIONS))
def test_numpy_activations_match_keras(name):
    x = np.concatenate(
        [np.linspace(-8, 8, 1601), [-1e-3, 0.0, 1e-3, 30.0, -30.0]]
    ).astype(np.float32)
    expected = keras.ops.convert_to_numpy(keras.activations.get(name)(x))
    actual = NUMPY_ACTIVATIONS[name](x.astype(np.float64))
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(threshold=0.5),
        dict(threshold=0.5, negative_slope=0.1),
        dict(threshold=0.25, negative_slope=0.3, max_value=2.0),
        dict(negative_slope=0.2, max_value=6.0),
        dict(max_value=3.0),
    ],
)
def test_numpy_relu_matches_keras_including_at_the_threshold(kwargs):
    # Arguments as keras.layers.ReLU accepts them (all >= 0). Keras keeps x
    # only strictly above the threshold: relu(threshold) is 0.
    threshold = kwargs.get("threshold", 0.0)
    x = np.concatenate([np.linspace(-4, 4, 801), [threshold]]).astype(np.float32)
    expected = keras.ops.convert_to_numpy(keras.activations.relu(x, **kwargs))
    actual = numpy_relu(x.astype(np.float64), **kwargs)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Graphs: FakeQuant in the power domain, Pow only as Pow(x, 1/2), gathers for kernels.

ACTIVATION_OPS = {"Relu", "Relu6", "Minimum", "Maximum", "ClipByValue"}


def op_types(layer, spec):
    concrete = tf.function(layer).get_concrete_function(spec)
    return {op.type for op in concrete.graph.get_operations()}


@pytest.mark.parametrize("case", range(len(ACTIVATION_CASES)))
@pytest.mark.parametrize("exponent", [0.62, 1.0, 0.5, 0.25])
def test_activation_graph_quantizes_with_fakequant_and_pow_only_as_a_square_root(case, exponent):
    layer = PowerQuantActivation(bits=4, exponent=exponent, **ACTIVATION_CASES[case])
    graph = tf.function(layer).get_concrete_function(tf.TensorSpec([None, 4, 4, 3], tf.float32)).graph
    types = {op.type for op in graph.get_operations()}
    assert "FakeQuantWithMinMaxArgs" in types
    # Pow only as the first square root of an unsigned quantizer, Pow(x, 1/2),
    # which Grappler runs as a Sqrt (test_export checks the optimized graph).
    pows = [op for op in graph.get_operations() if "Pow" in op.type]
    assert all(op.type == "Pow" and tf.get_static_value(op.inputs[1]) == 0.5 for op in pows), types
    assert bool(pows) == (exponent in (0.5, 0.25) and not layer.quantizer.signed)
    # exp/log only for general exponents; square roots and squares for 1/2^k.
    assert ("Exp" in types) == (exponent == 0.62)
    assert (("Sqrt" in types or bool(pows)) and "Square" in types) == (exponent in (0.5, 0.25))


@pytest.mark.parametrize("exponent", [0.5, 0.25, 0.125])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_square_root_exponents_match_the_reference(exponent, bits, signed):
    quantizer = ActivationQuantizer(bits, exponent, 3.0, signed)
    layer = PowerQuantActivation("linear" if signed else "relu", bits, exponent, 3.0, signed)
    x = activation_inputs(quantizer, np.random.default_rng(bits))
    assert_matches_reference(layer(x).numpy()[0], keras_activation(layer, x)[0], quantizer)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("index", range(3))
def test_kernel_layer_graph_decodes_by_gather(bits, index):
    layer, input_shape = make_kernel_layers(weight_bits=bits, weight_exponent=0.62)[index]
    layer.build(input_shape)
    types = op_types(layer, tf.TensorSpec(input_shape, tf.float32))
    assert "GatherV2" in types
    assert not any("Pow" in t for t in types), types

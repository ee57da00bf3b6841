"""PowerQuantConv1D/2D/3D (groups, causal padding, channels_first) against Keras' own convolutions.

Each PowerQuant layer must compute what the Keras layer it replaces
computes when that layer holds the PowerQuant layer's decoded kernel: the
same TensorFlow convolution up to float32 summation order.
"""

import keras
import numpy as np
import pytest

from keras_powerquant.layers import PowerQuantConv1D
from keras_powerquant.layers import PowerQuantConv2D
from keras_powerquant.layers import PowerQuantConv3D

L = keras.layers
QUANTIZED = {1: PowerQuantConv1D, 2: PowerQuantConv2D, 3: PowerQuantConv3D}
FLOAT = {1: L.Conv1D, 2: L.Conv2D, 3: L.Conv3D}
SPATIAL = {1: (11,), 2: (7, 5), 3: (5, 4, 9)}

VARIANTS = [
    # rank, options (filters 6 unless given)
    (1, dict(kernel_size=3)),
    (1, dict(kernel_size=3, padding="causal", dilation_rate=2)),
    (1, dict(kernel_size=2, strides=2, padding="same", groups=2)),
    (1, dict(kernel_size=3, padding="causal", data_format="channels_first")),
    (2, dict(kernel_size=3, padding="same", groups=2)),
    (2, dict(kernel_size=(3, 2), strides=(2, 1), groups=4, filters=8)),
    (2, dict(kernel_size=3, dilation_rate=2, padding="same", groups=2, data_format="channels_first")),
    (3, dict(kernel_size=2)),
    (3, dict(kernel_size=(3, 1, 2), strides=(1, 2, 1), padding="same", data_format="channels_first")),
    (3, dict(kernel_size=3, padding="same", groups=2)),
    (3, dict(kernel_size=2, dilation_rate=(1, 2, 1), groups=2, data_format="channels_first")),
]


def _inputs(rank, options, rng):
    channels_first = options.get("data_format") == "channels_first"
    shape = (2, 4) + SPATIAL[rank] if channels_first else (2,) + SPATIAL[rank] + (4,)
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_matches_the_keras_convolution_holding_the_decoded_kernel(variant, bits):
    rank, options = VARIANTS[variant]
    options = {"filters": 6, **options}
    rng = np.random.default_rng(variant * 10 + bits)
    x = _inputs(rank, options, rng)
    layer = QUANTIZED[rank](weight_bits=bits, weight_exponent=0.7, activation="relu", **options)
    layer.build(x.shape)
    kernel = rng.standard_normal(layer._kernel_shape).astype(np.float32)
    bias = rng.standard_normal(options["filters"]).astype(np.float32)
    layer.set_float_weights(kernel, bias)
    # The reference runs channels_last: Keras' channels_first convolutions
    # have no kernels on TensorFlow's plain CPU build, and Keras 3.15 adds
    # their bias along the last axis when it has as many entries as filters.
    channels_first = options.get("data_format") == "channels_first"
    reference = FLOAT[rank](activation="relu", **{**options, "data_format": "channels_last"})
    x_last = np.moveaxis(x, 1, -1) if channels_first else x
    reference.build(x_last.shape)
    assert tuple(reference.kernel.shape) == layer._kernel_shape
    reference.set_weights([layer.dequantized_kernel().numpy(), bias])
    expected = keras.ops.convert_to_numpy(reference(x_last))
    expected = np.moveaxis(expected, -1, 1) if channels_first else expected
    got = layer(x).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The codes are int8, two per byte at <= 4 bits.
    assert layer.kernel_codes.dtype == "int8"
    packed_shape = ((kernel.size + 1) // 2,) if bits <= 4 else kernel.shape
    assert tuple(layer.kernel_codes.shape) == packed_shape


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_config_round_trip_and_keras_file(rank, tmp_path):
    rng = np.random.default_rng(rank)
    options = dict(filters=4, kernel_size=2, padding="causal" if rank == 1 else "same", groups=2, weight_bits=4)
    inputs = keras.Input(SPATIAL[rank] + (6,))
    layer = QUANTIZED[rank](weight_exponent=0.6, name="conv", **options)
    model = keras.Model(inputs, layer(inputs))
    layer.set_float_weights(rng.standard_normal(layer._kernel_shape), rng.standard_normal(4))
    config = layer.get_config()
    assert config["groups"] == 2 and config["kernel_size"] == (2,) * rank
    assert "rank" not in config
    assert type(layer).from_config(config).get_config() == config
    x = rng.standard_normal((3,) + SPATIAL[rank] + (6,)).astype(np.float32)
    path = tmp_path / "conv.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("conv")) is type(layer)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="padding"):
        PowerQuantConv2D(4, 3, padding="causal")
    with pytest.raises(ValueError, match="kernel_size"):
        PowerQuantConv3D(4, (3, 3))
    with pytest.raises(ValueError, match="multiple of `groups`"):
        PowerQuantConv2D(5, 3, groups=2)
    layer = PowerQuantConv1D(4, 3, groups=4)
    with pytest.raises(ValueError, match="input channels"):
        layer.build((None, 8, 6))

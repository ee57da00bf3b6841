"""Skips for tests whose float Keras reference this machine's TensorFlow kernels cannot run.

Without oneDNN (CPUs without AVX-512, or TF_ENABLE_ONEDNN_OPTS=0),
TensorFlow's CPU kernels refuse some layer configurations that oneDNN runs:
a channels_first Conv2D ("only supports the NHWC tensor format"), a
channels_first or dilated Conv2DTranspose. A test that compares against such
a float layer skips there with TensorFlow's own reason, and runs everywhere
else; the PowerQuant layers themselves run on every kernel set.
"""

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_powerquant.errors import op_error_reason


@functools.cache
def _refusal(class_name, config_json, input_shape):
    layer = getattr(keras.layers, class_name).from_config(json.loads(config_json))
    try:
        layer(np.zeros((1,) + input_shape, np.float32))
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
        return op_error_reason(error)
    return None


def skip_unless_runs(layer, input_shape):
    """Skips the test if a fresh copy of the float Keras `layer` cannot run here on `input_shape` (no batch axis)."""
    config = json.dumps(layer.get_config(), sort_keys=True, default=str)
    reason = _refusal(type(layer).__name__, config, tuple(int(d) for d in input_shape))
    if reason is not None:
        pytest.skip(f"this TensorFlow's CPU kernels cannot run {type(layer).__name__} here: {reason}")

"""keras.applications models, built small (weights=None): every layer with a
kernel of a type the registry quantizes is planned quantized, and every other
one is reported float with a reason (`inspect_model`: nothing is fitted)."""

import keras
import pytest

import keras_powerquant as kpq
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.separable import DEPTHWISE_SUFFIX
from keras_powerquant.converter.separable import is_separable
from keras_powerquant.converter.separable import POINTWISE_SUFFIX
from keras_powerquant.keras_internals import all_layers

KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")

# name -> smallest input the model takes, and options.
APPLICATIONS = {
    "MobileNetV3Small": ((32, 32, 3), {"alpha": 0.75, "include_preprocessing": False}),
    "EfficientNetB0": ((32, 32, 3), {}),
    "ConvNeXtTiny": ((32, 32, 3), {"include_preprocessing": False}),
    "Xception": ((71, 71, 3), {}),
}


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_every_kernel_of_a_supported_type_is_quantized(name):
    shape, options = APPLICATIONS[name]
    model = getattr(keras.applications, name)(input_shape=shape, weights=None, classes=10, **options)
    report = kpq.inspect_model(model, 4, 4)
    quantized = {layer.name for layer in report.quantized_layers}
    float_reasons = {layer.name: layer.reason for layer in report.float_layers}
    kernels = [
        layer
        for layer in all_layers(model)
        if not isinstance(layer, keras.Model) and any(hasattr(layer, a) for a in KERNEL_ATTRIBUTES)
    ]
    assert kernels
    for layer in kernels:
        entry = linear_type(layer)
        if is_separable(layer):  # quantized as the two layers it is split into
            assert {layer.name + DEPTHWISE_SUFFIX, layer.name + POINTWISE_SUFFIX} <= quantized, layer.name
        elif entry is not None and entry.quantized_class is not None and entry.float_reason(layer) is None:
            assert layer.name in quantized, (layer.name, float_reasons.get(layer.name))
        else:
            assert float_reasons.get(layer.name), layer.name

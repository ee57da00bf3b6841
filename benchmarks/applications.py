"""keras.applications coverage: data-free W4/A4 conversion of seven model families.

What is measured, per model (built with `weights=None` at 224x224x3, seeded;
random weights: times and sizes depend on the layer shapes, not on the
values): the wall time of `kpq.convert(model, 4, 4)` alone (building the
model is outside it), the variable payload of the float and the converted
model (`keras_powerquant.export.variable_bytes`: element count times item
size), the layers that hold a kernel, how many of them are quantized, and
every layer the report keeps float with its reason. One conversion per
model: the coverage is the result; the times are upper bounds on a shared
machine.

`python benchmarks/applications.py [--quick] [--json benchmarks/applications.json]`
(`--quick`: MobileNetV3Small and EfficientNetB0 only).
"""

import gc
import sys
import time

import common
import keras

from keras_powerquant.export import variable_bytes
from keras_powerquant.keras_internals import all_layers

APPLICATIONS = {
    "Xception": keras.applications.Xception,
    "EfficientNetB0": keras.applications.EfficientNetB0,
    "MobileNetV3Small": keras.applications.MobileNetV3Small,
    "ConvNeXtTiny": keras.applications.ConvNeXtTiny,
    "DenseNet121": keras.applications.DenseNet121,
    "NASNetMobile": keras.applications.NASNetMobile,
    "ResNet50V2": keras.applications.ResNet50V2,
}
QUICK = ("MobileNetV3Small", "EfficientNetB0")
KERNEL_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def kernel_layers(model):
    """Leaf layers of `model` that hold a kernel (Dense, convolutions, EinsumDense...)."""
    return [
        layer
        for layer in all_layers(model)
        if not isinstance(layer, keras.Model) and any(hasattr(layer, a) for a in KERNEL_ATTRIBUTES)
    ]


def _is_quantized(layer, quantized_names):
    """Whether the report quantizes `layer`; a SeparableConv2D is quantized as its two split parts."""
    parts = (f"{layer.name}_depthwise", f"{layer.name}_pointwise")
    return layer.name in quantized_names or all(part in quantized_names for part in parts)


def _measure(name, constructor):
    keras.utils.set_random_seed(common.SEED)
    model = constructor(weights=None, input_shape=(224, 224, 3))
    start = time.perf_counter()
    quantized, report = common.kpq.convert(model, 4, 4)
    seconds = time.perf_counter() - start
    kernels = kernel_layers(model)
    quantized_names = {layer.name for layer in report.quantized_layers}
    return {
        "model": name,
        "parameters": int(model.count_params()),
        "convert_seconds": seconds,
        "float_bytes": variable_bytes(model),
        "quantized_bytes": variable_bytes(quantized),
        "kernel_layers": len(kernels),
        "quantized_kernel_layers": sum(_is_quantized(layer, quantized_names) for layer in kernels),
        "float_kernel_layers": [
            {"name": layer.name, "class": type(layer).__name__}
            for layer in kernels
            if not _is_quantized(layer, quantized_names)
        ],
        "float_layers": [
            {"name": layer.name, "class": layer.class_name, "reason": layer.reason} for layer in report.float_layers
        ],
        "activation_quantizers": sum(a.status == "quantized" for a in report.activations),
        "float_activation_quantizers": sum(a.status != "quantized" for a in report.activations),
        "stage_seconds": report.seconds,
    }


def run(quick=False):
    entries = []
    for name, constructor in APPLICATIONS.items():
        if quick and name not in QUICK:
            continue
        entries.append(_measure(name, constructor))
        keras.backend.clear_session()
        gc.collect()
    return {
        "machine": common.machine_description(),
        "setting": "kpq.convert(model, 4, 4): data-free, W4/A4, converter defaults; weights=None, 224x224x3",
        "quick": quick,
        "entries": entries,
    }


def _float_summary(entry):
    reasons = {}
    for layer in entry["float_layers"]:
        reasons.setdefault(f"{layer['class']}: {layer['reason']}", []).append(layer["name"])
    return "; ".join(f"{len(names)} {what}" for what, names in sorted(reasons.items())) or "none"


def markdown(result):
    rows = [
        [
            e["model"],
            f"{e['parameters']:,}",
            f"{e['convert_seconds']:.1f}",
            f"{e['float_bytes'] / 2**20:.1f}",
            f"{e['quantized_bytes'] / 2**20:.1f} ({e['quantized_bytes'] / e['float_bytes']:.3f})",
            f"{e['quantized_kernel_layers']} / {e['kernel_layers']}",
            f"{e['activation_quantizers']} / {e['activation_quantizers'] + e['float_activation_quantizers']}",
            _float_summary(e),
        ]
        for e in result["entries"]
    ]
    header = ["model", "params", "convert s", "float MiB", "W4/A4 MiB (ratio)", "kernels quantized", "inputs quantized",
              "kept float"]
    return "\n".join(
        [
            "## keras.applications coverage (data-free W4/A4)",
            "",
            f"Command: `python benchmarks/applications.py --json benchmarks/applications.json`. {result['setting']}. "
            "Sizes are the variables' payload (element count times item size). `kernels quantized` counts the "
            "layers holding a kernel; `inputs quantized` counts the activation quantizers that got data-free "
            "statistics (the others need calibration data); `kept float` lists every layer the report keeps "
            "float, with its reason (layers without a kernel, such as LayerNormalization, included). Times are "
            "one conversion on the shared 2-core development machine (other jobs running): upper bounds.",
            "",
            common.markdown_table(header, rows),
        ]
    )


def plot(result, folder):
    return []


if __name__ == "__main__":
    common.main(sys.modules[__name__])

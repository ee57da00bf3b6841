"""`kpq inspect`: what conversion would do to a model, or what an export holds."""

import json
import os

import click

import keras_powerquant as kpq
from keras_powerquant.cli.common import ACTIVATION_BITS
from keras_powerquant.cli.common import BITS
from keras_powerquant.cli.common import DECODING
from keras_powerquant.cli.common import format_bytes
from keras_powerquant.cli.common import handle_errors
from keras_powerquant.errors import ModelLoadError


def _converted_layers_table(loaded):
    from keras_powerquant.layers import PowerQuantActivation
    from keras_powerquant.layers import QuantizedKernelLayer

    rows = []
    for layer in loaded._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, QuantizedKernelLayer):
            rows.append({"layer": layer.name, "class": type(layer).__name__, **layer.quantizer.get_config()})
        elif isinstance(layer, PowerQuantActivation):
            rows.append({"layer": layer.name, "class": type(layer).__name__, "activation": layer.activation,
                         **layer.quantizer.get_config()})
    return rows


@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--wbits", type=BITS, default=4, show_default=True, help="Weight bit width to plan for.")
@click.option("--abits", type=ACTIVATION_BITS, default="4", show_default=True,
              help="Activation bit width to plan for, or 'float' (weights only).")
@click.option("--quantize-first-last", is_flag=True, help="Plan the first and last layers at --wbits/--abits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@handle_errors
def inspect(model, wbits, abits, quantize_first_last, as_json):
    """Show what converting MODEL would do, or how a converted MODEL is quantized.

    For an original .h5/.keras model: a dry run listing what would be
    folded, quantized and kept float, and why. For a converted .keras model
    or an export folder: its quantization metadata.
    """
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        _inspect_export(model, as_json)
        return
    loaded = kpq.load_model(model)
    converted = _converted_layers_table(loaded)
    if converted:
        if as_json:
            click.echo(json.dumps({"model": loaded.name, "quantized_layers": converted}, indent=2))
            return
        click.echo(f"Converted model '{loaded.name}': {len(converted)} PowerQuant layers")
        for row in converted:
            details = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("layer", "class"))
            click.echo(f"  {row['layer']:<32} {row['class']:<26} {details}")
        return
    report = kpq.inspect_model(loaded, wbits, abits, quantize_first_last)
    if as_json:
        click.echo(report.to_json())
        return
    click.echo(report.summary())
    click.echo(f"Export (kpq convert): {DECODING['load']}; --decode-weights call decodes on every call.")


def _inspect_export(folder, as_json):
    from keras_powerquant.export import existing_versions
    from keras_powerquant.export import REPORT_FILE

    versions = existing_versions(folder)
    if versions:
        version_dir, version = os.path.join(folder, str(versions[-1])), versions[-1]
    else:  # a version folder itself
        version_dir, version = folder, os.path.basename(os.path.normpath(folder))
    report_path = os.path.join(version_dir, REPORT_FILE)
    if not os.path.isfile(report_path):
        raise ModelLoadError(
            f"'{folder}' is neither a model nor a kpq export folder (no <version>/{REPORT_FILE})."
        )
    with open(report_path, encoding="utf-8") as file:
        metadata = json.load(file)
    if as_json:
        click.echo(json.dumps(metadata, indent=2))
        return
    click.echo(f"Export {os.path.dirname(os.path.normpath(version_dir))}, version {version} ({report_path})")
    if metadata.get("report"):
        click.echo(kpq.ConversionReport.from_dict(metadata["report"]).summary())
    sizes = metadata.get("sizes", {})
    if "variable_ratio" in sizes:
        click.echo(
            f"Weights: {format_bytes(sizes['float_variable_bytes'])} float -> "
            f"{format_bytes(sizes['variable_bytes'])} quantized ({sizes['variable_ratio']:.3f}x)"
        )
    if "serving" in metadata:
        serving = metadata["serving"]
        click.echo(f"Serving: {DECODING[serving['decode_weights']]}")
        # Exports written before 0.2 do not record their warm-up requests.
        if "warmup_requests" in serving:
            click.echo(f"Warm-up requests: {serving['warmup_requests']}")
    signature = metadata.get("signature", {})
    for key, name in signature.get("input_names", {}).items():
        click.echo(f"Signature input '{key}': model input '{name}', shape {signature['inputs'][key]}")
    for key, name in signature.get("output_names", {}).items():
        click.echo(f"Signature output '{key}': model output '{name}'")
    click.echo("Versions: " + ", ".join(f"{k} {v}" for k, v in metadata.get("versions", {}).items()))

"""`kpq convert`: convert a Keras model and export it for TF Serving."""

import json
import os
import time

import click
from click.core import ParameterSource

import keras_powerquant as kpq
from keras_powerquant.cli.common import ACTIVATION_BITS
from keras_powerquant.cli.common import BITS
from keras_powerquant.cli.common import DECODING
from keras_powerquant.cli.common import format_bytes
from keras_powerquant.cli.common import handle_errors
from keras_powerquant.cli.common import Progress
from keras_powerquant.cli.common import synthetic_data
from keras_powerquant.errors import CalibrationDataError
from keras_powerquant.errors import ExportError
from keras_powerquant.errors import PowerQuantError
from keras_powerquant.limits import DECODE_WEIGHTS
from keras_powerquant.limits import DEFAULT_NUM_SAMPLES
from keras_powerquant.limits import DEFAULT_REFINE_SAMPLES
from keras_powerquant.limits import MAX_WARMUP_REQUESTS
from keras_powerquant.limits import ROUNDING_ITERATIONS


def _load_calibration(path, key):
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"Cannot read calibration data '{path}': {exc}") from exc
    if isinstance(data, np.ndarray):
        return data
    names = list(data.files)
    if key is None:
        if len(names) != 1 and "x" not in names:
            raise CalibrationDataError(
                f"'{path}' holds arrays {names}; choose one with --calibration-key."
            )
        key = "x" if "x" in names else names[0]
    if key not in names:
        raise CalibrationDataError(f"'{path}' has no array '{key}'; it holds {names}.")
    return data[key]


def _config_file(path):
    """The options of a --config file: a `ConversionConfig.get_config()` as JSON, or an export's report."""
    from keras_powerquant.config import ConversionConfig

    try:
        with open(path, encoding="utf-8") as file:
            options = json.load(file)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read '{path}' as JSON: {exc}", param_hint="--config") from None
    if isinstance(options, dict) and isinstance(options.get("report"), dict):
        # An export's kpq-report.json: its options are a config's, with what conversion resolved.
        fields = ConversionConfig().get_config()
        options = {name: value for name, value in options["report"].get("options", {}).items() if name in fields}
    if not isinstance(options, dict):
        raise click.BadParameter(f"'{path}' must hold a JSON object of conversion options.", param_hint="--config")
    return options


def _conversion_config(options, calibrated, labelled):
    """The `ConversionConfig` of `kpq convert`'s options, checked against the data given; usage errors for bad ones."""
    from keras_powerquant.config import ConversionConfig

    try:
        config = ConversionConfig.from_config(options)
        config.check_data(calibrated, labelled)
    except ValueError as exc:
        raise click.UsageError(str(exc).replace("`calibration_data`", "--calibration-data")) from None
    return config


def _refine_steps(refine):
    """`--refine`'s value as `ConversionConfig(refine=...)` takes it."""
    if refine is None:
        return False
    return True if refine == "recommended" else [name.strip() for name in refine.split(",") if name.strip()]


def _target_size(text):
    """`--target-size`: an integer number of bytes, or a fraction of the float size."""
    if text is None:
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise click.BadParameter(
            f"expected a number of bytes or a fraction of the float size; got {text!r}.", param_hint="--target-size"
        ) from None




class _VersionType(click.ParamType):
    """A version number, or "next"; its range is checked by the command, which imports the exporter."""

    name = "N|next"

    def convert(self, value, param, context):
        if isinstance(value, int) or value == "next":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not an integer or 'next'.", param, context)


def _float_parts(report):
    """One line per layer or activation the conversion left in float, with the reason."""
    for layer in report.float_layers:
        yield f"layer '{layer.name}' ({layer.class_name}) kept float: {layer.reason}"
    for activation in report.activations:
        if activation.status != "quantized":
            yield f"activation '{activation.name}' kept float: {activation.reason}"
    for layer in report.quantized_layers:
        if layer.nested_in is not None and layer.input_reason:
            yield f"layer '{layer.name}' ({layer.class_name}): input kept float: {layer.input_reason}"
    yield from report.warnings




@click.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Export folder (TF Serving base path).")
@click.option("--wbits", type=BITS, default=4, show_default=True, help="Weight bit width.")
@click.option("--abits", type=ACTIVATION_BITS, default="4", show_default=True,
              help="Activation bit width, or 'float' to quantize the weights only.")
@click.option(
    "--method",
    type=click.Choice(["powerquant", "uniform"]),
    default="powerquant",
    show_default=True,
    help="Fitted power exponents, or a = 1 (the uniform baseline).",
)
@click.option(
    "--calibration-data",
    help="Model inputs (.npy, or .npz with --calibration-key) to fit activation ranges on, or "
    "'synthetic' to generate them from the model (see `kpq synthesize`); data-free (BatchNorm "
    "statistics) without it.",
)
@click.option("--calibration-key", help="Array name inside a calibration .npz [default: x].")
@click.option("--synthetic-samples", type=click.IntRange(min=1),
              help=f"Inputs to generate with --calibration-data synthetic [default: {DEFAULT_NUM_SAMPLES}].")
@click.option("--input-range", type=(float, float), metavar="LOW HIGH",
              help="Range of the model's inputs, for --calibration-data synthetic (e.g. 0 255 for raw pixels).")
@click.option("--scope", type=click.Choice(["layer", "network"]), default="layer", show_default=True,
              help="One exponent per layer, or one shared by all layers.")
@click.option("--quantize-first-last", is_flag=True,
              help="Quantize the first and last layers at --wbits/--abits too (default: 8 bits).")
@click.option("--fast-activations/--continuous-activations", default=True, show_default=True,
              help="Activation exponents among 1, 1/2, 1/4 (square roots and squares at inference), or "
              "fitted anywhere (two exp/log pairs per activation).")
@click.option("--weight-clipping/--no-weight-clipping", default=None,
              help="Fit a weight clip fraction per layer jointly with its exponent [default: as kpq.convert].")
@click.option("--bias-correction", type=click.Choice(["auto", "analytic", "empirical", "off"]), default="auto",
              show_default=True,
              help="Subtract each layer's mean output shift from its bias: auto = empirical (measured) with "
              "real --calibration-data, analytic (BatchNorm statistics) without or with synthetic data.")
@click.option(
    "--refine",
    is_flag=False,
    flag_value="recommended",
    default=None,
    metavar="[STEPS]",
    help="Loss-aware refinement on the calibration data after the per-layer fit: alone, the recommended "
    "steps (grid, granularity, lapq, gptq); or comma-separated step names (also: rounding, learned rounding).",
)
@click.option("--calibration-labels", type=click.Path(exists=True, dir_okay=False),
              help="Integer labels of the calibration samples (.npy, or .npz array 'y'): refinement minimises "
              "cross-entropy instead of the KL divergence to the float model.")
@click.option("--target-size", metavar="SIZE",
              help="Mixed precision: weight bytes of the converted model (an integer), or a fraction "
              "of the float model's (e.g. 0.15). Needs --calibration-data.")
@click.option("--mean-bits", type=click.FloatRange(2, 8), help="Mixed precision: mean kernel bits per weight.")
@click.option("--refine-samples", type=click.IntRange(min=1), default=DEFAULT_REFINE_SAMPLES, show_default=True,
              help="Calibration samples refinement evaluates the network on.")
@click.option("--refine-evaluations", type=click.IntRange(min=0),
              help="Network evaluations LAPQ's Powell search may spend, with every grid and granularity candidate "
              "tried. Default: the search steps share a budget scaled to the model's size (a few dozen "
              "evaluations on a ResNet-50, every candidate on CIFAR-size models).")
@click.option("--rounding-iterations", type=click.IntRange(min=0), default=ROUNDING_ITERATIONS, show_default=True,
              help="Gradient steps per layer of learned rounding (the refinement step 'rounding'); "
              "its time grows linearly with them.")
@click.option("--data-free-fallback", type=click.IntRange(min=0), metavar="STEPS",
              help="Without --calibration-data: fit the activations whose data-free statistics are missing or "
              "more than STEPS linear layers and merges from a BatchNorm on a short synthetic run.")
@click.option("--version", "version", type=_VersionType(), default=1, show_default=True,
              help="Version to write, or 'next' for the one after the highest in OUT.")
@click.option("--format", "output_format", type=click.Choice(["savedmodel", "keras", "both"]), default="savedmodel",
              show_default=True, help="In the version folder: a SavedModel, a .keras file, or both.")
@click.option("--overwrite", is_flag=True, help="Replace this version if it exists.")
@click.option("--decode-weights", type=click.Choice(DECODE_WEIGHTS), default="load", show_default=True,
              help="When the SavedModel decodes its weight codes: once at load (float kernels in serving "
              "memory, float speed) or on every call (codes only in memory). The files hold codes either way.")
@click.option("--warmup", type=click.IntRange(0, MAX_WARMUP_REQUESTS), default=0, metavar="N",
              help="Write N TF Serving warm-up requests into the version (assets.extra/), one example each, "
              "from --calibration-data (a file) or zeros.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Conversion options as JSON: a kpq.ConversionConfig's get_config(), or an export's "
              "kpq-report.json (to convert as that version was). Options given on the command line override it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@handle_errors
def convert(model, out, wbits, abits, method, calibration_data, calibration_key, synthetic_samples, input_range,
            scope, quantize_first_last, fast_activations, weight_clipping, bias_correction, refine, calibration_labels,
            target_size, mean_bits, refine_samples, refine_evaluations, rounding_iterations, data_free_fallback,
            version, output_format, overwrite, decode_weights, warmup, config_file, as_json):
    """Convert MODEL (.h5 or .keras) to PowerQuant and export it to OUT.

    Writes the folder OUT/<version>/: a TF Serving SavedModel with integer
    weights and kpq-report.json; with --format keras/both also
    kpq-model.keras. The version appears whole or not at all, even if the
    run fails or is killed; an existing version is kept unless --overwrite
    is given, and replaced as a whole if it is.
    """
    from keras_powerquant.export import check_export_dir
    from keras_powerquant.export import check_exportable
    from keras_powerquant.export import check_version

    started = time.perf_counter()
    progress = Progress()
    if bias_correction == "empirical" and not calibration_data:
        raise click.UsageError("--bias-correction empirical needs --calibration-data.")
    if not out:
        raise click.BadParameter("must not be empty.", param_hint="'-o' / '--output'")
    if version == "next" and overwrite:
        raise click.BadParameter("--overwrite needs the version to replace, not 'next'.", param_hint="'--version'")
    if warmup and output_format == "keras":
        raise click.BadParameter("warm-up requests go into the SavedModel, which --format keras does not write.",
                                 param_hint="--warmup")
    try:
        version = None if version == "next" else check_version(version)
    except ExportError as exc:
        raise click.BadParameter(str(exc), param_hint="'--version'") from None
    check_export_dir(out)
    if version is not None and os.path.lexists(os.path.join(out, str(version))) and not overwrite:
        raise ExportError(
            f"Version {version} already exists in '{out}'; "
            "use --overwrite to replace it, or --version to write another (--version next: the next free one)."
        )
    synthetic = calibration_data == "synthetic"
    if (synthetic_samples is not None or input_range is not None) and not synthetic:
        raise click.UsageError("--synthetic-samples and --input-range need --calibration-data synthetic.")
    if calibration_data and not synthetic and not os.path.isfile(calibration_data):
        raise click.BadParameter(f"'{calibration_data}' is not a file.", param_hint="--calibration-data")
    flags = {
        "wbits": wbits,
        "abits": abits,
        "method": method,
        "scope": scope,
        "quantize_first_last": quantize_first_last,
        "fast_activations": fast_activations,
        "weight_clipping": weight_clipping,
        "bias_correction": {"auto": True, "off": False}.get(bias_correction, bias_correction),
        "refine": _refine_steps(refine),
        "target_size": _target_size(target_size),
        "mean_bits": mean_bits,
        "refine_samples": refine_samples,
        "refine_evaluations": refine_evaluations,
        "rounding_iterations": rounding_iterations,
        "data_free_fallback": data_free_fallback,
    }
    # Options left at their defaults are ConversionConfig's (the same values) or the --config file's.
    context = click.get_current_context()
    given = {
        name: value for name, value in flags.items() if context.get_parameter_source(name) != ParameterSource.DEFAULT
    }
    options = {**(_config_file(config_file) if config_file else {}), **given}
    config = _conversion_config(options, bool(calibration_data), calibration_labels is not None)
    labels = _load_calibration(calibration_labels, "y") if calibration_labels else None
    progress.message(f"Loading {model}")
    original = kpq.load_model(model)
    check_exportable(original, output_format)
    if synthetic:
        calibration = synthetic_data(synthetic_samples, input_range=input_range)
        mode = f"calibrated on {calibration.num_samples} synthetic inputs"
    else:
        calibration = _load_calibration(calibration_data, calibration_key) if calibration_data else None
        mode = "calibrated" if calibration is not None else "data-free"
    activation_bits = "float" if config.abits is None else config.abits
    progress.message(f"Converting: {config.method}, W{config.wbits}/A{activation_bits}, {mode}")
    try:
        quantized, report = kpq.convert(
            original, config=config, calibration_data=calibration, calibration_labels=labels, progress=progress
        )
    except ValueError as exc:
        if isinstance(exc, PowerQuantError):
            raise
        raise click.UsageError(str(exc)) from None
    for warning in _float_parts(report):
        progress.message(f"Warning: {warning}")
    progress.message(f"Exporting version {version or 'next'} to {out}")
    result = kpq.export_model(
        quantized,
        out,
        version,
        formats=output_format,
        report=report,
        float_model=original,
        overwrite=overwrite,
        decode_weights=decode_weights,
        warmup=warmup,
        warmup_data=None if synthetic else calibration,
    )
    with open(result.report_path, encoding="utf-8") as file:
        metadata = json.load(file)
    elapsed = time.perf_counter() - started
    if as_json:
        metadata["paths"] = {
            "saved_model": result.saved_model_dir,
            "keras": result.keras_path,
            "report": result.report_path,
        }
        metadata["seconds_total"] = elapsed
        click.echo(json.dumps(metadata, indent=2))
        return
    sizes = metadata["sizes"]
    click.echo(report.summary())
    click.echo("")
    click.echo(
        f"Weights: {format_bytes(sizes['float_variable_bytes'])} float -> "
        f"{format_bytes(sizes['variable_bytes'])} quantized ({sizes['variable_ratio']:.3f}x)"
    )
    written = (("SavedModel", result.saved_model_dir), ("Keras", result.keras_path), ("Report", result.report_path))
    for label, path in written:
        if path:
            click.echo(f"{label}: {path}")
    if result.saved_model_dir:
        click.echo(f"Serving: {DECODING[decode_weights]}")
    if warmup:
        from keras_powerquant.warmup import WARMUP_FILE

        click.echo(f"Warm-up requests: {warmup} in {os.path.join(result.saved_model_dir, WARMUP_FILE)}")
    click.echo(f"Done in {elapsed:.1f} s.")

"""The `kpq` command line: convert, inspect and evaluate Keras models with PowerQuant.

Exit status: 0 on success, 2 on usage errors, 1 on any other error, which
is reported in one line on stderr (`kpq --debug ...` shows the traceback).
Progress goes to stderr; results (tables, `--json`) go to stdout.

Only click and the package's plain-Python modules are imported here, so
`kpq --help` answers at once; TensorFlow is imported when a command runs,
without its start-up log lines unless `--verbose` or `--debug` is given.
"""

import functools
import json
import os
import sys
import time

import click
from click.core import ParameterSource

import keras_powerquant as kpq
from keras_powerquant.cli.startup import import_tensorflow
from keras_powerquant.errors import CalibrationDataError
from keras_powerquant.errors import EvaluationDataError
from keras_powerquant.errors import ExportError
from keras_powerquant.errors import ModelLoadError
from keras_powerquant.errors import PowerQuantError
from keras_powerquant.limits import DECODE_WEIGHTS
from keras_powerquant.limits import DEFAULT_MAX_EVALUATIONS
from keras_powerquant.limits import DEFAULT_NUM_SAMPLES
from keras_powerquant.limits import DEFAULT_REFINE_SAMPLES
from keras_powerquant.limits import DEFAULT_STEPS
from keras_powerquant.limits import MAX_BITS
from keras_powerquant.limits import MAX_WARMUP_REQUESTS
from keras_powerquant.limits import MIN_BITS
from keras_powerquant.limits import ROUNDING_ITERATIONS

BITS = click.IntRange(MIN_BITS, MAX_BITS)


class _ActivationBits(click.ParamType):
    """An activation bit width, or "float" (None) for weight-only quantization."""

    name = "BITS|float"

    def convert(self, value, param, context):
        if value is None or (isinstance(value, str) and value.lower() == "float"):
            return None
        return BITS.convert(value, param, context)


ACTIVATION_BITS = _ActivationBits()


def _handle_errors(command):
    """Imports TensorFlow, then runs the command; library errors become one-line messages, exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = click.get_current_context().obj or {}
        try:
            import_tensorflow(show_logs=options.get("verbose") or options.get("debug"))
            return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if options.get("debug"):
                raise
            # One line: the first of the message (`kpq --debug` shows it all).
            text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            if isinstance(exc, (PowerQuantError, ValueError, OSError)):
                message = text
            else:
                message = f"unexpected {type(exc).__name__}: {text} (run `kpq --debug ...` for the traceback)"
            raise click.ClickException(message) from None

    return wrapper


class _Progress:
    """Stage-by-stage progress on stderr, with done/total and the time left.

    On a terminal one line per stage is rewritten in place. Otherwise (a log,
    a pipe) a line is printed at the stage's first report, then at most every
    `LOG_EVERY` seconds, and when it completes, each with its estimate.
    """

    LOG_EVERY = 10.0

    def __init__(self):
        from keras_powerquant.progress import StageClock

        self.interactive = sys.stderr.isatty()
        self._clock = StageClock()
        self._stage = None
        self._logged = 0.0

    def message(self, text):
        self._end_line()
        click.echo(text, err=True)

    def __call__(self, stage, done, total):
        from keras_powerquant.progress import format_seconds

        elapsed, eta = self._clock.update(stage, done, total)
        first = stage != self._stage
        if first:
            self._end_line()
            self._stage = stage
        count = f"{done}/{total}" if total else str(done)
        if total and done >= total:
            timing = f" in {format_seconds(elapsed)}"
        elif eta is not None:
            timing = f", {format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}"
        else:
            timing = f", {format_seconds(elapsed)} elapsed"
        line = f"  {stage}: {count}{timing}"
        if self.interactive:
            click.echo(f"\r{line}\x1b[K", err=True, nl=False)
        elif first or (total and done >= total) or elapsed - self._logged >= self.LOG_EVERY:
            self._logged = elapsed
            click.echo(line, err=True)

    def _end_line(self):
        if self.interactive and self._stage is not None:
            click.echo(err=True)
        self._stage = None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kpq.__version__, prog_name="kpq")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (and TensorFlow's log lines).")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's start-up log lines (hidden by default).")
@click.pass_context
def main(context, debug, verbose):
    """Post-training PowerQuant quantization for Keras models.

    \b
    Typical use:
      kpq inspect model.h5
      kpq convert model.h5 -o export/ --wbits 4 --abits 4
      kpq evaluate model.h5 export/ --data test.npz
    """
    context.ensure_object(dict).update(debug=debug, verbose=verbose)


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


def _synthetic_data(num_samples, **options):
    try:
        return kpq.SyntheticData(num_samples=num_samples or DEFAULT_NUM_SAMPLES, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


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


def _format_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


@main.command()
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
              help="Subtract each layer's mean output shift from its bias: auto = empirical with "
              "--calibration-data, analytic (BatchNorm statistics) without.")
@click.option(
    "--refine",
    is_flag=False,
    flag_value="recommended",
    default=None,
    metavar="[STEPS]",
    help="Loss-aware refinement on the calibration data after the per-layer fit: alone, the recommended "
    "steps (grid, granularity, lapq, rounding); or comma-separated step names (also: gptq, second-order rounding).",
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
@click.option("--refine-evaluations", type=click.IntRange(min=0), default=DEFAULT_MAX_EVALUATIONS, show_default=True,
              help="Network evaluations LAPQ's Powell search may spend.")
@click.option("--rounding-iterations", type=click.IntRange(min=0), default=ROUNDING_ITERATIONS, show_default=True,
              help="Gradient steps per layer of learned rounding (the refinement step 'rounding'); "
              "its time grows linearly with them.")
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
@_handle_errors
def convert(model, out, wbits, abits, method, calibration_data, calibration_key, synthetic_samples, input_range,
            scope, quantize_first_last, fast_activations, weight_clipping, bias_correction, refine, calibration_labels,
            target_size, mean_bits, refine_samples, refine_evaluations, rounding_iterations, version, output_format,
            overwrite, decode_weights, warmup, config_file, as_json):
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
    progress = _Progress()
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
        calibration = _synthetic_data(synthetic_samples, input_range=input_range)
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
        f"Weights: {_format_bytes(sizes['float_variable_bytes'])} float -> "
        f"{_format_bytes(sizes['variable_bytes'])} quantized ({sizes['variable_ratio']:.3f}x)"
    )
    written = (("SavedModel", result.saved_model_dir), ("Keras", result.keras_path), ("Report", result.report_path))
    for label, path in written:
        if path:
            click.echo(f"{label}: {path}")
    if result.saved_model_dir:
        click.echo(f"Serving: {_DECODING[decode_weights]}")
    if warmup:
        from keras_powerquant.warmup import WARMUP_FILE

        click.echo(f"Warm-up requests: {warmup} in {os.path.join(result.saved_model_dir, WARMUP_FILE)}")
    click.echo(f"Done in {elapsed:.1f} s.")


_DECODING = {
    "load": "weight codes decoded once when the SavedModel loads (float kernels in memory)",
    "call": "weight codes decoded on every call (codes only in memory)",
}


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


@main.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("--wbits", type=BITS, default=4, show_default=True, help="Weight bit width to plan for.")
@click.option("--abits", type=ACTIVATION_BITS, default="4", show_default=True,
              help="Activation bit width to plan for, or 'float' (weights only).")
@click.option("--quantize-first-last", is_flag=True, help="Plan the first and last layers at --wbits/--abits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@_handle_errors
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
    click.echo(f"Export (kpq convert): {_DECODING['load']}; --decode-weights call decodes on every call.")


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
            f"Weights: {_format_bytes(sizes['float_variable_bytes'])} float -> "
            f"{_format_bytes(sizes['variable_bytes'])} quantized ({sizes['variable_ratio']:.3f}x)"
        )
    if "serving" in metadata:
        serving = metadata["serving"]
        click.echo(f"Serving: {_DECODING[serving['decode_weights']]}")
        # Exports written before 0.2 do not record their warm-up requests.
        if "warmup_requests" in serving:
            click.echo(f"Warm-up requests: {serving['warmup_requests']}")
    signature = metadata.get("signature", {})
    for key, name in signature.get("input_names", {}).items():
        click.echo(f"Signature input '{key}': model input '{name}', shape {signature['inputs'][key]}")
    for key, name in signature.get("output_names", {}).items():
        click.echo(f"Signature output '{key}': model output '{name}'")
    click.echo("Versions: " + ", ".join(f"{k} {v}" for k, v in metadata.get("versions", {}).items()))


def _check_scale(context, param, value):
    import math

    if not math.isfinite(value) or value == 0:
        raise click.BadParameter(f"must be a finite, non-zero number; got {value}.")
    return value


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help=".npz with images and labels.")
@click.option("--x-key", default="x", show_default=True, help="Array of inputs in --data.")
@click.option("--y-key", default="y", show_default=True,
              help="Array of labels in --data: class indices, or one-hot rows.")
@click.option("--scale", type=float, default=1.0, show_default=True, callback=_check_scale,
              help="Multiply inputs by this (e.g. 0.00392 for x/255); finite, non-zero.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per prediction batch.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@_handle_errors
def evaluate(models, data, x_key, y_key, scale, batch_size, as_json):
    """Top-1/top-5 accuracy of MODELS (.h5, .keras, SavedModel or export folders) on the same images.

    Labels are class indices or one-hot rows. The data, and every model
    against them, are checked before any model runs.
    """
    import numpy as np

    from keras_powerquant.evaluation import check_images
    from keras_powerquant.evaluation import check_predictor
    from keras_powerquant.evaluation import class_labels
    from keras_powerquant.evaluation import load_predictor
    from keras_powerquant.evaluation import top_k_accuracy

    try:
        arrays = np.load(data, allow_pickle=False)
        if not hasattr(arrays, "files"):
            raise ValueError("it holds a single array, not named arrays")
        missing = [key for key in (x_key, y_key) if key not in arrays.files]
        if missing:
            raise click.BadParameter(
                f"'{data}' has no array '{missing[0]}'; it holds {list(arrays.files)}.",
                param_hint="--x-key/--y-key",
            )
        x, y = arrays[x_key], arrays[y_key]
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Cannot read '{data}' as an .npz archive: {exc}") from exc
    # The data, then every model against them, are checked before any model runs.
    predictors = [load_predictor(path) for path in models]
    try:
        x = check_images(x)
        labels, classes = class_labels(y, len(x))
        with np.errstate(over="ignore"):
            scaled = x * np.float32(scale)
        try:
            x = check_images(scaled)
        except EvaluationDataError as exc:
            raise EvaluationDataError(f"{exc} after --scale {scale}") from None
        for predictor in predictors:
            check_predictor(predictor, x.shape, labels, classes)
    except EvaluationDataError as exc:
        raise EvaluationDataError(f"'{data}': {exc}") from None
    results = []
    for predictor in predictors:
        click.echo(f"Evaluating {predictor.source}", err=True)
        results.append({"model": predictor.source, **top_k_accuracy(predictor, x, labels, batch_size)})
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    width = max(len(r["model"]) for r in results)
    click.echo(f"{'model':<{width}}  {'top-1':>7}  {'top-5':>7}  images")
    for r in results:
        click.echo(f"{r['model']:<{width}}  {100 * r['top1']:>6.2f}%  {100 * r['top5']:>6.2f}%  {r['images']}")


@main.command()
@click.argument("model", type=click.Path(exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="File to write: .npy (one input), or .npz keyed by input name (any number of inputs).")
@click.option("-n", "--num-samples", type=click.IntRange(min=1), default=DEFAULT_NUM_SAMPLES, show_default=True,
              help="Inputs to generate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--steps", type=click.IntRange(min=0), default=DEFAULT_STEPS, show_default=True,
              help="Adam steps per batch.")
@click.option("--input-range", type=(float, float), metavar="LOW HIGH",
              help="Range of the model's inputs (e.g. 0 255 for raw pixels, 0 1 for x/255); unbounded without it.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_handle_errors
def synthesize(model, out, num_samples, seed, steps, input_range, overwrite):
    """Generate calibration inputs for MODEL from its BatchNorm statistics and classifier head.

    Random inputs are optimised until every BatchNorm layer sees the mean and
    standard deviation it recorded in training, and (for a classifier) each
    input is classified as its target class, classes spread evenly. Use the
    result with `kpq convert --calibration-data OUT`, or `kpq convert
    --calibration-data synthetic` to generate and use them in one go.
    """
    import numpy as np

    suffix = os.path.splitext(out)[1].lower()
    if suffix not in (".npy", ".npz"):
        raise click.BadParameter(f"'{out}' must end in .npy or .npz.", param_hint="-o/--output")
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"'{out}' already exists; use --overwrite to replace it.")
    options = _synthetic_data(num_samples, seed=seed, steps=steps, input_range=input_range)
    progress = _Progress()
    progress.message(f"Loading {model}")
    original = kpq.load_model(model)
    if suffix == ".npy" and len(original.inputs) != 1:
        raise click.BadParameter(
            f"the model has {len(original.inputs)} inputs; write them to a .npz file.", param_hint="-o/--output"
        )
    progress.message(f"Synthesizing {num_samples} inputs, {steps} steps, seed {seed}")
    result = options.generate(original, progress=progress)
    progress.message(f"Writing {out}")
    folder = os.path.dirname(os.path.abspath(out))
    temporary = os.path.join(folder, f".{os.path.basename(out)}.kpq-tmp{suffix}")
    try:
        with open(temporary, "wb") as file:
            if suffix == ".npy":
                np.save(file, result.inputs[0])
            else:
                np.savez(file, **{t.name: x for t, x in zip(original.inputs, result.inputs)})
        if os.path.exists(out) and not overwrite:
            raise ExportError(f"'{out}' appeared while synthesizing; use --overwrite to replace it.")
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    for note in result.notes:
        click.echo(note)
    losses = [f"BatchNorm loss {result.batchnorm_loss:.4g}" if result.batchnorm_loss is not None else None,
              f"class loss {result.class_loss:.4g}" if result.class_loss is not None else None]
    shapes = ", ".join(f"{x.shape} {x.dtype}" for x in result.inputs)
    click.echo(f"Wrote {out}: {shapes}; {'; '.join(loss for loss in losses if loss)}; {result.seconds:.1f} s.")

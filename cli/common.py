"""What every `kpq` command shares: bit-width types, error handling and progress lines.

Only click and the package's plain-Python modules are imported here, so
`kpq --help` answers at once; TensorFlow is imported when a command runs,
without its start-up log lines unless `--verbose` or `--debug` is given.
"""

import functools
import sys

import click

import keras_powerquant as kpq
from keras_powerquant.cli.startup import import_tensorflow
from keras_powerquant.errors import PowerQuantError
from keras_powerquant.limits import DEFAULT_NUM_SAMPLES
from keras_powerquant.limits import MAX_BITS
from keras_powerquant.limits import MIN_BITS

BITS = click.IntRange(MIN_BITS, MAX_BITS)


class _ActivationBits(click.ParamType):
    """An activation bit width, or "float" (None) for weight-only quantization."""

    name = "BITS|float"

    def convert(self, value, param, context):
        if value is None or (isinstance(value, str) and value.lower() == "float"):
            return None
        return BITS.convert(value, param, context)


ACTIVATION_BITS = _ActivationBits()


def handle_errors(command):
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


class Progress:
    """Stage-by-stage progress on stderr, with done/total and the time left (`ProgressPrinter`).

    On a terminal one line per stage is rewritten in place; in a log or a
    pipe a line is printed at a stage's first report, at most every 10 s
    after, and when it completes.
    """

    def __init__(self):
        from keras_powerquant.progress import ProgressPrinter

        self._printer = ProgressPrinter(sys.stderr, interactive=sys.stderr.isatty())

    def message(self, text):
        self._printer.end_line()
        click.echo(text, err=True)

    def __call__(self, stage, done, total):
        self._printer(stage, done, total)


def format_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def synthetic_data(num_samples, **options):
    try:
        return kpq.SyntheticData(num_samples=num_samples or DEFAULT_NUM_SAMPLES, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


# What each `--decode-weights` choice keeps in memory, as `kpq` commands say it.
DECODING = {
    "load": "weight codes decoded once when the SavedModel loads (float kernels in memory)",
    "call": "weight codes decoded on every call (codes only in memory)",
}

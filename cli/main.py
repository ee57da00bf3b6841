"""The `kpq` command line: convert, inspect and evaluate Keras models with PowerQuant.

Exit status: 0 on success, 2 on usage errors, 1 on any other error, which
is reported in one line on stderr (`kpq --debug ...` shows the traceback).
Progress goes to stderr; results (tables, `--json`) go to stdout.

Only click and the package's plain-Python modules are imported here, so
`kpq --help` answers at once; TensorFlow is imported when a command runs,
without its start-up log lines unless `--verbose` or `--debug` is given.
"""

import click

import keras_powerquant as kpq
from keras_powerquant.cli.convert import convert
from keras_powerquant.cli.evaluate import evaluate
from keras_powerquant.cli.inspect import inspect
from keras_powerquant.cli.synthesize import synthesize


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


for command in (convert, inspect, evaluate, synthesize):
    main.add_command(command)

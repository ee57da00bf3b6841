"""`kpq synthesize`: synthetic calibration inputs generated from a model."""

import os

import click

import keras_powerquant as kpq
from keras_powerquant.cli.common import handle_errors
from keras_powerquant.cli.common import Progress
from keras_powerquant.cli.common import synthetic_data
from keras_powerquant.errors import ExportError
from keras_powerquant.limits import DEFAULT_NUM_SAMPLES
from keras_powerquant.limits import DEFAULT_STEPS


@click.command()
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
@handle_errors
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
    options = synthetic_data(num_samples, seed=seed, steps=steps, input_range=input_range)
    progress = Progress()
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

"""`kpq evaluate`: top-1/top-5 accuracy of models and exports on the same images."""

import json

import click

from keras_powerquant.cli.common import handle_errors
from keras_powerquant.errors import EvaluationDataError
from keras_powerquant.errors import ModelLoadError


def _check_scale(context, param, value):
    import math

    if not math.isfinite(value) or value == 0:
        raise click.BadParameter(f"must be a finite, non-zero number; got {value}.")
    return value


@click.command()
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
@handle_errors
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

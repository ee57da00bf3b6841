"""`kpq evaluate` and `top_k_accuracy` report a right accuracy or one clear error, never a wrong number."""

import numpy as np
import pytest

from keras_powerquant.errors import EvaluationDataError
from keras_powerquant.evaluation import load_predictor
from keras_powerquant.evaluation import top_k_accuracy
from tests.cli_helpers import assert_one_line_error
from tests.cli_helpers import invoke
from tests.cli_helpers import NUM_CLASSES
from tests.cli_helpers import random_images
from tests.cli_helpers import save_small_model

SCALE = 1 / 255


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(float .keras path, export folder) of the small model."""
    folder = tmp_path_factory.mktemp("models")
    _, paths = save_small_model(folder)
    result = invoke("convert", paths["keras"], "-o", folder / "export", "--wbits", "8", "--abits", "8")
    assert result.exit_code == 0, result.output
    return paths["keras"], folder / "export"


@pytest.fixture(scope="module")
def images():
    x = random_images(24, seed=5)
    y = np.random.default_rng(5).integers(0, NUM_CLASSES, len(x))
    return x, y


def _evaluate(tmp_path, *models, scale=str(SCALE), options=(), **arrays):
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    return invoke("evaluate", *models, "--data", data, "--scale", scale, "--json", *options)


def _accuracies(result):
    import json

    assert result.exit_code == 0, result.output
    return [(row["top1"], row["top5"], row["images"]) for row in json.loads(result.stdout)]


@pytest.mark.parametrize("batch_size", ["4", "128"])
def test_one_hot_labels_give_the_accuracy_of_their_class_indices(models, images, tmp_path, batch_size):
    x, y = images
    options = ("--batch-size", batch_size)
    by_index = _accuracies(_evaluate(tmp_path, *models, options=options, x=x, y=y))
    one_hot = _accuracies(_evaluate(tmp_path, *models, options=options, x=x, y=np.eye(NUM_CLASSES)[y]))
    column = _accuracies(_evaluate(tmp_path, *models, options=options, x=x, y=y[:, None]))
    assert one_hot == by_index == column
    assert all(images == len(x) for _, _, images in by_index)
    assert any(top1 > 0 for top1, _, _ in by_index)  # the labels match some predictions


@pytest.mark.parametrize(
    "labels, fragments",
    [
        (lambda y: np.full((len(y), NUM_CLASSES), 1 / NUM_CLASSES), ["must be one-hot rows", "row 0"]),
        (lambda y: np.eye(4)[y % 4], ["one-hot over 4 classes", "scores 10"]),
        (lambda y: y.reshape(len(y), 1, 1), ["Labels must have shape (24,)"]),
        (lambda y: -y - 1, ["class indices >= 0", "smallest is"]),
        (lambda y: y + NUM_CLASSES, ["labels go up to", "scores 10 classes"]),
        (lambda y: y + 0.5, ["whole numbers"]),
        (lambda y: np.where(np.arange(len(y)) == 3, np.nan, y), ["NaN or Inf"]),
        (lambda y: y[:-1], ["24 inputs but 23 labels"]),
    ],
    ids=["soft", "one-hot-classes", "rank-3", "negative", "too-large", "fraction", "nan", "count"],
)
def test_labels_that_do_not_fit_are_refused_before_any_model_runs(models, images, tmp_path, labels, fragments):
    x, y = images
    result = _evaluate(tmp_path, *models, x=x, y=labels(y))
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Evaluating" not in result.stderr
    assert_one_line_error(result.stderr, "data.npz", *fragments)


@pytest.mark.parametrize("which", [0, 1], ids=["keras", "savedmodel"])
def test_input_shape_mismatch_says_expected_and_got_before_running(models, tmp_path, which):
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3)).astype(np.uint8)
    result = _evaluate(tmp_path, models[which], x=x, y=np.zeros(6, np.int64))
    assert result.exit_code == 1, result.output
    assert "Evaluating" not in result.stderr
    line = assert_one_line_error(result.stderr, "expects inputs of shape (None, 8, 8, 3)", "shape (6, 16, 16, 3)")
    assert "Graph execution error" not in line


@pytest.mark.parametrize(
    "x, fragments",
    [
        (np.zeros((0, 8, 8, 3), np.float32), ["hold no images"]),
        (np.full((2, 8, 8, 3), np.nan, np.float32), ["384 NaN or Inf"]),
    ],
    ids=["empty", "nan"],
)
def test_inputs_without_usable_images_are_refused(models, tmp_path, x, fragments):
    result = _evaluate(tmp_path, *models, x=x, y=np.zeros(len(x), np.int64))
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "data.npz", *fragments)


@pytest.mark.parametrize("scale", ["0", "nan", "inf", "-0.0"])
def test_scale_must_be_finite_and_non_zero(models, images, tmp_path, scale):
    x, y = images
    result = _evaluate(tmp_path, models[0], scale=scale, x=x, y=y)
    assert result.exit_code == 2, result.output
    assert "--scale" in result.stderr and "finite, non-zero" in result.stderr


def test_scale_that_overflows_float32_is_refused(models, images, tmp_path):
    x, y = images
    result = _evaluate(tmp_path, models[0], scale="1e38", x=x, y=y)
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.stderr, "NaN or Inf", "--scale")


def test_library_accepts_one_hot_and_refuses_bad_labels(models, images):
    x, y = images
    predictor = load_predictor(models[1])
    x = x.astype("float32") * np.float32(SCALE)
    assert top_k_accuracy(predictor, x, np.eye(NUM_CLASSES)[y], batch_size=5) == top_k_accuracy(
        predictor, x, y, batch_size=7
    )
    with pytest.raises(EvaluationDataError, match="expects inputs of shape"):
        top_k_accuracy(predictor, x[:, :4], y)
    with pytest.raises(EvaluationDataError, match="hold no images"):
        top_k_accuracy(predictor, x[:0], y[:0])

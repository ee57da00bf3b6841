"""The pipeline's entry: user inputs checked and normalized once, before any work.

`convert` takes a model (or its path), options (positional, keyword or a
`ConversionConfig`), calibration data in the forms `Model.fit` takes or
`"synthetic"`, and labels. `make_request` checks them together and returns
one `ConversionRequest`; every stage after it reads the request and never
re-checks or re-interprets an argument.
"""

import dataclasses
from typing import Any
from typing import Callable
from typing import Optional

import keras
import numpy as np

from keras_powerquant import keras_internals
from keras_powerquant.config import ConversionConfig
from keras_powerquant.config import resolve_config
from keras_powerquant.errors import InvalidModelError
from keras_powerquant.loading import resolve_model
from keras_powerquant.refinement.data import check_labels
from keras_powerquant.refinement.data import in_memory_size
from keras_powerquant.synthesis import SyntheticData


@dataclasses.dataclass(frozen=True)
class ConversionRequest:
    """What one conversion was asked to do, checked.

    Attributes:
        model: the loaded `keras.Model` (not modified by conversion).
        config: the `ConversionConfig`.
        calibration_data: model inputs in a form `calibration_batches`
            reads, or None (data-free); never `"synthetic"`.
        synthetic: the `SyntheticData` options when the inputs are to be
            generated from the model, else None.
        labels: the calibration labels (1-D integer array) or None.
        bias_correction: the correction conversion runs ("analytic",
            "empirical" or None).
        notes: what loading repaired or assumed, for the report.
        progress: `progress(stage, done, total)` or None.
    """

    model: Any
    config: ConversionConfig
    calibration_data: Any = None
    synthetic: Optional[SyntheticData] = None
    labels: Optional[np.ndarray] = None
    bias_correction: Optional[str] = None
    notes: tuple = ()
    progress: Optional[Callable] = None

    @property
    def calibrated(self):
        """Whether the quantizers are fitted on samples (real or synthetic)."""
        return self.calibration_data is not None or self.synthetic is not None

    def reporter(self, stage):
        """`progress(done, total)` for one stage (a no-op without a progress callback)."""
        progress = self.progress
        return lambda done, total: progress(stage, done, total) if progress else None


def check_inputs(config, calibration_data, calibration_labels=None):
    """Raises ValueError for data `convert` cannot use with `config`, before any work.

    Needs no model: the `PowerQuantExport` callback checks its arguments
    with it when it is created, long before training ends.
    """
    if isinstance(calibration_data, str) and calibration_data != "synthetic":
        raise ValueError(f'`calibration_data` as a string must be "synthetic"; got {calibration_data!r}.')
    config.check_data(calibration_data is not None, calibration_labels is not None)
    if calibration_labels is not None:
        count = check_labels(calibration_labels).shape[0]
        size = in_memory_size(calibration_data)
        if size is not None and size != count:
            raise ValueError(
                f"`calibration_labels` has {count} labels for {size} calibration samples: give one per sample."
            )


def make_request(model, args, config, options, calibration_data, calibration_labels, progress):
    """Checks and normalizes `convert`'s arguments into a `ConversionRequest`.

    Raises:
        TypeError, ValueError: invalid options or data (before the model loads).
        ModelLoadError, UnsupportedModelError: a model that cannot be loaded or converted.
        InvalidModelError: weights no model can compute with.
    """
    config = resolve_config(config, args, options)
    check_inputs(config, calibration_data, calibration_labels)
    synthetic = None
    if isinstance(calibration_data, str):
        synthetic = SyntheticData()
    elif isinstance(calibration_data, SyntheticData):
        synthetic = calibration_data
    model, notes = resolve_model(model)
    check_weights(model)
    return ConversionRequest(
        model=model,
        config=config,
        calibration_data=None if synthetic is not None else calibration_data,
        synthetic=synthetic,
        labels=None if calibration_labels is None else check_labels(calibration_labels),
        bias_correction=config.bias_correction_method(
            calibration_data is not None, synthetic_with_batch_norm=synthetic is not None and _has_batch_norm(model)
        ),
        notes=tuple(notes),
        progress=progress,
    )


def _has_batch_norm(model):
    return any(isinstance(layer, keras.layers.BatchNormalization) for layer in keras_internals.all_layers(model))


def check_weights(model):
    """Raises InvalidModelError, naming the layer, for weights no model can compute with."""
    layers = keras_internals.all_layers(model)
    # Leaf layers first: a nested model's weights include its layers' weights,
    # and the message must name the layer that holds the bad weight.
    for layer in sorted(layers, key=lambda layer: isinstance(layer, keras.Model)):
        for weight in layer.weights:
            if not np.all(np.isfinite(keras.ops.convert_to_numpy(weight))):
                raise InvalidModelError(
                    f"Layer '{layer.name}' has NaN or Inf values in weight '{weight.name}': "
                    "the model cannot be quantized. Check the training run that produced it."
                )
        if isinstance(layer, keras.layers.BatchNormalization):
            variance = keras.ops.convert_to_numpy(layer.moving_variance)
            bad = variance + layer.epsilon <= 0
            if np.any(bad):
                raise InvalidModelError(
                    f"Layer '{layer.name}' has a negative moving variance in {int(np.sum(bad))} of "
                    f"{bad.size} channels (smallest {float(variance.min()):g}, epsilon {layer.epsilon:g}): "
                    "its outputs are NaN even in the float model. Check the training run that produced it."
                )

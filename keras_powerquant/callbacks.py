"""`PowerQuantExport`: convert and export a model when training ends."""

import collections.abc
import sys
import warnings

import keras
import numpy as np

from keras_powerquant.config import resolve_config
from keras_powerquant.export import DECODE_WEIGHTS
from keras_powerquant.export import export_model
from keras_powerquant.export import FORMATS
from keras_powerquant.pipeline import check_inputs
from keras_powerquant.pipeline import convert
from keras_powerquant.progress import ProgressPrinter
from keras_powerquant.synthesis import SyntheticData
from keras_powerquant.warmup import check_warmup_count


class PowerQuantExport(keras.callbacks.Callback):
    """Converts the trained model to PowerQuant and exports the next version.

    At the end of `fit`, the model (or, with `monitor`, its weights from the
    best epoch) is converted with `keras_powerquant.convert` and written to
    `export_dir/<next version>/` with its report, like `kpq convert`. The
    model being trained is left as it was.

    Every option is checked when the callback is constructed, before
    training starts: a typo found when training ends would cost the run.

    Args:
        export_dir: the TF Serving export folder; each run adds a version.
        *args, **options: the conversion options, as the arguments of
            `ConversionConfig` (`wbits`, `abits`, `method`, then keyword
            options: `scope`, `bias_correction`, `refine`, ...).
        config: a `ConversionConfig`, instead of `*args` and `**options`.
        calibration_data, calibration_labels: as in `convert`.
        monitor: optional metric name (e.g. "val_accuracy"); the weights of
            the epoch where it was best are converted. Epochs that do not
            log it (with `validation_freq > 1`) are skipped with a warning;
            if no epoch logs it, `fit` ends with a ValueError and nothing
            is exported.
        mode: "min", "max" or "auto": as Keras' `ModelCheckpoint` infers
            it, "min" for losses and the direction a Keras metric declares
            (accuracy, AUC, F1, IoU: "max"); a ValueError at the first
            epoch end when the direction is unknown (a custom metric).
        formats: "savedmodel", "keras" or "both" (see `export_model`).
        warmup: the number of TF Serving warm-up requests to write into
            the version (see `export_model`), from the calibration data
            (which must then be re-iterable: an array or a `tf.data.Dataset`,
            not a generator), or zeros without it or with synthetic data.
        decode_weights: "load" or "call" (see `export_model`).
        verbose: print each conversion stage's progress (done/total,
            elapsed time and time left, at most every 10 s) and where the
            export went.

    Attributes:
        config: the `ConversionConfig`.
        result: the `ExportResult` of the last export, or None.
        report: the `ConversionReport` of the last export, or None.
        best_epoch: the epoch whose weights were exported (with `monitor`).
    """

    def __init__(
        self,
        export_dir,
        *args,
        config=None,
        calibration_data=None,
        calibration_labels=None,
        monitor=None,
        mode="auto",
        formats="savedmodel",
        decode_weights="load",
        warmup=0,
        verbose=1,
        **options,
    ):
        super().__init__()
        self.config = resolve_config(config, args, options)
        check_inputs(self.config, calibration_data, calibration_labels)
        if formats not in FORMATS:
            raise ValueError(f"`formats` must be one of {FORMATS}; got {formats!r}.")
        check_warmup_count(warmup)
        if warmup and isinstance(calibration_data, collections.abc.Iterator):
            raise ValueError(
                "Warm-up requests are taken from the calibration data after the conversion has read it: "
                "give it as an array or a tf.data.Dataset, not an iterator or generator."
            )
        if decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"`decode_weights` must be one of {DECODE_WEIGHTS}; got {decode_weights!r}.")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"`mode` must be 'auto', 'min' or 'max'; got {mode!r}.")
        self.export_dir = export_dir
        self.calibration_data = calibration_data
        self.calibration_labels = calibration_labels
        self.monitor = monitor
        self.mode = mode
        self.formats = formats
        self.warmup = warmup
        self.decode_weights = decode_weights
        self.verbose = verbose
        self.result = self.report = self.best_epoch = None
        self._best_value = self._best_weights = None

    def on_train_begin(self, logs=None):
        self._best_value = self._best_weights = self.best_epoch = None
        self._direction = None if self.mode == "auto" else self.mode
        self._logged = set()

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            return
        logs = logs or {}
        self._logged.update(logs)
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(
                f"PowerQuantExport: '{self.monitor}' is not in the logs of epoch {epoch + 1} "
                f"({sorted(logs)}); skipping the epoch.",
                stacklevel=2,
            )
            return
        if self._direction is None:
            self._direction = _infer_direction(self.model, self.monitor)
        value = float(value)
        better = self._best_value is None or (
            value > self._best_value if self._direction == "max" else value < self._best_value
        )
        if better and np.isfinite(value):
            self._best_value, self.best_epoch = value, epoch
            self._best_weights = [np.array(w) for w in self.model.get_weights()]

    def on_train_end(self, logs=None):
        if self.monitor is not None and self.monitor not in self._logged:
            raise ValueError(
                f"PowerQuantExport monitors '{self.monitor}', which no epoch logged (logged metrics: "
                f"{sorted(self._logged)}); nothing was exported."
            )
        current = None
        if self._best_weights is not None:
            current = self.model.get_weights()
            self.model.set_weights(self._best_weights)
        try:
            quantized, self.report = convert(
                self.model,
                config=self.config,
                calibration_data=self.calibration_data,
                calibration_labels=self.calibration_labels,
                progress=ProgressPrinter(sys.stdout, prefix="PowerQuantExport: ") if self.verbose else None,
            )
            self.result = export_model(
                quantized,
                self.export_dir,
                None,
                formats=self.formats,
                decode_weights=self.decode_weights,
                report=self.report,
                float_model=self.model,
                warmup=self.warmup,
                warmup_data=_real_inputs(self.calibration_data),
            )
        finally:
            if current is not None:
                self.model.set_weights(current)
        if self.verbose:
            where = self.result.saved_model_dir or self.result.keras_path
            epoch = "" if self.best_epoch is None else f" (weights of epoch {self.best_epoch + 1})"
            print(f"PowerQuantExport: version {self.result.version} written to {where}{epoch}")


def _infer_direction(model, monitor):
    """"min" or "max" for `monitor`, as Keras' `ModelCheckpoint` infers it in mode "auto".

    Raises:
        ValueError: the direction is unknown (not a loss, and no compiled
            metric of that name declares one).
    """
    name = monitor.removeprefix("val_")
    if name == "loss" or name.endswith("_loss"):
        return "min"
    # Compiled metrics are held by containers (their `metrics`); Keras metrics
    # declare whether higher is better in `_direction` ("up" or "down").
    pending = list(getattr(model, "metrics", []))
    while pending:
        metric = pending.pop()
        pending.extend(getattr(metric, "metrics", None) or [])
        direction = getattr(metric, "_direction", None)
        if metric.name == name and direction in ("up", "down"):
            return "max" if direction == "up" else "min"
    raise ValueError(
        f"PowerQuantExport cannot tell whether '{monitor}' should be maximized or minimized; "
        "pass mode='max' or mode='min'."
    )


def _real_inputs(calibration_data):
    """The calibration data if it holds model inputs, None for synthetic data (generated inside `convert`)."""
    return None if isinstance(calibration_data, (str, SyntheticData)) else calibration_data

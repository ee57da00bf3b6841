"""Exceptions raised by keras-powerquant.

Every error the library raises on purpose derives from `PowerQuantError`, so
callers (the `kpq` CLI among them) can tell a bad input, reported with a
message meant for the user, from a bug.
"""

import re


class PowerQuantError(Exception):
    """Base class of the errors keras-powerquant raises on purpose."""


class ModelLoadError(PowerQuantError):
    """A model file or folder could not be read as a Keras model."""


class UnsupportedModelError(PowerQuantError):
    """The model is valid Keras but cannot be converted (e.g. subclassed)."""


class InvalidModelError(PowerQuantError):
    """The model's weights are unusable (NaN or Inf, for example)."""


class CalibrationDataError(PowerQuantError, ValueError):
    """Calibration data does not match the model's inputs."""


class EvaluationDataError(PowerQuantError, ValueError):
    """Evaluation inputs or labels do not fit each other or the model."""


class ExportError(PowerQuantError):
    """An export target is unusable or would overwrite an existing version."""


def op_error_reason(error):
    """The first line of a TensorFlow op error that says why, without Keras' wrapping.

    Keras wraps an op's error as "Exception encountered when calling X.call()",
    the op's message (`{{function_node ...}} reason [Op:Name]`, in bold), then
    the call's arguments: this returns "reason [Op:Name]".
    """
    text = re.sub(r"\x1b\[[0-9;]*m|\{\{function_node [^}]*\}\}", "", str(getattr(error, "message", None) or error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    wrapping = ("Exception encountered when calling", "Arguments received")
    reasons = [line for line in lines if not line.startswith(wrapping)]
    return (reasons or lines or [type(error).__name__])[0]

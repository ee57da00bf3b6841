"""The conversion pipeline above the stages: `convert` (see `pipeline.convert` for the stages)."""

from keras_powerquant.pipeline.convert import convert
from keras_powerquant.pipeline.convert import fold_batch_norms
from keras_powerquant.pipeline.convert import inspect_model
from keras_powerquant.pipeline.request import check_inputs

__all__ = ["check_inputs", "convert", "fold_batch_norms", "inspect_model"]

"""Model conversion: graph analysis, BatchNorm folding, fitting, rebuilding."""

from keras_powerquant.converter.convert import convert
from keras_powerquant.converter.convert import fold_batch_norms
from keras_powerquant.converter.convert import inspect_model

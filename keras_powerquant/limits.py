"""The limits and defaults of kpq's numeric options, in a module that imports nothing.

The library and the `kpq` command line share them; the command line declares
its options with them before anything heavy is imported.
"""

# Supported bit widths of weights and activations.
MIN_BITS = 2
MAX_BITS = 8

# TF Serving reads at most this many warm-up records
# (tensorflow_serving/servables/tensorflow/saved_model_warmup_util.h).
MAX_WARMUP_REQUESTS = 1000

# Input synthesis (keras_powerquant.synthesis): inputs generated, Adam steps per batch.
DEFAULT_NUM_SAMPLES = 32
DEFAULT_STEPS = 50

# When an exported SavedModel decodes its weight codes: once when loaded (a
# float kernel in memory, a float model's call cost) or on every call.
DECODE_WEIGHTS = ("load", "call")

# Defaults of `ConversionConfig` (keras_powerquant.config) that the modules
# doing the work share: calibration batch size for in-memory arrays, the
# calibration samples refinement evaluates on, LAPQ's evaluation budget, and
# learned rounding's gradient steps per layer.
DEFAULT_CALIBRATION_BATCH_SIZE = 32
DEFAULT_REFINE_SAMPLES = 320
# Refinement holds out every HOLDOUT_EVERY-th sample of its subsample (64 of
# the default 320) to check each step's result on samples it did not fit;
# subsamples that would hold out fewer than MIN_HOLDOUT are not split.
HOLDOUT_EVERY = 5
MIN_HOLDOUT = 8
DEFAULT_MAX_EVALUATIONS = 200
ROUNDING_ITERATIONS = 200

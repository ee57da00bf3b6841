"""Stage 7, bias correction of the built model (docs/method.md §7).

With samples (calibration or synthetic), the measured mean output shift of
each quantized layer: refinement's, when it ran (the loss it minimised
included it), else one pass of the built model (`empirical_corrections`).
Data-free, the analytic shift from the propagated statistics.
"""

from keras_powerquant.converter.bias_correction import analytic_corrections
from keras_powerquant.converter.bias_correction import apply_corrections
from keras_powerquant.converter.bias_correction import empirical_corrections
from keras_powerquant.converter.bias_correction import refined_corrections


def correct_bias(request, analysis, plan, statistics, built, refined=None):
    """Applies the request's bias correction to `built.model`; `{id(layer): BiasCorrection}`."""
    if request.bias_correction == "analytic":
        corrections = analytic_corrections(plan, statistics.propagated, built.quantized_layers)
    elif request.bias_correction == "empirical" and refined is not None:
        corrections = refined_corrections(plan, refined.bias_shifts)
    elif request.bias_correction == "empirical":
        return empirical_corrections(
            analysis.graph, plan, built.model, built.quantized_layers, statistics.kept_batches,
            statistics.float_means.means(), progress=request.reporter("bias correction"),
        )
    else:
        return {}
    apply_corrections(built.quantized_layers, corrections)
    return corrections

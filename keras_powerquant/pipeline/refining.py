"""Stage 5, refinement: the fitted plan tuned on the network loss of a calibration subsample."""

from keras_powerquant import refinement


def refine(request, analysis, statistics):
    """The `Refinement` of the fitted plan (`refinement.refine_plan`), on `statistics.reservoir`."""
    reservoir = statistics.reservoir
    labels = None if request.labels is None else refinement.subsample_labels(request.labels, reservoir)
    return refinement.refine_plan(
        analysis.graph, analysis.folds, analysis.plan, request.config, inputs=reservoir.inputs, labels=labels,
        samples=statistics.samples, budget=analysis.budget, progress=request.progress,
        bias_correction=request.bias_correction,
    )

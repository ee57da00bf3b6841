"""Stage 1, analysis: the model's graph, its BatchNorm folds and the conversion plan."""

import dataclasses
from typing import Any
from typing import Optional

from keras_powerquant import refinement
from keras_powerquant.converter import nested
from keras_powerquant.converter.folding import plan_folds
from keras_powerquant.converter.graph import FlatGraph
from keras_powerquant.converter.plan import plan_conversion


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What conversion will do to the model, before anything is fitted.

    Attributes:
        graph: the model's `FlatGraph`.
        folds: the BatchNorm folds (`plan_folds`); `unfolded` the
            BatchNorms kept, with why.
        plan: the `ConversionPlan` (layers and quantizers to fit).
        nested_plan: the kernel layers nested in layers kpq cannot rewrite.
        budget: refinement's mixed-precision budget, or None.
    """

    graph: Any
    folds: Any
    unfolded: list
    plan: Any
    nested_plan: Any
    budget: Optional[tuple] = None


def analyse(model, config, refining=False):
    """The `Analysis` of `model` (loaded) for `config` (a `ConversionConfig`).

    `refining` computes the mixed-precision budget too, so that a budget no
    bit width reaches fails here, before any data is read.
    """
    graph = FlatGraph(model)
    folds, unfolded = plan_folds(graph)
    plan = plan_conversion(
        graph, folds, config.wbits, config.abits, config.quantize_first_last, config.first_last_bits
    )
    nested_plan = nested.plan_nested(plan, config.wbits, config.abits, graph, config.quantize_first_last)
    budget = None
    if refining:
        budget = refinement.size_budget(
            plan, refinement.weight_bytes(model), config.target_size, config.mean_bits, config.per_channel,
            nested_plan.kernels,
        )
    return Analysis(graph, folds, unfolded, plan, nested_plan, budget)

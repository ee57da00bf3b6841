"""How many network evaluations the search steps may spend, scaled to the model (docs/method.md §8).

The search steps (`grid`, `granularity`, `lapq`) choose settings by
evaluating the network loss on the refinement subsample: `grid` about one
evaluation per quantized layer and activation quantizer, `granularity` one
per layer, `lapq` six plus Powell's budget. One evaluation costs about a
forward pass of the subsample, so on an ImageNet-size model their full
needs take hours on a 2-core CPU while a CIFAR-size model needs seconds.

By default (`refine_evaluations=None`) the three steps therefore share
`SEARCH_MULTIPLY_ACCUMULATES`: the evaluations they may make are that
divided by the cost of one evaluation, never fewer than
`MIN_SEARCH_EVALUATIONS`. The cost is counted in multiply-accumulates per
sample, times the samples fitted on: the quantized layers' products, plus
`ACTIVATION_VALUE_COST` for each value an activation quantizer rounds (a
CPU spends about as long on one fake-quantized value, a dozen elementwise
operations bound by memory, as on that many products in a convolution;
without it a model of depthwise blocks, with few products per value, would
be budgeted three times the time of a ResNet of the same count). A count,
not a clock: the same model and subsample get the same budget on every
machine, so results stay deterministic. Where the budget is short, `grid`
and `granularity` get at most `GRID_SHARE` and `GRANULARITY_SHARE` of it
and decide the layers they reach; LAPQ's Powell search gets the rest.
"""

import dataclasses
import math
from typing import Optional

from keras_powerquant.limits import DEFAULT_MAX_EVALUATIONS

# About 2.5 minutes of evaluations on EfficientNet-Lite2 on 2 CPU cores (benchmarks/second_order.json).
SEARCH_MULTIPLY_ACCUMULATES = 8.0e12
# Fitted to the seconds per evaluation of ResNet-50 (3.9 G products, 9.1 M
# quantized activation values per sample; 18 s) and EfficientNet-Lite2 (0.58 G,
# 8.4 M; 5.8 s) on 2 cores, 205 samples each.
ACTIVATION_VALUE_COST = 120
MIN_SEARCH_EVALUATIONS = 16
GRID_SHARE = 0.4
GRANULARITY_SHARE = 0.2
# LAPQ's evaluations before Powell: the start, five norms and the fitted one.
LAPQ_START_EVALUATIONS = 7


@dataclasses.dataclass(frozen=True)
class SearchBudget:
    """Evaluation budgets of the search steps.

    Attributes:
        grid, granularity: the most evaluations of candidates each step
            makes, or None for all it needs.
        powell: LAPQ's Powell evaluation budget.
        evaluations: the total the scaled budget allows (None when
            `refine_evaluations` set it).
        multiply_accumulates: the cost of one evaluation, activation
            values included (`ACTIVATION_VALUE_COST`).
    """

    grid: Optional[int]
    granularity: Optional[int]
    powell: int
    evaluations: Optional[int]
    multiply_accumulates: int

    def describe(self):
        """One line for the step reports."""
        cost = f"{self.multiply_accumulates / 1e9:.3g} G multiply-accumulates per evaluation, values included"
        if self.grid is None:
            return f"search budget: every grid and granularity candidate, Powell {self.powell} ({cost})"
        return (
            f"search budget scaled to the model, {self.evaluations} evaluations ({cost}): "
            f"grid {self.grid}, granularity {self.granularity}, Powell {self.powell}"
        )


def multiply_accumulates(features, tensor_shape):
    """Multiply-accumulates of one sample through one linear layer.

    Every position of the layer's output is the whole kernel applied once
    (`kernel size` products), so the count is the kernel's size times the
    positions: the output's values divided by the values one position holds
    (or, for a transposed convolution, the input's positions).

    Args:
        features: the layer's `second_order.LayerFeatures`.
        tensor_shape: its output's shape (its input's for a transposed
            convolution), batch first.
    """
    kernel_shape = features.kernel_shape
    if features.reason is not None:
        per_position = kernel_shape[-1]
    elif features.layout == "dense":
        per_position = features.outputs
    elif features.layout == "depthwise":
        per_position = kernel_shape[-2] * kernel_shape[-1]
    else:
        per_position = kernel_shape[-1]
    values = sample_values(tensor_shape)
    return math.prod(kernel_shape) * max(values // max(per_position, 1), 1)


def sample_values(tensor_shape):
    """The values of one sample of a tensor: its size, batch excluded (unknown dimensions count as 1)."""
    return math.prod(int(d) for d in tensor_shape[1:] if d is not None)


def search_budget(multiply_accumulates, samples, needs, evaluations, values=0):
    """The `SearchBudget` of a refinement.

    Args:
        multiply_accumulates: of one sample through the quantized layers.
        samples: the samples each evaluation runs.
        needs: `{"grid": n, "granularity": n}`, the candidates each step
            would evaluate unbounded.
        evaluations: `ConversionConfig.refine_evaluations`: None scales
            the budget to the model; an int is Powell's budget, with grid
            and granularity unbounded.
        values: activation values of one sample, summed over the
            activation quantizers (`sample_values` of their tensors).
    """
    cost = (int(multiply_accumulates) + ACTIVATION_VALUE_COST * int(values)) * int(samples)
    if evaluations is not None:
        return SearchBudget(None, None, int(evaluations), None, cost)
    total = max(MIN_SEARCH_EVALUATIONS, int(SEARCH_MULTIPLY_ACCUMULATES // max(cost, 1)))
    full = needs["grid"] + needs["granularity"] + LAPQ_START_EVALUATIONS + DEFAULT_MAX_EVALUATIONS
    if total >= full:
        return SearchBudget(None, None, DEFAULT_MAX_EVALUATIONS, total, cost)
    grid = min(needs["grid"], int(GRID_SHARE * total))
    granularity = min(needs["granularity"], int(GRANULARITY_SHARE * total))
    powell = max(total - grid - granularity - LAPQ_START_EVALUATIONS, 0)
    return SearchBudget(grid, granularity, min(powell, DEFAULT_MAX_EVALUATIONS), total, cost)

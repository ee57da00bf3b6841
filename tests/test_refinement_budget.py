"""The search steps' evaluation budget: counted from the model's cost, and kept by the steps."""

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.limits import DEFAULT_MAX_EVALUATIONS
from keras_powerquant.refinement import budget as budget_module
from keras_powerquant.refinement.budget import ACTIVATION_VALUE_COST
from keras_powerquant.refinement.budget import MIN_SEARCH_EVALUATIONS
from keras_powerquant.refinement.budget import multiply_accumulates
from keras_powerquant.refinement.budget import sample_values
from keras_powerquant.refinement.budget import search_budget
from keras_powerquant.refinement.second_order import LayerFeatures
from tests import models

L = keras.layers
NEEDS = {"grid": 100, "granularity": 50}


@pytest.mark.parametrize(
    "layer, input_shape, expected",
    [
        # 3x3 kernel, 16 -> 32 channels, 8x8 output positions.
        (L.Conv2D(32, 3, padding="same"), (8, 8, 16), 3 * 3 * 16 * 32 * 64),
        # Stride 2, valid: 3x3 output positions.
        (L.Conv2D(8, 3, strides=2), (8, 8, 4), 3 * 3 * 4 * 8 * 9),
        (L.DepthwiseConv2D(3, padding="same", depth_multiplier=2), (6, 6, 5), 3 * 3 * 5 * 2 * 36),
        (L.Conv2D(12, 1, groups=3), (5, 5, 6), 1 * 1 * 2 * 12 * 25),
        # A Dense on a sequence: one kernel product per token.
        (L.Dense(24), (7, 16), 16 * 24 * 7),
        (L.EinsumDense("abc,cde->abde", output_shape=(7, 4, 8)), (7, 16), 16 * 4 * 8 * 7),
        (L.Conv1D(6, 5, padding="causal"), (20, 3), 5 * 3 * 6 * 20),
    ],
)
def test_multiply_accumulates_of_one_sample(layer, input_shape, expected):
    inputs = keras.Input(input_shape)
    output = layer(inputs)
    features = LayerFeatures(layer, layer.kernel.shape)
    assert multiply_accumulates(features, output.shape) == expected


def test_an_explicit_powell_budget_tries_every_candidate():
    budget = search_budget(4e9, 256, NEEDS, 17)
    assert (budget.grid, budget.granularity, budget.powell, budget.evaluations) == (None, None, 17, None)


def test_a_cheap_model_gets_every_candidate_and_the_full_powell_budget():
    budget = search_budget(1e7, 256, NEEDS, None)
    assert budget.grid is None and budget.granularity is None
    assert budget.powell == DEFAULT_MAX_EVALUATIONS


@pytest.mark.parametrize("per_sample", [5e8, 4e9, 4e11])
def test_an_expensive_model_shares_a_budget_that_shrinks_with_its_cost(per_sample):
    budget = search_budget(per_sample, 256, NEEDS, None)
    expected = max(MIN_SEARCH_EVALUATIONS, int(budget_module.SEARCH_MULTIPLY_ACCUMULATES // (per_sample * 256)))
    assert budget.evaluations == expected
    assert budget.grid <= NEEDS["grid"] and budget.granularity <= NEEDS["granularity"]
    assert budget.grid + budget.granularity + budget_module.LAPQ_START_EVALUATIONS + budget.powell <= expected
    assert budget.multiply_accumulates == int(per_sample) * 256
    cheaper = search_budget(per_sample / 4, 256, NEEDS, None)
    assert cheaper.evaluations >= budget.evaluations


def test_activation_values_are_counted_at_their_cost():
    assert sample_values((None, 8, 8, 16)) == 8 * 8 * 16
    products_only = search_budget(5e8, 256, NEEDS, None)
    with_values = search_budget(5e8, 256, NEEDS, None, values=8e6)
    assert with_values.multiply_accumulates == (int(5e8) + ACTIVATION_VALUE_COST * int(8e6)) * 256
    assert with_values.evaluations < products_only.evaluations


def test_a_scaled_budget_bounds_the_grid_and_granularity_steps(monkeypatch):
    model = models.build("resnet", seed=0)
    x = models.reference_inputs(model, n=40, seed=3)
    # A budget this small leaves each step part of its layers.
    monkeypatch.setattr(budget_module, "SEARCH_MULTIPLY_ACCUMULATES", 1.0)
    monkeypatch.setattr(budget_module, "GRID_SHARE", 0.1)
    _, report = kpq.convert(model, 4, 4, calibration_data=x, refine=["grid", "granularity", "lapq"], refine_samples=40)
    grid, granularity, lapq = report.refinement
    expected = search_budget(1, 1, {"grid": 10**6, "granularity": 10**6}, None)
    # The test model has 9 grid candidates and 7 layers, more than either step's share.
    assert len(grid["decisions"]) == expected.grid < 9
    assert f"budget: {expected.grid} of 9 switches tried; the rest stay uniform" in grid["notes"]
    # The step's own evaluations: its start, the all-uniform model, one per switch tried.
    assert grid["evaluations"] == expected.grid + 2
    assert len(granularity["decisions"]) == expected.granularity < 7
    assert f"budget: {expected.granularity} of 7 layers tried; the rest stay per-channel" in granularity["notes"]
    assert granularity["evaluations"] == expected.granularity + 1
    assert lapq["evaluations"] <= budget_module.LAPQ_START_EVALUATIONS + expected.powell
    assert all("search budget scaled to the model" in " ".join(step["notes"]) for step in report.refinement)


def test_grid_decisions_never_end_above_the_better_of_all_power_and_all_uniform(monkeypatch):
    model = models.build("resnet", seed=1)
    x = models.reference_inputs(model, n=40, seed=4)
    for limit in (1.0, 1e15):
        monkeypatch.setattr(budget_module, "SEARCH_MULTIPLY_ACCUMULATES", limit)
        _, report = kpq.convert(model, 4, 4, calibration_data=x, refine=["grid"], refine_samples=40)
        (grid,) = report.refinement
        uniform_loss = float(grid["notes"][0].split()[2].rstrip(","))
        assert grid["loss_after"] <= min(grid["loss_before"], uniform_loss) + 1e-12
        losses = [d["loss_uniform"] for d in grid["decisions"]] + [grid["loss_after"]]
        assert np.all(np.diff(losses) <= 1e-12)

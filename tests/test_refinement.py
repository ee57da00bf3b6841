"""Loss-aware refinement: each step lowers its own objective, refined models export like any other."""

import dataclasses

import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant.refinement import holdout_split
from keras_powerquant.refinement.budget import SearchBudget
from keras_powerquant.refinement.settings import KernelSetting
from keras_powerquant.refinement.settings import Settings
from keras_powerquant.refinement.steps import _powell
from keras_powerquant.refinement.steps import RefinementContext
from tests import models
from tests.cli_helpers import assert_one_line_error
from tests.cli_helpers import invoke
from tests.cli_helpers import random_images
from tests.cli_helpers import save_small_model
from tests.test_export import _serve_in_fresh_process

# Small budgets keep each conversion to a few seconds.
FAST = {"refine_evaluations": 30, "refine_samples": 48, "rounding_iterations": 20}


@pytest.fixture(scope="module")
def resnet():
    model = models.build("resnet", seed=0)
    x = models.reference_inputs(model, n=48, seed=7)
    labels = np.argmax(_predict(model, x), axis=-1).astype("int64")
    return model, x, labels


def _predict(model, x):
    return models.predict(model, x)[0]


def _kl(float_model, quantized, x):
    p = np.clip(_predict(float_model, x), 1e-7, 1.0)
    q = np.clip(_predict(quantized, x), 1e-7, 1.0)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


def _weights(model):
    return [np.asarray(w) for w in model.weights]


@pytest.mark.parametrize(
    "method, bias_correction", [("powerquant", False), ("uniform", False), ("powerquant", True)]
)
def test_each_step_does_not_increase_its_objective(resnet, method, bias_correction):
    model, x, labels = resnet
    steps = ["grid", "granularity", "lapq", "rounding"]
    # With bias correction, the loss is that of the corrected network, and the
    # exported model gets the corrections that loss applied.
    quantized, report = kpq.convert(
        model, 4, 4, method, calibration_data=x, refine=steps, bias_correction=bias_correction, **FAST
    )
    assert [step["name"] for step in report.refinement] == steps
    for step in report.refinement:
        assert step["loss_after"] <= step["loss_before"], step
        assert step["seconds"] > 0 and step["evaluations"] >= 1
        # A step is kept exactly when it does not raise the held-out loss.
        assert step["kept"] == (step["holdout_loss_after"] <= step["holdout_loss_before"]), step
    # All 48 samples are held: the steps fit on 39 and hold out 9, so the
    # final loss is the built model's KL to float on those 39 and on those 9.
    fit, holdout = holdout_split(len(x))
    assert len(fit) == 39 and len(holdout) == 9
    last = report.refinement[-1]
    final_loss = last["loss_after"] if last["kept"] else last["loss_before"]
    final_holdout = last["holdout_loss_after"] if last["kept"] else last["holdout_loss_before"]
    assert _kl(model, quantized, x[fit]) == pytest.approx(final_loss, rel=0.05, abs=1e-4)
    assert _kl(model, quantized, x[holdout]) == pytest.approx(final_holdout, rel=0.05, abs=1e-4)
    assert final_holdout <= report.refinement[0]["holdout_loss_before"]


def test_grid_step_is_never_worse_than_uniform(resnet):
    model, x, _ = resnet
    uniform, _ = kpq.convert(model, 4, 4, "uniform", calibration_data=x)
    chosen, report = kpq.convert(model, 4, 4, calibration_data=x, refine=["grid"], **FAST)
    decisions = report.refinement[0]["decisions"]
    assert decisions and {d["chosen"] for d in decisions} <= {"power", "uniform"}
    assert _kl(model, chosen, x) <= _kl(model, uniform, x) + 1e-6


def test_gradient_batches_always_hold_32_samples():
    from keras_powerquant.refinement.steps import _gradient_batches

    for size in (9, 31, 33, 256):
        batches = list(_gradient_batches(size, 4, seed=0))
        assert len(batches) == 4
        assert all(len(b) == 32 and b.min() >= 0 and b.max() < size for b in batches)
        if size >= 32:
            assert all(len(set(b.tolist())) == 32 for b in batches)


def test_learned_rounding_on_an_odd_number_of_samples(resnet):
    # 31 samples are too few to hold any out, so all 31 are fitted: gradient
    # batches of 31 made oneDNN's Conv2DBackpropFilter abort the process on
    # this model's 1x1 stride-2 projection.
    model, x, _ = resnet
    _, report = kpq.convert(
        model, 4, 4, calibration_data=x[:31], refine=["rounding"], refine_samples=31, rounding_iterations=5
    )
    (step,) = report.refinement
    assert step["name"] == "rounding" and len(step["decisions"]) == len(report.quantized_layers)


def test_cached_kernels_follow_every_setting_change(resnet):
    # An evaluation reads each layer's kernel from a cache that `assign`
    # recomputes when the layer's settings change: it must never be stale.
    from keras_powerquant.converter.calibration import calibration_batches
    from keras_powerquant.converter.calibration import record_samples
    from keras_powerquant.converter.folding import plan_folds
    from keras_powerquant.converter.graph import FlatGraph
    from keras_powerquant.converter.plan import plan_conversion
    from keras_powerquant.pipeline.fitting import _fit_activations
    from keras_powerquant.pipeline.fitting import _fit_weights
    from keras_powerquant.refinement.objective import NetworkObjective

    model, x, _ = resnet
    graph = FlatGraph(model)
    folds, _ = plan_folds(graph)
    plan = plan_conversion(graph, folds, 4, 4, False, 8)
    samples = record_samples(graph, calibration_batches(x, graph.input_tensors, 16, None), list(plan.quantizers))
    def no_progress(done, total):
        pass

    _fit_weights(plan, "powerquant", "layer", True, 2.0, (0.1, 2.0), False, no_progress)
    _fit_activations(plan, samples, dict.fromkeys(plan.quantizers, "calibration"), "powerquant", "layer", 2.0,
                     (0.1, 2.0), True, no_progress)
    objective = NetworkObjective(graph, folds, plan, True, [x[:32]], correct_bias=True)
    settings = Settings.from_plan(plan, True)
    first, second = list(settings.kernels)[:2]

    def assert_fresh():
        for layer in objective.kernel_layers.values():
            np.testing.assert_array_equal(layer.cached_kernel.numpy(), layer.dequantized_kernel().numpy())

    loss = objective(settings)
    assert_fresh()
    changes = [
        {first: dataclasses.replace(settings.kernels[first], exponent=0.5)},
        {second: dataclasses.replace(settings.kernels[second], bits=3, clip_fraction=0.8)},
        {first: dataclasses.replace(settings.kernels[first], per_channel=False)},
    ]
    losses = []
    for change in changes:
        settings_now = settings.replace(kernels=change)
        losses.append(objective(settings_now))
        assert_fresh()
    objective.assign(settings, quantized=False)
    assert_fresh()
    assert objective(settings) == loss and len(set(losses + [loss])) == 4


def test_cross_entropy_with_labels(resnet):
    model, x, labels = resnet
    _, report = kpq.convert(model, 4, 4, calibration_data=x, calibration_labels=labels, refine=["grid"], **FAST)
    assert report.options["labelled"] is True
    quantized_loss = report.refinement[0]["loss_after"]
    # Cross-entropy of the model's own predicted labels: at least the float model's, which is > 0.
    p = _predict(model, x)
    float_loss = float(np.mean(-np.log(p[np.arange(len(labels)), labels])))
    assert quantized_loss >= float_loss * 0.5 and quantized_loss > 0


def test_refine_false_and_no_op_refinement_keep_todays_model(resnet):
    model, x, _ = resnet
    today, today_report = kpq.convert(model, 4, 4, "uniform", calibration_data=x)
    plain, _ = kpq.convert(model, 4, 4, "uniform", calibration_data=x, refine=False)
    # The grid step keeps a = 1 for the uniform method: same model through the refinement path.
    through, report = kpq.convert(model, 4, 4, "uniform", calibration_data=x, refine=["grid"])
    assert today_report.refinement == [] and today_report.options["refine"] == []
    for a, b in zip(_weights(today), _weights(plain)):
        np.testing.assert_array_equal(a, b)
    # Refinement measures its bias corrections on the layers' outputs rather
    # than through §7's padding model, so only the biases may differ, a little.
    for variable, a, b in zip(today.weights, _weights(today), _weights(through)):
        if variable.path.endswith("/bias"):
            np.testing.assert_allclose(a, b, atol=0.1)
        else:
            np.testing.assert_array_equal(a, b)
    assert [layer.get_config() for layer in through.layers] == [layer.get_config() for layer in today.layers]


def test_refinement_is_deterministic_and_the_result_serves_in_a_fresh_process(resnet, tmp_path):
    model, x, _ = resnet
    tiny = {"refine_evaluations": 10, "refine_samples": 24, "rounding_iterations": 5}
    runs = [kpq.convert(model, 4, 4, calibration_data=x, refine=True, **tiny) for _ in range(2)]
    for a, b in zip(_weights(runs[0][0]), _weights(runs[1][0])):
        np.testing.assert_array_equal(a, b)
    quantized, report = runs[0]
    assert [step["name"] for step in report.refinement] == ["grid", "granularity", "lapq", "gptq"]
    result = kpq.export_model(quantized, tmp_path / "export", report=report, float_model=model)
    outputs = _serve_in_fresh_process(result.saved_model_dir, {"image": x[:8]}, tmp_path)
    np.testing.assert_allclose(next(iter(outputs.values())), _predict(quantized, x[:8]), atol=1e-5)


def test_mixed_precision_meets_the_size_budget(resnet):
    model, x, _ = resnet
    uniform_w4, _ = kpq.convert(model, 4, 4, "uniform", calibration_data=x)
    size = int(sum(np.asarray(w).nbytes for w in uniform_w4.weights))
    mixed, report = kpq.convert(model, 4, 4, calibration_data=x, target_size=size, **FAST)
    assert int(sum(np.asarray(w).nbytes for w in mixed.weights)) <= size
    step = report.refinement[0]
    assert step["name"] == "bits"
    bits = {d["name"]: d["bits"] for d in step["decisions"]}
    assert set(bits) == {layer.name for layer in report.quantized_layers}
    assert {layer.name: layer.weight_bits for layer in report.quantized_layers} == bits
    assert all(len(d["sensitivity"]) == 7 for d in step["decisions"])


def test_mean_bits_budget(resnet):
    model, x, _ = resnet
    _, report = kpq.convert(model, 4, 4, calibration_data=x, mean_bits=3.0, **FAST)
    layers = report.quantized_layers
    mean = sum(layer.weight_bits * layer.params for layer in layers) / sum(layer.params for layer in layers)
    assert mean <= 3.0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"refine": True}, "calibration_data"),
        ({"target_size": 0.5}, "calibration_data"),
        ({"refine": ["lapq", "sharpen"], "calibration_data": "x"}, "Unknown refinement step(s) ['sharpen']"),
        ({"refine": True, "calibration_data": "x", "calibration_labels": np.zeros(5, "int64")}, "5 labels for 48"),
        ({"refine": True, "calibration_data": "x", "calibration_labels": np.zeros(48, "float32")}, "integer class"),
        ({"calibration_data": "x", "target_size": 100}, "below the smallest size 2-bit weights reach"),
        ({"calibration_data": "x", "target_size": 0.5, "mean_bits": 4}, "not both"),
    ],
)
def test_bad_refinement_options_are_clear_errors(resnet, options, message):
    model, x, _ = resnet
    options = {k: (x if isinstance(v, str) and v == "x" else v) for k, v in options.items()}
    with pytest.raises(ValueError) as info:
        kpq.convert(model, 4, 4, **options)
    assert message in str(info.value)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refine_cli")
    model, paths = save_small_model(folder)
    np.save(folder / "calib.npy", random_images(24))
    np.save(folder / "labels.npy", np.arange(24) % 10)
    np.save(folder / "short_labels.npy", np.arange(5))
    return folder, paths


@pytest.mark.parametrize(
    "args, message",
    [
        (["--refine"], "--calibration-data"),
        (["--refine", "lapq,sharpen", "--calibration-data", "calib.npy"], "Unknown refinement step(s) ['sharpen']"),
        (
            ["--refine", "--calibration-data", "calib.npy", "--calibration-labels", "short_labels.npy"],
            "5 labels for 24",
        ),
        (["--calibration-data", "calib.npy", "--target-size", "10"], "below the smallest size"),
        (["--calibration-data", "calib.npy", "--target-size", "small"], "--target-size"),
    ],
)
def test_cli_refinement_usage_errors_exit_2(small_files, monkeypatch, args, message):
    folder, paths = small_files
    monkeypatch.chdir(folder)
    result = invoke("convert", paths["keras"], "-o", "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (folder / "out").exists()


def test_cli_refine_writes_the_steps_into_the_report(small_files, monkeypatch):
    folder, paths = small_files
    monkeypatch.chdir(folder)
    result = invoke(
        "convert", paths["keras"], "-o", "out", "--calibration-data", "calib.npy", "--calibration-labels",
        "labels.npy", "--refine", "grid,lapq,rounding", "--refine-evaluations", "10", "--rounding-iterations", "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.stdout)
    assert [step["name"] for step in report["report"]["refinement"]] == ["grid", "lapq", "rounding"]
    assert report["report"]["options"]["labelled"] is True
    assert report["report"]["options"]["rounding_iterations"] == 3


def test_cli_error_format_for_bad_labels_file(small_files, monkeypatch):
    folder, paths = small_files
    monkeypatch.chdir(folder)
    (folder / "bad.npy").write_text("not numpy")
    result = invoke("convert", paths["keras"], "-o", "out_bad", "--refine", "--calibration-data", "calib.npy",
                    "--calibration-labels", "bad.npy")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "bad.npy")
    assert not (folder / "out_bad").exists()


def test_weight_clip_fraction_scales_and_saturates_the_codes():
    from keras_powerquant.quantization.weights import WeightQuantizer

    weights = np.array([[0.1, -0.5], [1.0, 0.25], [-0.8, 2.0]], dtype=np.float32)
    quantizer = WeightQuantizer(4, exponent=0.5)
    codes, scales = quantizer.encode(weights, clip_fraction=0.5)
    np.testing.assert_allclose(scales, [0.5, 1.0])
    # |W| at or above the clip takes the largest code; the rest round on the clipped grid.
    assert codes[2, 0] == -7 and codes[1, 0] == 7 and codes[2, 1] == 7
    full_codes, _ = quantizer.encode(weights)
    assert abs(int(codes[0, 0])) > abs(int(full_codes[0, 0]))
    with pytest.raises(ValueError, match="clip_fraction"):
        quantizer.encode(weights, clip_fraction=1.5)


def test_refinement_accepts_synthetic_calibration_data(resnet):
    model, x, _ = resnet
    synthetic = kpq.SyntheticData(num_samples=16, steps=3, input_range=(0.0, 1.0))
    _, report = kpq.convert(model, 4, 4, calibration_data=synthetic, refine=["grid", "lapq"], **FAST)
    assert report.options["synthetic"]["num_samples"] == 16
    assert [step["name"] for step in report.refinement] == ["grid", "lapq"]
    assert report.refinement[-1]["loss_after"] <= report.refinement[0]["loss_before"]


def test_lapq_search_does_not_leave_a_coordinate_that_starts_on_its_bound():
    # The loss is lowest with the first clip fraction exactly at its bound (1)
    # and the second at 0.5. scipy's bounded line search moved the first off
    # its bound to a worse point, which then hid the second's improvement.
    settings = Settings(
        {
            "first": KernelSetting(4, 1.0, 1.0, True),
            "second": KernelSetting(4, 1.0, 1.0, True),
        },
        {},
    )

    def loss(candidate):
        first, second = candidate.kernels["first"].clip_fraction, candidate.kernels["second"].clip_fraction
        return (0.0 if first == 1.0 else 0.5) + (second - 0.5) ** 2

    budget = SearchBudget(None, None, 200, None, 0)
    context = RefinementContext(loss, None, {}, None, "uniform", (0.25, 1.0), True, budget, None)
    best, best_loss, evaluations = _powell(context, settings, loss(settings))
    assert 0 < evaluations <= 200
    assert best.kernels["first"].clip_fraction == 1.0
    assert best.kernels["second"].clip_fraction == pytest.approx(0.5, abs=0.02)
    assert best_loss == pytest.approx(loss(best)) and best_loss < 0.01

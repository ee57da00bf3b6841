"""Second-order (GPTQ) rounding: the numpy core alone, then the `gptq` refinement step on small Keras models."""

import keras
import numpy as np
import pytest

import keras_powerquant as kpq
from keras_powerquant import refinement
from keras_powerquant.quantization import second_order
from keras_powerquant.quantization.second_order import gptq_codes
from keras_powerquant.quantization.second_order import least_squares_kernels
from keras_powerquant.quantization.second_order import PowerGrid
from keras_powerquant.quantization.second_order import target_error
from keras_powerquant.quantization.second_order import TargetAccumulator
from keras_powerquant.quantization.weights import WeightQuantizer
from keras_powerquant.refinement.second_order import LayerFeatures

L = keras.layers

# ---------------------------------------------------------------------------
# The numpy core.


def _correlated(rows, size, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(size, size)) / np.sqrt(size)
    return rng.normal(size=(rows, size)) @ mixing + 0.3 * rng.normal(size=(rows, size))


def _hessian(x, groups=1):
    """`2 X^T X / rows` per group of the columns of `x`."""
    grouped = np.transpose(x.reshape(x.shape[0], groups, -1), (1, 0, 2))
    return 2.0 * np.matmul(np.transpose(grouped, (0, 2, 1)), grouped) / x.shape[0]


def output_error(kernels, decoded, hessians):
    """`tr((W - W_hat)^T H (W - W_hat))`: the layer-output error GPTQ minimises, up to a factor."""
    error = kernels - decoded
    return float(np.sum(error * np.matmul(hessians, error)))


def _problem(size=48, outputs=24, bits=4, exponent=0.6, seed=0):
    rng = np.random.default_rng(seed + 100)
    kernel = rng.normal(size=(1, size, outputs))
    grid = PowerGrid(bits, exponent, np.abs(kernel).max(axis=1))
    return kernel, grid, _hessian(_correlated(4 * size, size, seed))


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_a_diagonal_hessian_gives_nearest_rounding(exponent):
    kernel, grid, _ = _problem(exponent=exponent)
    diagonal = np.diag(np.random.default_rng(3).uniform(0.1, 5.0, kernel.shape[1]))[None]
    nearest = grid.with_scales(grid.scales[:, None, :]).codes(kernel)
    np.testing.assert_array_equal(gptq_codes(kernel, diagonal, grid), nearest)


def test_nearest_codes_are_the_weight_quantizers():
    kernel, grid, _ = _problem(exponent=0.7)
    codes, _ = WeightQuantizer(4, 0.7).encode(kernel[0].astype(np.float32))
    np.testing.assert_array_equal(grid.codes(kernel[0]), codes)


@pytest.mark.parametrize("exponent, bits", [(1.0, 4), (0.6, 4), (0.5, 3), (0.8, 8)])
def test_second_order_codes_lower_the_output_error_on_correlated_inputs(exponent, bits):
    kernel, grid, hessian = _problem(bits=bits, exponent=exponent)
    whole = grid.with_scales(grid.scales[:, None, :])
    nearest = output_error(kernel, whole.decode(whole.codes(kernel)), hessian)
    second_order = output_error(kernel, whole.decode(gptq_codes(kernel, hessian, grid)), hessian)
    assert second_order < 0.8 * nearest


@pytest.mark.parametrize("act_order", [True, False])
def test_codes_stay_in_range_and_are_deterministic(act_order):
    kernel, grid, hessian = _problem(bits=3)
    # A clip fraction of 0.3: most magnitudes saturate, and errors pushed onto them grow.
    clipped = grid.with_scales(grid.scales * 0.3)
    runs = [gptq_codes(kernel, hessian, clipped, act_order=act_order, block_size=7) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert runs[0].dtype == np.int64 and np.abs(runs[0]).max() <= 3


def test_block_size_does_not_change_the_codes():
    kernel, grid, hessian = _problem()
    np.testing.assert_array_equal(
        gptq_codes(kernel, hessian, grid, block_size=5), gptq_codes(kernel, hessian, grid, block_size=1000)
    )


def test_groups_are_solved_independently():
    rng = np.random.default_rng(5)
    kernels = rng.normal(size=(3, 9, 4))
    hessians = np.stack([_hessian(_correlated(60, 9, seed))[0] for seed in range(3)])
    grid = PowerGrid(4, 0.6, np.abs(kernels).max(axis=1))
    together = gptq_codes(kernels, hessians, grid)
    for g in range(3):
        alone = gptq_codes(kernels[g : g + 1], hessians[g : g + 1], grid.with_scales(grid.scales[g : g + 1]))
        np.testing.assert_array_equal(together[g : g + 1], alone)


def test_dead_inputs_push_no_error_and_zero_scales_give_zero_codes():
    kernel, grid, _ = _problem()
    x = _correlated(200, kernel.shape[1])
    dead = [3, 10]
    x[:, dead] = 0.0
    scales = grid.scales.copy()
    scales[0, 2] = 0.0
    grid = grid.with_scales(scales)
    codes = gptq_codes(kernel, _hessian(x), grid)
    assert np.all(codes[0, :, 2] == 0)
    # Dead inputs round to nearest, and the live ones get the codes they get without them.
    nearest = grid.with_scales(scales[:, None, :]).codes(kernel)
    np.testing.assert_array_equal(codes[:, dead], nearest[:, dead])
    alive = gptq_codes(np.delete(kernel, dead, axis=1), _hessian(np.delete(x, dead, axis=1)), grid)
    np.testing.assert_array_equal(np.delete(codes, dead, axis=1), alive)


def _paired_rows(rows=240, size=12, outputs=5, seed=0):
    """Float-network rows `x`, quantized-network rows `x_q` (x plus an error), and a kernel."""
    rng = np.random.default_rng(seed)
    x = _correlated(rows, size, seed)
    x_q = x + 0.2 * rng.normal(size=x.shape) + 0.1 * x[:, ::-1]
    return x, x_q, rng.normal(size=(1, size, outputs))


def test_streamed_target_moments_equal_one_pass():
    x, x_q, kernel = _paired_rows()
    y = x @ kernel[0]
    streamed = TargetAccumulator(1, 12, 5)
    for start in range(0, 240, 37):
        streamed.add(x_q[start : start + 37, None, :], y[start : start + 37, None, :])
    hessian, cross, energy = streamed.moments()
    np.testing.assert_allclose(hessian, 2 * (x_q.T @ x_q)[None] / 240, rtol=1e-5)
    np.testing.assert_allclose(cross, 2 * (x_q.T @ y)[None] / 240, rtol=1e-5)
    np.testing.assert_allclose(energy, [2 * np.sum(y**2) / 240], rtol=1e-5)
    halves = TargetAccumulator(1, 12, 5), TargetAccumulator(1, 12, 5)
    halves[0].add(x_q[0::2, None], y[0::2, None])
    halves[1].add(x_q[1::2, None], y[1::2, None])
    for merged, whole in zip(halves[0].merged(halves[1]).moments(), streamed.moments()):
        np.testing.assert_allclose(merged, whole, rtol=1e-5)
    with pytest.raises(ValueError, match="Expected rows"):
        streamed.add(x_q[:, None, :], y[:10, None, :])


def test_target_error_is_the_error_against_the_float_output():
    x, x_q, kernel = _paired_rows()
    accumulator = TargetAccumulator(1, 12, 5)
    accumulator.add(x_q[:, None, :], (x @ kernel[0])[:, None, :])
    decoded = np.round(kernel * 4) / 4
    direct = 2 * np.sum((x @ kernel[0] - x_q @ decoded[0]) ** 2) / 240
    np.testing.assert_allclose(target_error(decoded, accumulator.moments()), direct, rtol=1e-6)


def test_least_squares_kernels_fit_the_float_output_from_the_quantized_input():
    x, x_q, kernel = _paired_rows()
    accumulator = TargetAccumulator(1, 12, 5)
    accumulator.add(x_q[:, None, :], (x @ kernel[0])[:, None, :])
    moments = accumulator.moments()
    fitted = least_squares_kernels(kernel, moments, damping=0.0)
    expected, *_ = np.linalg.lstsq(x_q, x @ kernel[0], rcond=None)
    np.testing.assert_allclose(fitted[0], expected, rtol=1e-4, atol=1e-6)
    assert target_error(fitted, moments) < 0.8 * target_error(kernel, moments)
    # Rounded on its grid, the least-squares target beats the kernel's own second-order codes.
    grid = PowerGrid(4, 1.0, np.abs(kernel).max(axis=1))
    whole = grid.with_scales(grid.scales[:, None, :])
    own = whole.decode(gptq_codes(kernel, moments[0], grid))
    corrected = whole.decode(gptq_codes(least_squares_kernels(kernel, moments), moments[0], grid))
    assert target_error(corrected, moments) < target_error(own, moments)


@pytest.mark.parametrize("size, groups", [(9, 40), (80, 2)])
def test_inverse_cholesky_factors_the_inverse_hessian(size, groups):
    # Small factors take the batched path, large ones LAPACK's triangular inverse.
    hessians = np.stack([_hessian(_correlated(3 * size, size, seed))[0] for seed in range(groups)])
    damped, _, mean = second_order._damped(hessians, 0.01)
    upper = second_order._inverse_cholesky(damped, 0.01, mean)
    assert np.allclose(np.tril(upper, -1), 0.0)
    np.testing.assert_allclose(
        np.matmul(np.transpose(upper, (0, 2, 1)), upper), np.linalg.inv(damped), rtol=1e-7, atol=1e-9
    )


# ---------------------------------------------------------------------------
# Layer features: rows times the kernel matrices reproduce the layer.


def _smooth_inputs(shape, count, seed=0):
    """Spatially smooth, channel-correlated inputs (what a network's feature maps look like to GPTQ)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count,) + tuple(shape))
    for axis in range(1, len(shape)):
        x = (x + np.roll(x, 1, axis=axis) + np.roll(x, 2, axis=axis)) / 3
    # The same channel mixing for every seed: calibration and test inputs share one distribution.
    channels = shape[-1]
    mixing = np.random.default_rng(99).normal(size=(channels, channels)) / np.sqrt(channels)
    x = x @ (np.eye(channels) + mixing)
    return (x + 0.5).astype(np.float32)


LAYERS = {
    "conv2d_same_strided": ((9, 9, 4), lambda: L.Conv2D(6, 3, strides=2, padding="same", use_bias=False)),
    "conv2d_valid_dilated": ((9, 9, 4), lambda: L.Conv2D(5, 3, dilation_rate=2, use_bias=False)),
    "conv2d_even_kernel": ((8, 8, 3), lambda: L.Conv2D(4, (2, 4), strides=(1, 3), padding="same", use_bias=False)),
    "conv2d_grouped": ((8, 8, 6), lambda: L.Conv2D(9, 3, padding="same", groups=3, use_bias=False)),
    "depthwise": (
        (8, 8, 5),
        lambda: L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, use_bias=False),
    ),
    "conv1d_causal": ((12, 4), lambda: L.Conv1D(6, 3, padding="causal", dilation_rate=2, use_bias=False)),
    "conv1d_strided": ((13, 4), lambda: L.Conv1D(6, 4, strides=3, padding="same", use_bias=False)),
    "conv3d": ((5, 6, 5, 2), lambda: L.Conv3D(3, (2, 3, 2), padding="same", use_bias=False)),
    "dense_sequence": ((5, 16), lambda: L.Dense(4, use_bias=False)),
    "einsum_dense": ((5, 3, 4), lambda: L.EinsumDense("abcd,cde->abe", output_shape=(None, 6))),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_rows_times_kernel_matrices_reproduce_the_layer(name):
    shape, make = LAYERS[name]
    layer = make()
    x = _smooth_inputs(shape, 3)
    expected = np.asarray(layer(x))
    from keras_powerquant.converter.registry import linear_type

    kernel = linear_type(layer).stored_kernel(layer, np.asarray(layer.kernel))
    kernel = linear_type(layer).quantized_kernel(layer, kernel)
    features = LayerFeatures(layer, kernel.shape)
    rows = features.rows(x, 10**9, np.random.default_rng(0))  # every position, in order
    outputs = np.einsum("rgn,gnk->rgk", rows, features.matrices(kernel))
    outputs = outputs.reshape(rows.shape[0], -1)
    np.testing.assert_allclose(outputs, expected.reshape(outputs.shape), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(features.kernel(features.matrices(kernel)), kernel)


# ---------------------------------------------------------------------------
# The `gptq` step in conversion.


def _one_layer_model(name):
    shape, make = LAYERS[name]
    inputs = keras.Input(shape, name="image")
    layer = make()
    model = keras.Model(inputs, layer(inputs))
    keras.utils.set_random_seed(1)
    model.set_weights([np.random.default_rng(2).normal(size=w.shape).astype(np.float32) for w in model.weights])
    return model, layer


def _capture_settings(monkeypatch):
    captured = {}
    step = refinement.STEPS["gptq"]

    def capturing(context, settings):
        refined, report = step(context, settings)
        captured["settings"] = refined
        return refined, report

    monkeypatch.setitem(refinement.STEPS, "gptq", capturing)
    return captured


OPTIONS = {"quantize_first_last": True, "bias_correction": False, "refine_samples": 100}


@pytest.mark.parametrize(
    "name", ["conv2d_same_strided", "conv2d_grouped", "depthwise", "conv1d_causal", "dense_sequence", "einsum_dense"]
)
def test_gptq_lowers_the_layer_error_and_the_model_carries_its_codes(name, monkeypatch, tmp_path):
    model, layer = _one_layer_model(name)
    calibration = _smooth_inputs(LAYERS[name][0], 100, seed=1)
    test = _smooth_inputs(LAYERS[name][0], 40, seed=2)
    captured = _capture_settings(monkeypatch)
    nearest, _ = kpq.convert(model, 4, 8, calibration_data=calibration, **OPTIONS)
    refined, report = kpq.convert(model, 4, 8, calibration_data=calibration, refine=["gptq"], **OPTIONS)
    (step,) = report.refinement
    (decision,) = step["decisions"]
    assert step["name"] == "gptq" and decision["chosen"] in ("second-order", "least-squares second-order")
    assert decision[f"held_out_error_{decision['chosen'].replace(' ', '_').replace('-', '_')}"] < decision[
        "held_out_error_nearest"
    ]
    reference = np.asarray(model(test))
    errors = [float(np.mean((np.asarray(m(test)) - reference) ** 2)) for m in (nearest, refined)]
    assert errors[1] < errors[0]
    # The PowerQuant layer decodes exactly the step's codes with its own scales.
    codes = captured["settings"].codes_for(layer.name)
    quantized_layer = next(lay for lay in refined.layers if hasattr(lay, "kernel_codes"))
    setting = captured["settings"].kernels[layer.name]
    decoded = WeightQuantizer(4, setting.exponent).decode(codes, np.asarray(quantized_layer.kernel_scale))
    np.testing.assert_array_equal(np.asarray(quantized_layer.dequantized_kernel()), decoded)
    # ...and so does the model after a .keras round trip.
    path = tmp_path / "refined.keras"
    refined.save(path)
    np.testing.assert_array_equal(np.asarray(kpq.load_model(path)(test)), np.asarray(refined(test)))


def test_conv2d_transpose_is_rounded_to_nearest_with_a_stated_reason():
    inputs = keras.Input((6, 6, 3), name="image")
    outputs = L.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(inputs)
    outputs = L.Conv2D(2, 3, padding="same", name="after")(outputs)
    model = keras.Model(inputs, outputs)
    x = _smooth_inputs((6, 6, 3), 24)
    _, report = kpq.convert(model, 4, 8, calibration_data=x, refine=["gptq"], **OPTIONS)
    (step,) = report.refinement
    assert any("up:" in note and "transposed convolution" in note for note in step["notes"])
    assert [d["name"] for d in step["decisions"]] == ["after"]


def test_rows_per_layer_are_bounded_in_bytes_but_never_below_four_per_input():
    from keras_powerquant.refinement import second_order as step

    # A plain convolution keeps ROWS; a wide depthwise one (1,536 channels x 25 taps) stays within ROW_BYTES.
    assert step.row_count(1, 576) == step.ROWS
    wide = step.row_count(1536, 25)
    assert 4 * 25 <= wide < step.ROWS and 4 * 1536 * 25 * wide <= step.ROW_BYTES
    # A kernel with more inputs than the byte bound allows still gets 4 rows per input.
    assert step.row_count(1, 4608) == 4 * 4608


def test_a_pass_offers_least_squares_only_until_one_of_its_layers_changed(monkeypatch):
    """Later layers of a pass were read before an earlier one's new codes: no least-squares target for them."""
    from keras_powerquant.refinement import second_order as step
    from tests import models

    model = models.build("mobilenet", seed=0)
    x = models.reference_inputs(model, n=64, seed=3)
    monkeypatch.setattr(step, "MAX_PASSES", 1)
    _, report = kpq.convert(model, 4, 8, calibration_data=x, refine=["gptq"], refine_samples=64)
    (gptq,) = report.refinement
    assert gptq["notes"][0].endswith("layers in 1 input passes")
    decisions = gptq["decisions"]
    first_change = next(i for i, d in enumerate(decisions) if d["chosen"] != "nearest")
    for index, decision in enumerate(decisions):
        offered = "held_out_error_least_squares_second_order" in decision
        assert offered == (index <= first_change), decision["name"]
    assert gptq["loss_after"] <= gptq["loss_before"]

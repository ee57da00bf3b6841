"""BatchNorm folding (`fold_batch_norms`) on built and real Keras models.

The folded model must compute what the original computes (inference mode),
the report must say which BatchNorms were folded into which layer and why
the others were kept, and exactly the kept ones may remain in the model.
The test models (tests/models.py) hold random gamma, beta, moving mean and
moving variance, so every term of the fold matters.
"""

import keras
import numpy as np
import pytest

from keras_powerquant import fold_batch_norms
from keras_powerquant.errors import UnsupportedModelError
from tests import models as M
from tests.cpu_kernels import skip_unless_runs

L = keras.layers
# Folding reorders float32 arithmetic (W * s, then conv, vs. conv, then
# (y - mu) * s + beta); outputs here are softmax probabilities or values of
# order 1, whose float32 rounding differences are ~1e-7.
TOLERANCE = 1e-4
# `unsupported` has a DepthwiseConv1D computing in float16 (eps ~1e-3), its
# BatchNorm folded in: its rounding, not folding, decides (1.0005e-4 on an
# Intel Xeon with AMX-FP16, below 1e-4 on an AMD EPYC).
TOLERANCES = {"unsupported": 1e-3}


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _bn_names(model):
    return {layer.name for layer in M.leaf_layers(model) if type(layer) is L.BatchNormalization}


@pytest.fixture(scope="module")
def folded_models():
    """name -> (original, folded, report, inputs, original weights before folding)."""
    results = {}
    for name in M.BUILDERS:
        model = M.build(name, seed=3, stats="random")
        before = M.weights_of(model)
        folded, report = fold_batch_norms(model)
        results[name] = (model, folded, report, M.reference_inputs(model, 32, seed=11), before)
    return results


@pytest.mark.parametrize("name", sorted(M.BUILDERS))
def test_folded_model_computes_the_same(folded_models, name):
    model, folded, _, inputs, _ = folded_models[name]
    expected, got = M.predict(model, inputs), M.predict(folded, inputs)
    assert [e.shape for e in expected] == [g.shape for g in got]
    diff = _max_abs_diff(expected, got)
    assert diff < TOLERANCES.get(name, TOLERANCE), f"{name}: folded model differs by {diff}"


@pytest.mark.parametrize("name", sorted(M.BUILDERS))
def test_report_lists_folded_and_kept_batch_norms(folded_models, name):
    _, _, report, _, _ = folded_models[name]
    folded = {entry["batch_norm"]: entry["into"] for entry in report.folded_batch_norms}
    assert folded == M.EXPECTED_FOLDS[name]
    kept = {}
    for entry in report.unfolded_batch_norms:
        kept.setdefault(entry["batch_norm"], entry["reason"])
    assert set(kept) == set(M.EXPECTED_KEPT[name])
    for bn, words in M.EXPECTED_KEPT[name].items():
        assert words in kept[bn], f"{bn}: reason {kept[bn]!r} does not mention {words!r}"


@pytest.mark.parametrize("name", sorted(M.BUILDERS))
def test_only_kept_batch_norms_remain(folded_models, name):
    model, folded, _, _, _ = folded_models[name]
    assert _bn_names(model) == set(M.EXPECTED_FOLDS[name]) | set(M.EXPECTED_KEPT[name])
    assert _bn_names(folded) == set(M.EXPECTED_KEPT[name])
    # Nested models are expanded: the folded model is one flat graph.
    assert not any(isinstance(layer, keras.Model) for layer in folded.layers)


@pytest.mark.parametrize("name", sorted(M.BUILDERS))
def test_input_model_is_not_modified(folded_models, name):
    model, _, _, _, before = folded_models[name]
    after = M.weights_of(model)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)


def test_folded_layer_gains_the_bias_and_the_scaled_kernel(folded_models):
    """stem: Conv2D(use_bias=False) + BN -> kernel W * s, bias beta - mu * s."""
    model, folded, _, _, _ = folded_models["resnet"]
    conv, bn = model.get_layer("stem"), model.get_layer("stem_bn")
    new = folded.get_layer("stem")
    assert type(new) is L.Conv2D and new.use_bias
    gamma, beta, mean, var = (w.astype(np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    kernel = conv.kernel.numpy().astype(np.float64)
    np.testing.assert_allclose(new.kernel.numpy(), kernel * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.bias.numpy(), beta - mean * scale, rtol=1e-5, atol=1e-6)


def test_depthwise_multiplier_two_folds_per_output_channel(folded_models):
    """dw2: kernel (3, 3, in, 2); output channel i * 2 + j has scale s[i * 2 + j]."""
    model, folded, _, _, _ = folded_models["mobilenet"]
    conv, bn = model.get_layer("dw2"), model.get_layer("dw2_bn")
    gamma, _, _, var = (w.astype(np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(var + bn.epsilon)
    kernel = conv.kernel.numpy().astype(np.float64)
    assert kernel.shape[2:] == (12, 2)
    expected = kernel * scale.reshape(12, 2)
    np.testing.assert_allclose(folded.get_layer("dw2").kernel.numpy(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Small cases built inline: what may and may not fold.


def _fold_case(build_outputs, input_shape=(6, 6, 3), seed=5):
    inputs = keras.Input(input_shape, name="x")
    model = keras.Model(inputs, build_outputs(inputs))
    M._finish(model, seed, "random")
    folded, report = fold_batch_norms(model)
    x = np.random.default_rng(seed).normal(size=(8,) + input_shape).astype("float32")
    diff = _max_abs_diff(M.predict(model, x), M.predict(folded, x))
    assert diff < TOLERANCE
    kept = {e["batch_norm"]: e["reason"] for e in report.unfolded_batch_norms}
    folded_into = {e["batch_norm"]: e["into"] for e in report.folded_batch_norms}
    return folded, folded_into, kept


def test_batch_norm_after_fused_activation_is_kept():
    def outputs(x):
        x = L.Conv2D(4, 3, activation="relu", name="conv")(x)
        return L.BatchNormalization(name="bn")(x)

    folded, folded_into, kept = _fold_case(outputs)
    assert folded_into == {}
    assert "activation" in kept["bn"]
    assert _bn_names(folded) == {"bn"}


def test_batch_norm_on_model_input_and_on_non_channel_axis_are_kept():
    def outputs(x):
        x = L.BatchNormalization(name="bn_input")(x)
        x = L.Conv2D(4, 3, padding="same", name="conv")(x)
        return L.BatchNormalization(axis=1, name="bn_rows")(x)

    folded, folded_into, kept = _fold_case(outputs)
    assert folded_into == {}
    assert "model input" in kept["bn_input"] and "zero-pads" in kept["bn_input"]
    assert "axis" in kept["bn_rows"]
    assert _bn_names(folded) == {"bn_input", "bn_rows"}


@pytest.mark.parametrize(
    "make_linear, input_shape",
    [
        (lambda: L.Dense(5, name="linear"), (6, 6, 3)),  # Dense on a rank-4 input
        (lambda: L.Conv2D(4, 3, strides=2, name="linear"), (7, 7, 3)),
        (lambda: L.Conv2D(4, 1, strides=2, padding="same", name="linear"), (7, 7, 3)),
        (lambda: L.Conv2D(4, 2, groups=2, name="linear"), (6, 6, 6)),
        (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, name="linear"), (6, 6, 3)),
        (lambda: L.Conv1D(4, 3, dilation_rate=2, name="linear"), (9, 3)),
        (lambda: L.Conv3D(4, 2, name="linear"), (4, 3, 4, 2)),
        (lambda: L.Conv2D(4, 3, data_format="channels_first", name="linear"), (3, 7, 7)),
    ],
)
def test_batch_norm_before_a_linear_layer_folds_forward_where_exact(make_linear, input_shape):
    skip_unless_runs(make_linear(), input_shape)
    def outputs(x):
        linear = make_linear()
        axis = 1 if getattr(linear, "data_format", None) == "channels_first" else -1
        x = L.BatchNormalization(axis=axis, name="bn_before")(x)
        return L.BatchNormalization(axis=axis, name="bn_after")(linear(x))

    folded, folded_into, kept = _fold_case(outputs, input_shape)
    assert folded_into == {"bn_before": "linear", "bn_after": "linear"}
    assert kept == {}
    assert _bn_names(folded) == set()


@pytest.mark.parametrize(
    "make_linear, input_shape",
    [
        (lambda: L.Conv2D(4, 3, padding="same", name="linear"), (6, 6, 3)),
        (lambda: L.Conv1D(4, 2, padding="causal", name="linear"), (9, 3)),
        (lambda: L.DepthwiseConv2D((1, 3), padding="same", name="linear"), (6, 6, 3)),
    ],
)
def test_batch_norm_before_a_padding_convolution_is_kept(make_linear, input_shape):
    def outputs(x):
        x = L.BatchNormalization(name="bn")(L.ReLU()(x))
        return make_linear()(x)

    folded, folded_into, kept = _fold_case(outputs, input_shape)
    assert folded_into == {}
    assert "ReLU" in kept["bn"] and "zero-pads" in kept["bn"] and "'linear'" in kept["bn"]
    assert _bn_names(folded) == {"bn"}


def test_batch_norm_after_shared_conv_is_kept():
    def outputs(x):
        conv = L.Conv2D(3, 3, padding="same", name="shared_conv")
        y = L.BatchNormalization(name="bn")(conv(x))
        return conv(y)

    folded, folded_into, kept = _fold_case(outputs)
    assert folded_into == {}
    assert "shared" in kept["bn"]


def test_batch_norm_without_center_or_scale_and_dense_on_sequences_fold():
    def outputs(x):
        x = L.Reshape((36, 3))(x)
        x = L.Dense(5, name="dense_seq")(x)
        x = L.BatchNormalization(center=False, name="bn_no_center")(x)
        x = L.ReLU()(x)
        x = L.Conv1D(4, 3, use_bias=False, name="conv1d")(x)
        return L.BatchNormalization(scale=False, name="bn_no_scale")(x)

    folded, folded_into, kept = _fold_case(outputs)
    assert folded_into == {"bn_no_center": "dense_seq", "bn_no_scale": "conv1d"}
    assert kept == {}
    assert _bn_names(folded) == set()


def test_fold_rejects_subclassed_and_unbuilt_models():
    model = M.subclassed()
    with pytest.raises(UnsupportedModelError):
        fold_batch_norms(model)
    with pytest.raises(UnsupportedModelError):
        fold_batch_norms(keras.Sequential([L.Dense(2)]))


# ---------------------------------------------------------------------------
# Real models.


@pytest.fixture(scope="module")
def vww_model(vww_path):
    from keras_powerquant.loading import load_model

    return load_model(vww_path)


def test_resnet8_folds_every_batch_norm(resnet8_model, cifar_test):
    x = cifar_test[0][:64]
    folded, report = fold_batch_norms(resnet8_model)
    assert len(report.folded_batch_norms) == len(_bn_names(resnet8_model)) == 7
    assert report.unfolded_batch_norms == []
    assert _bn_names(folded) == set()
    diff = _max_abs_diff(M.predict(resnet8_model, x), M.predict(folded, x))
    assert diff < TOLERANCE, f"ResNet-8 folded differs by {diff}"


def test_vww_mobilenet_folds_every_batch_norm(vww_model):
    x = np.random.default_rng(0).random((16, 96, 96, 3)).astype("float32")
    folded, report = fold_batch_norms(vww_model)
    assert len(report.folded_batch_norms) == len(_bn_names(vww_model)) == 27
    assert report.unfolded_batch_norms == []
    assert _bn_names(folded) == set()
    into = {type(vww_model.get_layer(e["into"])).__name__ for e in report.folded_batch_norms}
    assert into == {"Conv2D", "DepthwiseConv2D"}
    diff = _max_abs_diff(M.predict(vww_model, x), M.predict(folded, x))
    assert diff < TOLERANCE, f"VWW folded differs by {diff}"


class _DoublingBlock(keras.Model):
    """A Functional model whose overridden `call` doubles what its graph computes."""

    def call(self, inputs, training=None):
        return 2.0 * super().call(inputs, training=training)


def test_nested_model_with_custom_call_stays_opaque():
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((4,))
    block = _DoublingBlock(inner_in, L.Dense(3, name="inner_dense")(inner_in), name="doubling")
    outer_in = keras.Input((4,))
    outputs = L.Dense(2, name="head")(block(outer_in))
    model = keras.Model(outer_in, outputs)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    folded, _ = fold_batch_norms(model)
    # Expanded inline, the doubling in `call` would be lost.
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert "inner_dense" not in [layer.name for layer in folded.layers]

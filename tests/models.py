"""Small deterministic Keras models for the converter tests.

Every builder returns a fresh, built model whose weights are set from a
seeded numpy generator (not Keras' initializers), so two calls with the same
seed give identical models. BatchNormalization layers get non-trivial
parameters: random gamma (some negative), beta, moving mean and variance, so
that folding is really exercised.

`stats="data"` (the default) then replaces each BatchNorm's moving mean and
variance with the statistics of its input on `reference_inputs(model)`
(uniform [0, 1) images, as a trained network's BatchNorm would hold for its
data): the data-free activation statistics (Normal(beta, gamma^2) after
BatchNorm) then describe the tensors the model really computes on such
inputs, and converted outputs can be compared with float outputs.
`stats="random"` keeps random moving statistics (folding tests).

Layer names are given explicitly so tests can refer to them.
"""

import keras
import numpy as np

L = keras.layers

BUILDERS = {}


def _builder(name):
    def register(fn):
        BUILDERS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------
# Weight initialisation.


def leaf_layers(model):
    """Distinct leaf layers of a model, nested models expanded."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, keras.Model) and not isinstance(layer, L.InputLayer)
    ]


def find_layer(model, name):
    """The leaf layer called `name`, searching nested models too."""
    for layer in leaf_layers(model):
        if layer.name == name:
            return layer
    raise KeyError(name)


def batch_norms(model):
    return [layer for layer in leaf_layers(model) if type(layer) is L.BatchNormalization]


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for layer in leaf_layers(model):
        for weight in layer.weights:
            shape = tuple(weight.shape)
            name = weight.name
            if name.endswith("kernel"):
                fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                if type(layer) is L.DepthwiseConv2D or name == "depthwise_kernel":
                    fan_in = int(np.prod(shape[:2]))
                value = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
            elif name == "bias":
                value = rng.normal(0.0, 0.1, shape)
            elif name == "gamma":
                sign = np.where(rng.random(shape) < 0.2, -1.0, 1.0)
                value = sign * rng.uniform(0.5, 1.5, shape)
            elif name == "beta":
                value = rng.normal(0.0, 0.5, shape)
            elif name == "moving_mean":
                value = rng.normal(0.0, 0.5, shape)
            elif name == "moving_variance":
                value = rng.uniform(0.25, 2.0, shape)
            else:
                value = rng.normal(0.0, 0.5, shape)
            weight.assign(value.astype(weight.dtype))


def reference_inputs(model, n=64, seed=1234):
    """Model inputs, uniform in [0, 1), in the model's input structure."""
    rng = np.random.default_rng(seed)
    structure = model._inputs_struct if hasattr(model, "_inputs_struct") else model.inputs
    if isinstance(model, keras.Sequential):
        structure = model.inputs[0]

    def make(tensor):
        return rng.random((n,) + tuple(tensor.shape[1:])).astype("float32")

    return keras.tree.map_structure(make, structure)


def _adapt_batch_norms(model, seed):
    """Moving statistics = the batch statistics of each BatchNorm's input."""
    layers = batch_norms(model)
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.momentum = 0.0
    try:
        model(reference_inputs(model, n=256, seed=seed), training=True)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum


def _finish(model, seed, stats):
    if stats not in ("data", "random"):
        raise ValueError(stats)
    _randomize(model, seed)
    if stats == "data":
        _adapt_batch_norms(model, seed + 1)
    return model


def _conv_bn(x, filters, name, kernel_size=3, strides=1, use_bias=False):
    x = L.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=use_bias, name=name)(x)
    return L.BatchNormalization(name=f"{name}_bn")(x)


# ---------------------------------------------------------------------------
# Custom layers (registered so that converted models save and load).


@keras.saving.register_keras_serializable(package="kpq_tests")
class ChannelScale(L.Layer):
    """A subclassed layer with one weight: `x * scale` per channel."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


@keras.saving.register_keras_serializable(package="kpq_tests")
class Shifted(L.Layer):
    """A subclassed layer without weights: `x + shift` (config from Keras' auto-config)."""

    def __init__(self, shift, **kwargs):
        super().__init__(**kwargs)
        self.shift = float(shift)

    def call(self, inputs):
        return inputs + self.shift


class Opaque(L.Layer):
    """A subclassed layer whose config cannot round-trip (it holds a function)."""

    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def call(self, inputs):
        return self.fn(inputs)


# ---------------------------------------------------------------------------
# Builders.


@_builder("resnet")
def resnet_style(seed=0, stats="data"):
    """Conv+BN+ReLU stem, identity and projection residual blocks, GAP, Dense softmax."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = _conv_bn(inputs, 8, "stem")
    x = L.ReLU(name="stem_relu")(x)
    # Identity block: Activation("relu") after the first conv, Add, ReLU.
    y = _conv_bn(x, 8, "block1_conv1")
    y = L.Activation("relu", name="block1_relu1")(y)
    y = _conv_bn(y, 8, "block1_conv2")
    x = L.Add(name="block1_add")([x, y])
    x = L.ReLU(name="block1_relu2")(x)
    # Projection block: stride 2, 1x1 conv + BN on the shortcut.
    y = _conv_bn(x, 16, "block2_conv1", strides=2)
    y = L.ReLU(name="block2_relu1")(y)
    y = _conv_bn(y, 16, "block2_conv2")
    shortcut = _conv_bn(x, 16, "block2_proj", kernel_size=1, strides=2)
    x = L.Add(name="block2_add")([shortcut, y])
    x = L.Activation("relu", name="block2_relu2")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(10, activation="softmax", name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="resnet_style"), seed, stats)


@_builder("mobilenet")
def mobilenet_style(seed=0, stats="data"):
    """Conv+BN+ReLU6, depthwise (multiplier 1 and 2)+BN+ReLU6, pointwise, Dense+BN."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = _conv_bn(inputs, 8, "stem", strides=2)
    x = L.ReLU(max_value=6.0, name="stem_relu6")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw1")(x)
    x = L.BatchNormalization(name="dw1_bn")(x)
    x = L.Activation("relu6", name="dw1_relu6")(x)
    x = _conv_bn(x, 12, "pw1", kernel_size=1)
    x = L.ReLU(6.0, name="pw1_relu6")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw2")(x)
    x = L.BatchNormalization(name="dw2_bn")(x)
    x = L.ReLU(max_value=6.0, name="dw2_relu6")(x)
    x = _conv_bn(x, 16, "pw2", kernel_size=1)
    x = L.ReLU(max_value=6.0, name="pw2_relu6")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(16, name="fc")(x)
    x = L.BatchNormalization(name="fc_bn")(x)
    x = L.ReLU(name="fc_relu")(x)
    outputs = L.Dense(4, activation="softmax", name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="mobilenet_style"), seed, stats)


@_builder("nested")
def nested(seed=0, stats="data"):
    """A Sequential stem, a Functional backbone (holding a Sequential), a shared nested model."""
    stem = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv"),
            L.BatchNormalization(name="stem_bn"),
            L.ReLU(name="stem_relu"),
        ],
        name="stem",
    )
    inner = keras.Sequential(
        [
            keras.Input((12, 12, 8)),
            L.Conv2D(8, 3, padding="same", name="inner_conv"),
            L.BatchNormalization(name="inner_bn"),
        ],
        name="inner_block",
    )
    backbone_in = keras.Input((12, 12, 8))
    y = _conv_bn(backbone_in, 8, "bb_conv1")
    y = L.ReLU(name="bb_relu1")(y)
    y = inner(y)
    y = L.Add(name="bb_add")([backbone_in, y])
    y = L.ReLU(name="bb_relu2")(y)
    backbone = keras.Model(backbone_in, y, name="backbone")

    shared_in = keras.Input((12, 12, 8))
    s = _conv_bn(shared_in, 8, "shared_conv", kernel_size=1)
    s = L.ReLU(name="shared_relu")(s)
    shared = keras.Model(shared_in, s, name="shared_head")

    inputs = keras.Input((12, 12, 3), name="image")
    a = stem(inputs)
    b = backbone(a)
    c1 = shared(b)
    c2 = shared(a)
    x = L.Concatenate(name="concat")([c1, c2])
    x = _conv_bn(x, 16, "head_conv", strides=2)
    x = L.ReLU(name="head_relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(5, activation="softmax", name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="nested"), seed, stats)


@_builder("multi_io")
def multi_io(seed=0, stats="data", structure="dict"):
    """Two inputs (image, features) and two outputs (class, score), Concatenate.

    `structure` is "dict" (dict inputs and outputs) or "list".
    """
    image = keras.Input((8, 8, 3), name="image")
    features = keras.Input((6,), name="features")
    x = _conv_bn(image, 8, "img_conv")
    x = L.ReLU(name="img_relu")(x)
    x = L.GlobalAveragePooling2D(name="img_pool")(x)
    f = L.Dense(8, name="feat_dense")(features)
    f = L.BatchNormalization(name="feat_bn")(f)
    f = L.ReLU(name="feat_relu")(f)
    x = L.Concatenate(name="concat")([x, f])
    x = L.Dense(16, name="joint")(x)
    x = L.BatchNormalization(name="joint_bn")(x)
    x = L.ReLU(name="joint_relu")(x)
    label = L.Dense(3, activation="softmax", name="label")(x)
    score = L.Dense(1, name="score")(x)
    if structure == "dict":
        model = keras.Model(
            {"image": image, "features": features}, {"label": label, "score": score}, name="multi_io"
        )
    elif structure == "list":
        model = keras.Model([image, features], [label, score], name="multi_io_list")
    else:
        raise ValueError(structure)
    return _finish(model, seed, stats)


@_builder("activations")
def activations(seed=0, stats="data"):
    """Every form of activation the converter handles, and an Add without ReLU."""
    inputs = keras.Input((10, 10, 3), name="image")
    x = _conv_bn(inputs, 8, "c_relu_layer")
    x = L.ReLU(name="relu_layer")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c_fused_relu")(x)
    x = _conv_bn(x, 8, "c_relu6")
    x = L.ReLU(max_value=6.0, name="relu6")(x)
    x = _conv_bn(x, 8, "c_relu_max")
    x = L.ReLU(max_value=3.0, name="relu_max3")(x)
    x = _conv_bn(x, 8, "c_leaky")
    x = L.LeakyReLU(negative_slope=0.1, name="leaky")(x)
    x = _conv_bn(x, 8, "c_sigmoid")
    x = L.Activation("sigmoid", name="sigmoid")(x)
    x = _conv_bn(x, 8, "c_tanh")
    t = L.Activation("tanh", name="tanh")(x)
    x = _conv_bn(t, 8, "c_swish")
    s = L.Activation("swish", name="swish")(x)
    r = _conv_bn(s, 8, "c_res")
    x = L.Add(name="add_no_relu")([s, r])
    x = L.Conv2D(8, 3, padding="same", name="after_add")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(16, activation="relu", name="fc_fused_relu")(x)
    outputs = L.Dense(5, activation="softmax", name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="activations"), seed, stats)


@_builder("sequential")
def sequential(seed=0, stats="data"):
    """A Sequential model started with keras.Input."""
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Conv2D(8, 3, use_bias=False, name="conv1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(name="relu1"),
            L.MaxPooling2D(name="pool1"),
            L.Conv2D(12, 3, name="conv2"),
            L.BatchNormalization(name="bn2"),
            L.Activation("relu", name="relu2"),
            L.Flatten(name="flatten"),
            L.Dense(16, activation="relu", name="fc"),
            L.Dense(4, activation="softmax", name="classifier"),
        ],
        name="sequential_model",
    )
    return _finish(model, seed, stats)


@_builder("unsupported")
def unsupported(seed=0, stats="data"):
    """Layers that must stay float, BatchNorms that must not fold, custom layers.

    - `sep` SeparableConv2D (split: `sep_bn` folds into `sep_pointwise`),
    - `dw1d` DepthwiseConv1D after a Reshape, computing in float16 (+
      `dw1d_bn`, foldable; only float32 layers are converted, so it stays
      float with its BatchNorm folded in),
    - `grouped` Conv2D(groups=2) (+ `grouped_bn`, foldable),
    - `bn_after_relu` follows an activation and precedes a 3x3 "same"
      convolution (folding it forward would be inexact at the borders),
    - `branch_bn` follows `branch_conv`, whose output also feeds an Add,
    - `scale` (ChannelScale) and `shift` (Shifted) are custom layers.
    """
    inputs = keras.Input((8, 8, 3), name="image")
    x = _conv_bn(inputs, 8, "stem")
    x = L.ReLU(name="stem_relu")(x)
    x = L.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    x = L.BatchNormalization(name="sep_bn")(x)
    x = L.ReLU(name="sep_relu")(x)
    x = L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(x)
    x = L.BatchNormalization(name="grouped_bn")(x)
    x = L.ReLU(name="grouped_relu")(x)
    x = ChannelScale(name="scale")(x)
    x = L.Conv2D(8, 1, name="after_scale")(x)
    x = L.ReLU(name="after_scale_relu")(x)
    x = L.BatchNormalization(name="bn_after_relu")(x)
    c = L.Conv2D(8, 3, padding="same", name="branch_conv")(x)
    b = L.BatchNormalization(name="branch_bn")(c)
    x = L.Add(name="branch_add")([c, b])
    x = L.ReLU(name="branch_relu")(x)
    x = Shifted(0.25, name="shift")(x)
    x = L.Reshape((64, 8), name="to_1d")(x)
    x = L.DepthwiseConv1D(3, padding="same", name="dw1d", dtype="mixed_float16")(x)
    x = L.BatchNormalization(name="dw1d_bn")(x)
    x = L.ReLU(name="dw1d_relu")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    outputs = L.Dense(3, activation="softmax", name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="unsupported"), seed, stats)


@_builder("layer_types")
def layer_types(seed=0, stats="data"):
    """Each linear layer type, BatchNorms folded backward and forward.

    - `input_bn` normalizes the model input and folds forward into `stem`
      (a "valid" 3x3 Conv2D), whose own `stem_bn` folds backward;
    - `grouped`: Conv2D(groups=2); `conv3d`: Conv3D on the feature map
      reshaped to (6, 6, 2, 4); `causal`: a dilated causal Conv1D;
    - `pre_bn` follows a ReLU and folds forward into `conv1d_valid`;
      `pad_bn` precedes a "same" Conv1D and stays (folding it is inexact);
    - `seq_dense`: Dense on a sequence (rank-3 input), with
      `dense_input_bn` folded forward and `seq_dense_bn` backward.
    """
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.BatchNormalization(name="input_bn")(inputs)
    x = L.Conv2D(8, 3, name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    x = L.Conv2D(8, 3, padding="same", groups=2, use_bias=False, name="grouped")(x)
    x = L.BatchNormalization(name="grouped_bn")(x)
    x = L.ReLU(name="grouped_relu")(x)
    x = L.Reshape((6, 6, 2, 4), name="to_3d")(x)
    x = L.Conv3D(6, (3, 3, 2), padding="same", name="conv3d")(x)
    x = L.BatchNormalization(name="conv3d_bn")(x)
    x = L.ReLU(name="conv3d_relu")(x)
    x = L.Reshape((36, 12), name="to_1d")(x)
    x = L.Conv1D(8, 3, padding="causal", dilation_rate=2, name="causal")(x)
    x = L.BatchNormalization(name="causal_bn")(x)
    x = L.ReLU(name="causal_relu")(x)
    x = L.BatchNormalization(name="pre_bn")(x)
    x = L.Conv1D(8, 3, name="conv1d_valid")(x)
    x = L.ReLU(name="conv1d_valid_relu")(x)
    x = L.BatchNormalization(name="pad_bn")(x)
    x = L.Conv1D(8, 3, padding="same", name="conv1d_same")(x)
    x = L.ReLU(name="conv1d_same_relu")(x)
    x = L.BatchNormalization(name="dense_input_bn")(x)
    x = L.Dense(6, name="seq_dense")(x)
    x = L.BatchNormalization(name="seq_dense_bn")(x)
    x = L.ReLU(name="seq_dense_relu")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    outputs = L.Dense(4, activation="softmax", name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="layer_types"), seed, stats)


def with_opaque_layer(seed=0, stats="data"):
    """Conv+BN+ReLU, an `Opaque` custom layer, Conv+BN+ReLU, Dense (not in BUILDERS:
    its converted model cannot be saved)."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = _conv_bn(inputs, 8, "conv1")
    x = L.ReLU(name="relu1")(x)
    x = Opaque(lambda t: t * 0.5, name="opaque")(x)
    x = _conv_bn(x, 8, "conv2")
    x = L.ReLU(name="relu2")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(3, name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="opaque_model"), seed, stats)


# Expected BatchNorm folding of each builder's model: folded `{bn: linear}`,
# and kept `{bn: words of the reason}` (from the models' design above).
EXPECTED_FOLDS = {
    "resnet": {
        f"{n}_bn": n
        for n in ("stem", "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block2_proj")
    },
    "mobilenet": {f"{n}_bn": n for n in ("stem", "dw1", "pw1", "dw2", "pw2", "fc")},
    "nested": {
        "stem_bn": "stem_conv",
        "bb_conv1_bn": "bb_conv1",
        "inner_bn": "inner_conv",
        "head_conv_bn": "head_conv",
    },
    "multi_io": {"img_conv_bn": "img_conv", "feat_bn": "feat_dense", "joint_bn": "joint"},
    "activations": {
        f"{n}_bn": n
        for n in (
            "c_relu_layer", "c_relu6", "c_relu_max", "c_leaky", "c_sigmoid", "c_tanh", "c_swish", "c_res"
        )
    },
    "sequential": {"bn1": "conv1", "bn2": "conv2"},
    "unsupported": {"stem_bn": "stem", "sep_bn": "sep_pointwise", "grouped_bn": "grouped", "dw1d_bn": "dw1d"},
    "layer_types": {
        "input_bn": "stem",
        "stem_bn": "stem",
        "grouped_bn": "grouped",
        "conv3d_bn": "conv3d",
        "causal_bn": "causal",
        "pre_bn": "conv1d_valid",
        "dense_input_bn": "seq_dense",
        "seq_dense_bn": "seq_dense",
    },
}
EXPECTED_KEPT = {
    "resnet": {},
    "mobilenet": {},
    "nested": {"shared_conv_bn": "called more than once"},
    "multi_io": {},
    "activations": {},
    "sequential": {},
    "unsupported": {
        "bn_after_relu": "zero-pads",
        "branch_bn": "other consumers",
    },
    "layer_types": {"pad_bn": "zero-pads"},
}


class Subclassed(keras.Model):
    """A subclassed model: its computation is Python code, not a layer graph."""

    def __init__(self):
        super().__init__()
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


def subclassed():
    """A built `Subclassed` model."""
    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    return model


# Each form of PowerQuantActivation's inference graph: (activation, exponent, signed).
ACTIVATION_FORMS = [
    ("linear", 0.62, True),  # Sign, Abs, Log, Exp
    ("linear", 0.5, True),  # Sign, Abs, Sqrt, Square
    ("relu", 0.7, False),  # Maximum, Log, Exp
    ("relu", 0.25, False),  # Relu, Sqrt, Square
    ("sigmoid", 1.0, False),  # Sigmoid, FakeQuant
    ("tanh", 1.0, True),  # Tanh, narrow-range FakeQuant
]


def activation_forms_model():
    """`PowerQuantActivation`s in a chain, one per entry of ACTIVATION_FORMS (4 bits, clip 2); input "features" (6,)."""
    from keras_powerquant.layers import PowerQuantActivation

    inputs = keras.Input((6,), name="features")
    h = inputs
    for activation, exponent, signed in ACTIVATION_FORMS:
        h = PowerQuantActivation(activation, 4, exponent, 2.0, signed)(h)
    return keras.Model(inputs, h, name="activation_forms")


def build(name, seed=0, stats="data", **kwargs):
    """The model built by `BUILDERS[name]`."""
    return BUILDERS[name](seed=seed, stats=stats, **kwargs)


def predict(model, inputs):
    """Model outputs as numpy, flattened to a list (any output structure)."""
    structure = getattr(model, "_inputs_struct", None)
    if isinstance(structure, list) and len(structure) == 1 and isinstance(inputs, np.ndarray):
        inputs = [inputs]  # legacy models declare their single input as a list
    outputs = model(inputs, training=False)
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def weights_of(model):
    """All weights of a model (nested models included), as numpy copies."""
    return [np.array(w.numpy()) for w in model.weights]


def keras_ops_model(seed=0, stats="data"):
    """Non-layer `keras.ops` calls in a Functional graph, as keras.applications makes them.

    `keras.ops.relu` and `keras.ops.clip(x, 0, 6)` feed quantized layers (so
    they become quantized activations), `keras.ops.add` joins a residual,
    `keras.ops.mean` feeds a squeeze-and-excitation gate built like
    MobileNetV3's hard sigmoid (`ReLU(6)(x + 3) * (1 / 6)`), `x * gate`
    multiplies it in, and `keras.ops.gelu` (tanh approximation) feeds the head.
    """
    ops = keras.ops
    inputs = keras.Input((8, 8, 3), name="image")
    x = _conv_bn(inputs, 8, "c1")
    x = ops.relu(x)
    r = _conv_bn(x, 8, "c2")
    x = ops.clip(ops.add(x, r), 0.0, 6.0)
    x = _conv_bn(x, 8, "c3")
    gate = L.Conv2D(8, 1, name="gate_conv")(ops.mean(x, axis=(1, 2), keepdims=True))
    gate = L.ReLU(6.0, name="gate_relu6")(gate + 3.0) * (1.0 / 6.0)
    signed_product = _conv_bn(x * gate, 8, "c_signed")
    unsigned_product = _conv_bn(ops.relu(signed_product) * gate, 8, "c_unsigned")
    x = L.GlobalAveragePooling2D(name="pool")(ops.gelu(unsigned_product))
    outputs = L.Dense(5, name="classifier")(x)
    return _finish(keras.Model(inputs, outputs, name="keras_ops"), seed, stats)


def applications_activations_model(seed=0, stats="data"):
    """The activations keras.applications uses, each in front of a quantized layer.

    swish (EfficientNet), hard_swish (MobileNetV3), exact gelu (ConvNeXt),
    the tanh-approximate `keras.ops.gelu`, LeakyReLU, PReLU, and
    squeeze-and-excitation gates: `Multiply([x, sigmoid(conv(pool(x)))])`.
    """
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Activation("swish", name="swish")(_conv_bn(inputs, 8, "c_in"))
    x = L.Activation("hard_swish", name="hard_swish")(_conv_bn(x, 8, "c_swish"))
    x = L.Activation("gelu", name="gelu_exact")(_conv_bn(x, 8, "c_hard_swish"))
    x = keras.ops.gelu(_conv_bn(x, 8, "c_gelu"), approximate=True)
    x = L.LeakyReLU(negative_slope=0.1, name="leaky")(_conv_bn(x, 8, "c_gelu_tanh"))
    x = L.PReLU(shared_axes=[1, 2], name="prelu")(_conv_bn(x, 8, "c_leaky"))
    x = _conv_bn(x, 8, "c_prelu")
    squeezed = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    gate = L.Conv2D(8, 1, activation="sigmoid", name="se_gate")(squeezed)
    x = L.Multiply(name="se_scale")([x, gate])
    x = L.ReLU(name="relu")(_conv_bn(x, 8, "c_se"))
    x = L.Multiply(name="se_scale_relu")([x, gate])
    x = _conv_bn(x, 8, "c_se_relu")
    outputs = L.Dense(5, name="classifier")(L.GlobalAveragePooling2D(name="pool")(x))
    return _finish(keras.Model(inputs, outputs, name="applications_activations"), seed, stats)

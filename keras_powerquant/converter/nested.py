"""Kernel layers nested inside layers the graph rewrite cannot see into.

A `MultiHeadAttention` computes with four `EinsumDense` projections, a
user's subclassed block with the `Dense`, `Conv2D`... layers it holds as
attributes: none is a call of the model's graph, so the graph rewrite
(`plan`, `builder`) leaves them float. This module finds them by walking
the outer layer's attributes (`keras_internals.sublayer_paths`), fits
their kernels like the graph's layers, fits a quantizer of each one's own
input, and builds the outer layer as a `PowerQuantSublayers`: its `call`
unchanged, each nested kernel layer replaced by its PowerQuant layer behind
that input quantizer (`PowerQuantInputQuantized`).

Statistics of a nested layer's input (docs/method.md, "Nested layers"):

- calibrated: the inputs the nested layer receives while the float model
  runs on the calibration data (its `call` is hooked during the pass);
- data-free: the outer layer is run, in float, on samples of its inputs'
  data-free statistics (a LayerNormalization before a MultiHeadAttention
  gives them), its nested layers' inputs recorded; where its inputs have
  no data-free statistics, the nested layers' inputs stay float (weight-only)
  and the report says why.

Nested layers are quantized at the requested bit widths: the first/last
rule (`first_last_bits`) applies to the model graph's own layers.

Weight-only layers (`registry.WEIGHT_ONLY_LAYER_TYPES`: Embedding,
SimpleRNN, LSTM, GRU) are replaced here too, nested or not: one of the
model graph is a `NestedKernel` of itself (`path == ()`, `in_graph`), built
as its PowerQuant layer in the graph's place. Their inputs are never
quantized, so they need no input samples.
"""

import contextlib
import dataclasses
from typing import Optional

import keras
import numpy as np

from keras_powerquant import keras_internals
from keras_powerquant.converter.calibration import ReservoirSampler
from keras_powerquant.converter.plan import assign_positions
from keras_powerquant.converter.registry import kernel_type
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.converter.registry import weight_only_type
from keras_powerquant.converter.statistics import DATA_FREE_TAIL_DOF
from keras_powerquant.layers import PowerQuantActivation
from keras_powerquant.layers import PowerQuantInputQuantized
from keras_powerquant.layers import PowerQuantSublayers
from keras_powerquant.quantization.search import ActivationErrorModel
from keras_powerquant.quantization.search import FAST_ACTIVATION_EXPONENTS
from keras_powerquant.quantization.search import fit_activation_models
from keras_powerquant.quantization.search import fit_weight_model
from keras_powerquant.quantization.search import WeightErrorModel

# Values sampled per nested layer input (as `record_samples` keeps per tensor).
SAMPLES_PER_INPUT = 20_000
# Data-free: how many samples of the outer layer's inputs it is run on.
DATA_FREE_BATCH = 64
# Data-free: the length of an axis the model leaves unknown (a sequence).
DATA_FREE_UNKNOWN_LENGTH = 16

KERNEL_WEIGHT_SUFFIXES = ("kernel", "embeddings")


def kernel_parameters(layer, own=False):
    """How many kernel values a layer holds (weights named `*kernel`, `*embeddings`); `own`: not its sublayers'."""
    weights = keras_internals.own_variables(layer).values() if own else layer.weights
    return int(
        sum(np.prod(w.shape) for w in weights if w.path.split("/")[-1].endswith(KERNEL_WEIGHT_SUFFIXES))
    )


@dataclasses.dataclass(eq=False)
class NestedKernel:
    """One kernel layer inside an outer layer, to quantize.

    Attributes:
        owner: the outer layer (of the original model).
        path: its attribute path in `owner` (`keras_internals.sublayer_paths`).
        layer: the nested Keras layer.
        kernel, bias: its weights in the registry's layout.
        weight_bits, input_bits: bit widths (`input_bits` None: weight-only).
        fit, clip_fraction: the fitted kernel exponent and clip.
        input_fit: the fitted `ActivationFit` of its input, or None.
        rule: where its input statistics came from.
        reason: why its input stays float, or None.
    """

    owner: keras.layers.Layer
    path: tuple
    layer: keras.layers.Layer
    kernel: np.ndarray
    bias: Optional[np.ndarray]
    weight_bits: int
    input_bits: Optional[int]
    fit: object = None
    clip_fraction: float = 1.0
    input_fit: object = None
    rule: str = ""
    reason: Optional[str] = None

    @property
    def name(self):
        return self.layer.name if self.in_graph else f"{self.owner.name}/{self.layer.name}"

    @property
    def in_graph(self):
        """Whether the layer is a call of the model graph itself (a weight-only layer), not nested in one."""
        return self.path == ()

    @property
    def entry(self):
        return kernel_type(self.layer)


@dataclasses.dataclass
class NestedPlan:
    """The nested kernel layers of a model.

    Attributes:
        kernels: `NestedKernel`s, by outer layer in graph order.
        float_layers: `(owner, name, layer, reason)` of nested kernel layers that stay float.
        owners: id(outer layer) -> its `NestedKernel`s.
    """

    kernels: list
    float_layers: list
    owners: dict
    called: list = dataclasses.field(default_factory=list)  # ids of nested layers, in order of first call

    def rows_of(self, owner):
        """`(name, nested_kernel_or_None, layer, reason)` of `owner`'s nested kernel layers, in call order."""
        order = {layer_id: i for i, layer_id in enumerate(self.called)}
        kernels = sorted(self.owners.get(id(owner), []), key=lambda k: order.get(id(k.layer), len(order)))
        rows = [(k.name, k, k.layer, None) for k in kernels]
        rows += [(name, None, layer, why) for o, name, layer, why in self.float_layers if o is owner]
        return rows


def _nested_float_reason(layer):
    entry = kernel_type(layer)
    if isinstance(layer, keras.Model):
        return "a model inside a layer: its graph calls its layers, which are not replaced there"
    if entry is None or entry.quantized_class is None:
        return f"no PowerQuant layer for {type(layer).__name__}"
    reason = entry.float_reason(layer)
    if reason is not None:
        return reason
    if not layer.built:
        return "not built"
    if keras.backend.standardize_dtype(layer.compute_dtype) != "float32":
        return f"compute dtype {layer.compute_dtype} (only float32 is converted)"
    return None


def _has_kernel_inside(layer):
    return kernel_parameters(layer) > 0


def plan_nested(plan, wbits, abits, graph=None, quantize_first_last=False):
    """Finds the kernel layers inside the plan's float layers; takes those layers off `plan.float_layers`.

    An outer layer stays in `plan.float_layers` only where it holds kernel
    weights of its own (its nested layers are then listed besides it).
    With `graph`, a graph layer is first (last) only with no quantized layer,
    nested ones included, before (after) it: its bits follow.
    """
    kernels, float_layers, owners, kept = [], [], {}, []
    for owner, reason in plan.float_layers:
        if weight_only_type(owner) is not None:
            why = _nested_float_reason(owner)
            if why is not None:
                kept.append((owner, why))
                continue
            nested = _nested_kernel(owner, (), owner, wbits, abits)
            kernels.append(nested)
            owners[id(owner)] = [nested]
            continue
        if linear_type(owner) is not None or isinstance(owner, keras.Model) or not _has_kernel_inside(owner):
            kept.append((owner, reason))
            continue
        reached = set()
        for path, sub in keras_internals.sublayer_paths(owner):
            reached.add(id(sub))
            if any(isinstance(parent, keras.Model) or kernel_type(parent) is not None
                   for parent in _parents(owner, path)):
                continue  # inside a nested model or kernel layer (an RNN's cell): its parent row covers it
            own = not isinstance(sub, keras.Model) and weight_only_type(sub) is None
            if kernel_parameters(sub, own=own) == 0:
                continue
            why = _nested_float_reason(sub)
            name = f"{owner.name}/{sub.name}"
            if why is not None:
                float_layers.append((owner, name, sub, why))
                continue
            nested = _nested_kernel(owner, path, sub, wbits, abits)
            kernels.append(nested)
            owners.setdefault(id(owner), []).append(nested)
        for sub in keras_internals.all_layers(owner):
            if id(sub) not in reached and kernel_parameters(sub, own=True):
                float_layers.append(
                    (owner, f"{owner.name}/{sub.name}", sub, "not reachable through attributes, lists or dicts")
                )
        if kernel_parameters(owner, own=True):
            kept.append((owner, f"its own kernel weights are no layer's: {reason}"))
        elif id(owner) not in owners:
            # Nothing inside converts: the outer layer's reason stays the row's.
            kept.append((owner, reason))
            float_layers = [row for row in float_layers if row[0] is not owner]
    plan.float_layers[:] = kept
    if graph is not None and owners:
        _reposition(plan, graph, owners, wbits, abits, quantize_first_last)
    return NestedPlan(kernels, float_layers, owners)


def _nested_kernel(owner, path, layer, wbits, abits):
    """The `NestedKernel` of `layer` at `path` in `owner`; a weight-only layer's input stays float."""
    entry = kernel_type(layer)
    if weight_only_type(layer) is not None:
        kernel, bias = entry.weights(layer)
        abits = None
    else:
        kernel = entry.stored_kernel(layer, keras.ops.convert_to_numpy(layer.kernel))
        bias = getattr(layer, "bias", None)
        bias = None if bias is None else entry.stored_bias(layer, keras.ops.convert_to_numpy(bias))
    return NestedKernel(owner, path, layer, kernel.astype(np.float32), bias, wbits, abits)


def _reposition(plan, graph, owners, wbits, abits, quantize_first_last):
    """Redoes `plan`'s first/last positions counting the outer layers of quantized nested layers."""
    candidates = {layer_plan.op: {} for layer_plan in plan.layers.values()}
    candidates.update({op: {} for op in graph.ops if id(op.layer) in owners})
    assign_positions(graph, candidates)
    for layer_plan in plan.layers.values():
        where = candidates[layer_plan.op]
        position = "+".join(p for p in ("first", "last") if where[p]) or None
        if position == layer_plan.position:
            continue
        layer_plan.position = position
        if position is None and not quantize_first_last:
            layer_plan.weight_bits = wbits
            layer_plan.input_bits = abits
    by_name = {layer_plan.layer.name: layer_plan for layer_plan in plan.layers.values()}
    for quantizer in plan.quantizers.values():
        bits = [by_name[name].input_bits for name in quantizer.consumers if by_name[name].input_bits is not None]
        if bits:
            quantizer.bits = min(bits)


def _parents(owner, path):
    value, parents = owner, []
    for step in path[:-1]:
        value = keras_internals.sublayer_at(value, (step,))
        if isinstance(value, keras.layers.Layer):
            parents.append(value)
    return parents


@contextlib.contextmanager
def recording(nested_plan):
    """Records each nested kernel layer's inputs while the original model runs; yields the samplers."""
    samplers, undo = {}, []
    layers, called = {}, set(nested_plan.called)
    for i, kernel in enumerate(nested_plan.kernels):
        samplers[id(kernel)] = ReservoirSampler(SAMPLES_PER_INPUT, seed=1000 + i)
        layers.setdefault(id(kernel.layer), []).append(kernel)

    def hook_of(kernels):
        def hook(args, kwargs):
            value = args[0] if args else next(iter(kwargs.values()))
            array = keras.ops.convert_to_numpy(value)
            if id(kernels[0].layer) not in called:
                called.add(id(kernels[0].layer))
                nested_plan.called.append(id(kernels[0].layer))
            for kernel in kernels:
                samplers[id(kernel)].add(array)

        return hook

    try:
        for kernels in layers.values():
            undo.append(keras_internals.call_hook(kernels[0].layer, hook_of(kernels)))
        yield samplers
    finally:
        for step in undo:
            step()


def data_free_samples(nested_plan, graph, stats):
    """Runs each outer layer on samples of its inputs' data-free statistics; returns the recorded samplers.

    Sets `rule` (or `reason`) of each nested kernel. A weight-only layer
    (`registry.WeightOnlyLayerType`) needs no input statistics: it is not run.
    """
    by_owner = {}
    for kernel in nested_plan.kernels:
        if weight_only_type(kernel.layer) is not None:
            kernel.rule = "weight-only: its input stays float"
            continue
        by_owner.setdefault(id(kernel.owner), []).append(kernel)
    with recording(nested_plan) as samplers:
        for kernels in by_owner.values():
            owner = kernels[0].owner
            op = graph.calls(owner)[0]
            inputs, why = _sampled_inputs(op, stats)
            for kernel in kernels:
                kernel.rule = f"data-free: '{owner.name}' run on its inputs' statistics ({why})"
            if inputs is None:
                for kernel in kernels:
                    kernel.rule, kernel.reason = why, f"no data-free statistics ({why}); pass calibration data"
                continue
            args, kwargs = op.call_arguments(inputs)
            owner(*args, **kwargs)
    return samplers


def _sampled_inputs(op, stats):
    """Values for each of the op's input keys drawn from their statistics, or `(None, why)`."""
    values, rules = {}, []
    rng = np.random.default_rng(0)
    for key, tensor in zip(op.input_keys, op.input_tensors):
        if key in values:
            continue
        tensor_stats = stats.get(key)
        if tensor_stats is None or tensor_stats.gaussians is None:
            return None, tensor_stats.rule if tensor_stats is not None else "unknown input"
        shape = [DATA_FREE_BATCH] + [DATA_FREE_UNKNOWN_LENGTH if d is None else d for d in tensor.shape[1:]]
        channels = shape[-1]
        if tensor_stats.gaussians.channels != channels:
            return None, f"{tensor_stats.rule}: channel statistics do not match its shape"
        count = int(np.prod(shape[:-1]))
        # Quantiles, (channels, n), shuffled per channel: channels independent across positions.
        samples = tensor_stats.gaussians.samples(total=count * channels, tail_dof=DATA_FREE_TAIL_DOF)
        samples = rng.permuted(samples, axis=1)[:, :count]
        values[key] = np.ascontiguousarray(samples.T.reshape(shape), dtype=np.float32)
        rules.append(tensor_stats.rule)
    return {k: keras.ops.convert_to_tensor(v) for k, v in values.items()}, ", ".join(dict.fromkeys(rules))


def fit(nested_plan, samplers, method, scope, per_channel, p, bounds, clip, fast, shared_exponent=None):
    """Fits each nested kernel and its input quantizer.

    With scope "network", kernels take the graph's shared exponent
    (`shared_exponent`), activations share one exponent among themselves.
    """
    for kernel in nested_plan.kernels:
        channel_ndim = kernel.entry.channel_ndim if per_channel else 0
        model = WeightErrorModel(kernel.kernel, kernel.weight_bits, channel_ndim, p)
        if method == "uniform":
            kernel.fit = fit_weight_model(model, exponent=1.0, clip=clip)
        elif scope == "network" and shared_exponent is not None:
            kernel.fit = fit_weight_model(model, exponent=shared_exponent, clip=clip)
        else:
            kernel.fit = fit_weight_model(model, bounds, clip=clip)
        kernel.clip_fraction = kernel.fit.clip
    fittable = []
    for kernel in nested_plan.kernels:
        if kernel.input_bits is None or kernel.reason is not None:
            continue
        values = samplers[id(kernel)].values
        if values.size == 0:
            kernel.reason = "its outer layer never called it on the calibration data"
            continue
        fittable.append((kernel, ActivationErrorModel(values, kernel.input_bits, True, p)))
    fits = fit_activation_models(
        [model for _, model in fittable],
        bounds,
        exponent=1.0 if method == "uniform" else None,
        shared=scope == "network",
        choices=FAST_ACTIVATION_EXPONENTS if fast else None,
    )
    for (kernel, _), activation_fit in zip(fittable, fits):
        kernel.input_fit = activation_fit


def _replacement(kernel, per_channel, name=None):
    entry, layer = kernel.entry, kernel.layer
    # A weight-only layer's arguments hold its activation and use_bias (an Embedding has neither).
    layer_arguments = {} if weight_only_type(layer) is not None else {
        "activation": keras.activations.serialize(layer.activation), "use_bias": kernel.bias is not None
    }
    new = entry.quantized_class(
        name=name or layer.name,
        weight_bits=kernel.weight_bits,
        weight_exponent=kernel.fit.exponent,
        per_channel=per_channel,
        **layer_arguments,
        **entry.quantized_arguments(layer),
    )
    if kernel.input_fit is None:
        return new, new
    quantizer = PowerQuantActivation(
        activation="linear",
        bits=kernel.input_bits,
        exponent=kernel.input_fit.exponent,
        clip=kernel.input_fit.clip,
        signed=True,
        name=f"{layer.name}_input_quantizer",
    )
    return PowerQuantInputQuantized(quantizer, new, name=f"{layer.name}_quantized_input"), new


def wrapped_clone(owner, name, kernels, per_channel):
    """`(wrapper, set_weights)`: a `PowerQuantSublayers` of a clone of `owner`, and the function that fills
    its weights once it has been called (the outer layer's own, its float sublayers', the quantized codes).

    For a weight-only layer of the model graph (`NestedKernel.in_graph`), the wrapper is its PowerQuant layer.
    """
    if len(kernels) == 1 and kernels[0].in_graph:
        (kernel,) = kernels
        _, new = _replacement(kernel, per_channel, name)

        def set_float_weights():
            entry = kernel.entry
            new.set_float_weights(
                entry.quantized_kernel(owner, kernel.kernel), entry.quantized_bias(owner, kernel.bias),
                kernel.clip_fraction,
            )

        return new, set_float_weights
    clone = owner.__class__.from_config(owner.get_config())
    replacements, kernel_layers = [], []
    for kernel in kernels:
        outer, new = _replacement(kernel, per_channel)
        shape = keras_internals.build_input_shape(kernel.layer)
        replacements.append({"path": kernel.path, "layer": outer, "input_shape": shape})
        kernel_layers.append((kernel, new))
    wrapper = PowerQuantSublayers(clone, replacements, name=name)

    def set_weights():
        replaced = {kernel.path for kernel in kernels}
        keras_internals.set_own_variables(clone, keras_internals.own_variables(owner))
        for path, sub in keras_internals.sublayer_paths(owner):
            if path in replaced or any(path[: len(r)] == r for r in replaced):
                continue
            keras_internals.set_own_variables(
                keras_internals.sublayer_at(clone, path), keras_internals.own_variables(sub)
            )
        for kernel, new in kernel_layers:
            entry = kernel.entry
            new.set_float_weights(
                entry.quantized_kernel(kernel.layer, kernel.kernel),
                entry.quantized_bias(kernel.layer, kernel.bias),
                kernel.clip_fraction,
            )

    return wrapper, set_weights

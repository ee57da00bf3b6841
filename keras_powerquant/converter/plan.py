"""The conversion plan: what is quantized, at which bit width, and where.

Weights: every linear layer whose type has a PowerQuant layer in
`converter.registry` becomes that layer. Activations: each quantized
layer's input must be quantized. When that input is an activation's
output, reached through layers that keep values on the quantization grid
(pooling by max, padding, flatten...), the activation itself is replaced
by a `PowerQuantActivation` (the paper's "modified activation");
otherwise a quantizer is inserted in front of the layer. Activations that
feed no quantized layer stay float.
"""

import dataclasses
from typing import Optional

import keras
import numpy as np

from keras_powerquant import keras_internals
from keras_powerquant.converter.folding import linear_weights
from keras_powerquant.converter.layer_types import activation_layer_spec
from keras_powerquant.converter.layer_types import ActivationSpec
from keras_powerquant.converter.layer_types import fused_activation_spec
from keras_powerquant.converter.layer_types import is_grid_preserving
from keras_powerquant.converter.layer_types import is_sign_preserving
from keras_powerquant.converter.layer_types import LINEAR
from keras_powerquant.converter.operations import output_nonnegative
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.quantization.search import ActivationFit
from keras_powerquant.quantization.search import ExponentFit

L = keras.layers


@dataclasses.dataclass(eq=False)
class QuantizerPlan:
    """An activation quantizer to fit and insert.

    Attributes:
        key: the tensor it quantizes.
        kind: "activation" (replaces an activation layer), "fused" (a Dense/
            Conv layer's own activation, split out), or "input" (inserted
            in front of quantized layers).
        name: the new layer's name.
        spec: the activation it applies before quantizing.
        bits: bit width (the smallest its consumers ask for).
        nonnegative: whether the graph guarantees non-negative values.
        consumers: names of the quantized layers it feeds.
        source: original layer name (activation or fused layer), or None.
    """

    key: tuple
    kind: str
    name: str
    spec: ActivationSpec
    bits: int
    nonnegative: bool
    consumers: list
    source: Optional[str] = None
    signed: Optional[bool] = None
    rule: str = ""
    fit: Optional[ActivationFit] = None
    reason: Optional[str] = None

    @property
    def quantized(self):
        return self.fit is not None


@dataclasses.dataclass(eq=False)
class LayerPlan:
    """A Dense/Conv layer whose kernel is quantized.

    Attributes:
        op: the layer's call in the flat graph.
        weight_bits, input_bits: bit widths of its kernel and its input
            (`input_bits` None in weight-only mode: the input stays float).
        position: "first", "last", "first+last" or None.
        kernel, bias: float32 weights with any BatchNorm folded in.
        fold: the folded BatchNorm's `Fold`, or None.
        input_quantizer: the `QuantizerPlan` that quantizes its input.
        fit: the fitted kernel exponent.
        clip_fraction: the kernel scale as a fraction of `max |W|`.
        per_channel: per-channel (True) or per-tensor (False) scales; None
            follows `convert`'s `per_channel`.
        rounding_up: learned rounding (boolean, the PowerQuant layer's kernel shape: round up from
            the floor), or None to round to nearest.
        codes: explicit integer codes (second-order rounding, the PowerQuant
            layer's kernel shape), or None; they override `rounding_up`.
    """

    op: object
    weight_bits: int
    input_bits: Optional[int]
    position: Optional[str]
    kernel: object
    bias: object
    fold: object = None
    input_quantizer: Optional[QuantizerPlan] = None
    fit: Optional[ExponentFit] = None
    clip_fraction: float = 1.0
    per_channel: Optional[bool] = None
    rounding_up: object = None
    codes: object = None

    @property
    def layer(self):
        return self.op.layer

    @property
    def input_key(self):
        """The tensor the quantized layer reads: a BatchNorm folded into it from before is skipped."""
        if self.fold is not None and self.fold.input_key is not None:
            return self.fold.input_key
        return self.op.input_key


@dataclasses.dataclass
class ConversionPlan:
    layers: dict  # id(layer) -> LayerPlan
    quantizers: dict  # key -> QuantizerPlan
    float_layers: list  # (layer, reason)


def _has_kernel(layer):
    return any(weight.name.endswith("kernel") for weight in layer.weights)


def _why_float(graph, op):
    """Why a layer with weights is not quantized, or None if it is."""
    layer = op.layer
    entry = linear_type(layer)
    if type(layer) is L.PReLU:
        return "activation with weights: runs in float, its output quantized where a quantized layer reads it"
    if entry is None and not _has_kernel(layer):
        # Normalization scales, LayerScale factors...: quantizing them saves little and risks much.
        return f"{type(layer).__name__} has no kernel to quantize (its weights stay float32)"
    inner = [] if entry is not None else [s for s in keras_internals.all_layers(layer) if linear_type(s) is not None]
    if inner:
        # MultiHeadAttention: its projections are EinsumDense layers, but not calls of the model's graph.
        kinds = ", ".join(sorted({type(s).__name__ for s in inner}))
        return (
            f"{type(layer).__name__} computes with {kinds} layers inside it, which are not converted "
            "(only the model graph's own layers are)"
        )
    if entry is None or entry.quantized_class is None:
        return f"no PowerQuant layer for {type(layer).__name__}"
    if len(graph.calls(layer)) != 1:
        return "shared layer (called more than once)"
    reason = entry.float_reason(layer)
    if reason is not None:
        return reason
    if keras.backend.standardize_dtype(layer.compute_dtype) != "float32":
        return f"compute dtype {layer.compute_dtype} (only float32 is converted)"
    return None


def _nonnegative_keys(graph):
    """Tensor keys whose values the graph guarantees to be >= 0."""
    # Model inputs only when their dtype says so (uint8 images): values seen
    # in calibration data promise nothing about what is served later.
    nonnegative = {
        key
        for tensor, key in zip(graph.input_tensors, graph.input_keys)
        if keras.backend.standardize_dtype(tensor.dtype) in ("bool", "uint8", "uint16", "uint32", "uint64")
    }
    for op in graph.ops:
        layer = op.layer
        spec = activation_layer_spec(layer)
        if not op.is_layer:
            result = output_nonnegative(op, [k in nonnegative for k in op.input_keys], spec)
        elif spec is not None:
            result = spec.nonnegative
        elif linear_type(layer) is not None or hasattr(layer, "kernel"):
            spec = fused_activation_spec(layer)
            result = spec is not None and spec != LINEAR and spec.nonnegative
        elif type(layer) is L.Rescaling:
            result = op.input_key in nonnegative and _nonnegative_rescaling(layer)
        elif is_sign_preserving(layer):
            result = all(k in nonnegative for k in op.input_keys)
        else:
            result = False
        if result:
            nonnegative.update(op.output_keys)
    return nonnegative


def _nonnegative_rescaling(layer):
    return bool(np.all(np.asarray(layer.scale) >= 0) and np.all(np.asarray(layer.offset) >= 0))


def assign_positions(graph, quantized_ops):
    """'first' / 'last' for quantized ops with no quantized op before / after them."""
    upstream, downstream = {}, {}
    for op in graph.ops:
        seen = any(upstream.get(k, False) for k in op.input_keys)
        for key in op.output_keys:
            upstream[key] = seen or op in quantized_ops
        if op in quantized_ops:
            quantized_ops[op]["first"] = not seen
    for op in reversed(graph.ops):
        seen = any(downstream.get(k, False) for k in op.output_keys)
        for key in op.input_keys:
            downstream[key] = downstream.get(key, False) or seen or op in quantized_ops
        if op in quantized_ops:
            quantized_ops[op]["last"] = not seen


def _grid_source(graph, key):
    """Follows grid-preserving layers back from `key` to where values are produced."""
    while True:
        producer = graph.producer.get(key)
        if producer is None or not is_grid_preserving(producer.layer) or len(producer.input_keys) != 1:
            return key, producer
        key = producer.input_key


def plan_conversion(graph, folds, wbits, abits, quantize_first_last=False, first_last_bits=8):
    """Decides what to quantize.

    Args:
        graph: the model's `FlatGraph`.
        folds: BatchNorm folds from `plan_folds`.
        wbits, abits: requested weight and activation bit widths; `abits`
            None plans weight-only quantization (no activation quantizers).
        quantize_first_last: quantize the first and last quantized layers
            at `wbits`/`abits` too, instead of `first_last_bits`.
        first_last_bits: their bit width otherwise.

    Returns:
        A `ConversionPlan` (fits not yet filled in).
    """
    candidates, float_layers = {}, []
    for op in graph.ops:
        if not op.is_layer or not op.layer.weights or type(op.layer) is L.BatchNormalization:
            continue
        reason = _why_float(graph, op)
        if reason is None:
            candidates[op] = {}
        elif graph.calls(op.layer)[0] is op:
            float_layers.append((op.layer, reason))
    assign_positions(graph, candidates)
    nonnegative = _nonnegative_keys(graph)

    layers, quantizers = {}, {}
    for op, where in candidates.items():
        position = "+".join(p for p in ("first", "last") if where[p]) or None
        wide = position is not None and not quantize_first_last
        kernel, bias = linear_weights(op.layer, folds.get(id(op.layer)))
        layers[id(op.layer)] = LayerPlan(
            op=op,
            weight_bits=first_last_bits if wide else wbits,
            input_bits=None if abits is None else (first_last_bits if wide else abits),
            position=position,
            kernel=kernel,
            bias=bias,
            fold=folds.get(id(op.layer)),
        )

    def quantizer_at(key, kind, name, spec, source=None):
        if key not in quantizers:
            quantizers[key] = QuantizerPlan(
                key, kind, name, spec, bits=99, nonnegative=key in nonnegative, consumers=[], source=source
            )
        return quantizers[key]

    for plan in layers.values():
        if plan.input_bits is None:
            continue
        source_key, producer = _grid_source(graph, plan.input_key)
        producer_plan = layers.get(id(producer.layer)) if producer is not None else None
        spec = activation_layer_spec(producer.layer) if producer is not None else None
        if spec is not None:
            calls = graph.calls(producer.layer)
            name = producer.layer.name if len(calls) == 1 else f"{producer.layer.name}_{calls.index(producer)}"
            quantizer = quantizer_at(source_key, "activation", name, spec, producer.layer.name)
        elif producer_plan is not None and fused_activation_spec(producer.layer) not in (None, LINEAR):
            spec = fused_activation_spec(producer.layer)
            name = f"{producer.layer.name}_{spec.name}"
            quantizer = quantizer_at(source_key, "fused", name, spec, producer.layer.name)
        else:
            quantizer = quantizer_at(
                plan.input_key, "input", f"{plan.layer.name}_input_quantizer", LINEAR
            )
        quantizer.bits = min(quantizer.bits, plan.input_bits)
        quantizer.consumers.append(plan.layer.name)
        plan.input_quantizer = quantizer
    return ConversionPlan(layers, quantizers, float_layers)

"""Builds the converted Keras model from a flat graph and a plan."""

import keras

from keras_powerquant import keras_internals
from keras_powerquant.converter.folding import linear_weights
from keras_powerquant.converter.nested import wrapped_clone
from keras_powerquant.converter.registry import linear_type
from keras_powerquant.layers import PowerQuantActivation


class _Names:
    """Unique layer names: nested models may reuse their parent's names."""

    def __init__(self):
        self._used = set()

    def __call__(self, name):
        unique, n = name, 1
        while unique in self._used:
            unique, n = f"{name}_{n}", n + 1
        self._used.add(unique)
        return unique


def _quantized_layer(plan, name, activation, per_channel):
    layer = plan.layer
    per_channel = per_channel if plan.per_channel is None else plan.per_channel
    entry = linear_type(layer)
    return entry.quantized_class(
        name=name,
        weight_bits=plan.weight_bits,
        weight_exponent=plan.fit.exponent,
        per_channel=per_channel,
        activation=activation,
        use_bias=plan.bias is not None,
        **entry.quantized_arguments(layer),
    )


def _activation_layer(quantizer, name):
    fit = quantizer.fit
    return PowerQuantActivation(
        name=name,
        bits=quantizer.bits,
        exponent=fit.exponent,
        clip=fit.clip,
        signed=quantizer.signed,
        **quantizer.spec.layer_arguments(),
    )


def _cloned(layer, name):
    return layer.__class__.from_config({**layer.get_config(), "name": name})


class ModelBuilder:
    """Rebuilds a model's graph with folded and quantized layers.

    Args:
        graph: the original model's `FlatGraph`.
        folds: BatchNorm folds from `plan_folds`.
        plan: a `ConversionPlan` with fits filled in, or None to build the
            float model with BatchNorm folded and nothing quantized.
        per_channel: per-channel weight scales for quantized layers.
        nested: a `converter.nested.NestedPlan` with fits filled in: the
            layers holding quantized kernel layers become `PowerQuantSublayers`.
    """

    def __init__(self, graph, folds, plan=None, per_channel=True, nested=None):
        self.graph = graph
        self.folds = folds
        self.plan = plan
        self.per_channel = per_channel
        self.folded_batch_norms = {id(bn) for f in folds.values() for bn in f.batch_norms}
        self.names = _Names()
        self.new_layers = {}
        self.input_quantizers = {}
        # id(original layer) -> its PowerQuant layer in the built model.
        self.quantized_layers = {}
        self.reused = []
        self.nested = nested

    def build(self):
        graph = self.graph
        inputs = [
            keras.Input(batch_shape=t.shape, dtype=t.dtype, name=self.names(t.name))
            for t in graph.input_tensors
        ]
        values = dict(zip(graph.input_keys, inputs))
        for op in graph.ops:
            outputs = self._call(op, values)
            for key, value in zip(op.output_keys, keras.tree.flatten(outputs)):
                values[key] = value
        # Keras 2 files describe one input as a one-element list, which makes
        # Keras 3 warn on every call with a plain tensor: give it the tensor.
        input_struct = keras_internals.input_structure(graph.model)
        if isinstance(input_struct, (list, tuple)) and len(input_struct) == 1:
            input_struct = input_struct[0]
        return keras.Model(
            inputs=keras.tree.pack_sequence_as(input_struct, inputs),
            outputs=keras.tree.pack_sequence_as(
                keras_internals.output_structure(graph.model), [values[k] for k in graph.output_keys]
            ),
            name=graph.model.name,
        )

    def _quantizer(self, key):
        quantizer = self.plan.quantizers.get(key) if self.plan is not None else None
        return quantizer if quantizer is not None and quantizer.quantized else None

    def _call(self, op, values):
        layer = op.layer
        if id(layer) in self.folded_batch_norms:
            return values[op.input_key]
        layer_plan = self.plan.layers.get(id(layer)) if self.plan is not None else None
        if layer_plan is not None:
            return self._call_quantized(layer_plan, values)
        if id(layer) in self.folds:
            # A layer left float (Conv1D, grouped Conv2D...) whose BatchNorm
            # was folded: its BatchNorm call is skipped, so it must carry it.
            return self._call_folded_float(op, values)
        activation_quantizer = self._quantizer(op.output_key)
        if activation_quantizer is not None and activation_quantizer.kind == "activation":
            new = self._new_activation_layer(activation_quantizer, self.names(activation_quantizer.name))
            return new(values[op.input_key])
        return self._call_float(op, values)

    def _call_quantized(self, plan, values):
        op = plan.op
        inputs = values[op.input_key]
        input_quantizer = self._quantizer(plan.input_quantizer.key) if plan.input_quantizer else None
        if input_quantizer is not None and input_quantizer.kind == "input":
            if input_quantizer.key not in self.input_quantizers:
                self.input_quantizers[input_quantizer.key] = self._new_activation_layer(
                    input_quantizer, self.names(input_quantizer.name)
                )
            inputs = self.input_quantizers[input_quantizer.key](inputs)
        output_quantizer = self._quantizer(op.output_key)
        split = output_quantizer is not None and output_quantizer.kind == "fused"
        activation = None if split else keras.activations.serialize(op.layer.activation)
        new = self._new_quantized_layer(plan, self.names(op.layer.name), activation)
        outputs = new(inputs)
        entry = linear_type(op.layer)
        new.set_float_weights(
            entry.quantized_kernel(op.layer, plan.kernel),
            entry.quantized_bias(op.layer, plan.bias),
            plan.clip_fraction,
            plan.rounding_up,
            plan.codes,
        )
        self.quantized_layers[id(op.layer)] = new
        if split:
            outputs = self._new_activation_layer(output_quantizer, self.names(output_quantizer.name))(outputs)
        return outputs

    def _new_quantized_layer(self, plan, name, activation):
        return _quantized_layer(plan, name, activation, self.per_channel)

    def _new_activation_layer(self, quantizer, name):
        return _activation_layer(quantizer, name)

    def _call_folded_float(self, op, values):
        layer = op.layer
        entry = linear_type(layer)
        new = layer.__class__.from_config({**entry.config_with_bias(layer), "name": self.names(layer.name)})
        args, kwargs = op.call_arguments(values)
        outputs = new(*args, **kwargs)
        kernel, bias = linear_weights(layer, self.folds[id(layer)])
        new.set_weights([entry.keras_kernel(layer, kernel), entry.quantized_bias(layer, bias)])
        return outputs

    def _call_float(self, op, values):
        layer = op.layer
        args, kwargs = op.call_arguments(values)
        first_call = id(layer) not in self.new_layers
        kernels = self.nested.owners.get(id(layer)) if self.nested is not None else None
        if first_call and kernels:
            new, set_weights = wrapped_clone(layer, self.names(layer.name), kernels, self.per_channel)
            self.new_layers[id(layer)] = new
            outputs = new(*args, **kwargs)
            set_weights()
            return outputs
        if first_call:
            try:
                new = _cloned(layer, self.names(layer.name))
            except Exception:  # noqa: BLE001 - any layer that cannot round-trip its config
                new = layer
                self.reused.append(layer.name)
            self.new_layers[id(layer)] = new
        new = self.new_layers[id(layer)]
        outputs = new(*args, **kwargs)
        if first_call and new is not layer and op.is_layer and layer.weights:
            new.set_weights(layer.get_weights())
        return outputs

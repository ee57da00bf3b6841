"""A flat view of a Functional or Sequential model's layer graph.

Nested Functional and Sequential models are expanded inline, so the
analyses (which BatchNorm folds where, which tensors feed quantized layers,
data-free statistics) see one DAG of leaf operations: layers, and the
`keras.ops` calls that are not layers (`x + y`, `keras.ops.mean(x)`...),
which are carried over into the converted model as they are. Tensors are
identified by keys `(scope, id(keras_tensor))`, where the scope names the
chain of nested-model calls, so a nested model called twice gives two sets
of keys. The graph is read through `keras_powerquant.keras_internals`. A
SeparableConv2D call appears as the depthwise and pointwise layers it
computes (see `separable`).
"""

import dataclasses

import keras
import tensorflow as tf

from keras_powerquant import keras_internals
from keras_powerquant.converter.separable import is_separable
from keras_powerquant.converter.separable import SeparableSplitter
from keras_powerquant.errors import op_error_reason
from keras_powerquant.errors import UnsupportedModelError


def is_graph_model(layer):
    """Whether a layer is a nested model that gets expanded inline.

    A nested model that overrides `call` stays one opaque layer.
    """
    return keras_internals.has_layer_graph(layer)


@dataclasses.dataclass(eq=False)
class Op:
    """One call of a leaf layer or operation.

    Attributes:
        layer: the Keras layer, or the `keras.ops` operation when
            `is_layer` is False (it has no weights, config or `training`).
        node: the Keras `Node` of this call.
        input_keys: keys of the flattened input tensors.
        output_keys: keys of the flattened output tensors.
        index: position in topological order.
    """

    layer: keras.layers.Layer
    node: object
    input_keys: list
    output_keys: list
    index: int

    @property
    def is_layer(self):
        return keras_internals.is_layer(self.layer)

    @property
    def input_tensors(self):
        """The KerasTensors this call takes, flattened (as `input_keys`)."""
        return keras_internals.node_inputs(self.node)

    @property
    def output_tensors(self):
        """The KerasTensors this call produces, flattened (as `output_keys`)."""
        return keras_internals.node_outputs(self.node)

    def call_arguments(self, values):
        """`(args, kwargs)` of this call with input tensors taken from `values[key]`."""
        return keras_internals.node_call_arguments(self.node, [values[k] for k in self.input_keys])

    def run(self, args, kwargs, training=None):
        """Calls the layer or operation; `training`, when given, reaches layers only."""
        if training is not None and self.is_layer:
            kwargs = {**kwargs, "training": training}
        return self.layer(*args, **kwargs)

    @property
    def input_key(self):
        """The single input key of a one-input layer."""
        return self.input_keys[0]

    @property
    def output_key(self):
        return self.output_keys[0]


class CompiledCalls:
    """A `call_op` for `FlatGraph.evaluate` that runs each op as its own `tf.function`.

    Keras layers called eagerly run 3 to 5 times slower on a CPU than in a
    graph, where Grappler and oneDNN fuse their kernels: EfficientNet-Lite2
    on 256 images, 23 s eagerly against 4.7 s op by op in graphs and 3.7 s
    as one graph (measured on 2 cores). One function
    per op keeps the walk of `evaluate` (values kept or dropped between
    ops, variables assigned between ops, as bias correction does). Each op
    is traced on its first call and once more for another batch size
    (`reduce_retracing`: the retrace leaves the batch size unknown).

    Args:
        training: the `training` argument layers get, or None.
        eager: ids of layers called eagerly: layers whose Python call hooks
            must see values (nested kernels being recorded).
    """

    def __init__(self, training=None, eager=()):
        self.training = training
        self.eager = frozenset(eager)
        self._functions = {}

    def __call__(self, op, args, kwargs):
        if id(op.layer) in self.eager:
            return op.run(args, kwargs, training=self.training)
        function = self._functions.get(op.index)
        if function is None:
            function = tf.function(
                lambda args, kwargs: op.run(args, kwargs, training=self.training), reduce_retracing=True
            )
            self._functions[op.index] = function
        return function(args, kwargs)


class FlatGraph:
    """The leaf-layer DAG of a model, nested models expanded.

    The model must pass `keras_powerquant.loading.check_convertible`.

    Attributes:
        model: the original model.
        input_tensors: the model's input KerasTensors (flattened).
        input_keys: their keys.
        output_keys: keys of the model's outputs (flattened).
        ops: `Op`s in topological order.
    """

    def __init__(self, model):
        self.model = model
        graph = keras_internals.functional_of(model)
        self.input_tensors = list(graph.inputs)
        self.input_keys = [((), id(t)) for t in self.input_tensors]
        self.ops = []
        self._split_separable = SeparableSplitter()
        self.output_keys = self._expand(graph, (), self.input_keys)
        self.producer = {}
        self.consumers = {key: [] for key in self.input_keys}
        for op in self.ops:
            for key in op.output_keys:
                self.producer[key] = op
                self.consumers.setdefault(key, [])
            for key in op.input_keys:
                self.consumers.setdefault(key, []).append(op)
        self._calls = {}
        for op in self.ops:
            self._calls.setdefault(id(op.layer), []).append(op)

    def _expand(self, graph, scope, input_keys):
        keys = {id(t): k for t, k in zip(graph.inputs, input_keys)}
        for node in keras_internals.graph_nodes(graph):
            node_inputs = [keys[id(t)] for t in keras_internals.node_inputs(node)]
            layer = keras_internals.node_operation(node)
            node_outputs = keras_internals.node_outputs(node)
            if is_graph_model(layer):
                inner_scope = scope + ((layer.name, id(node)),)
                outputs = self._expand(keras_internals.functional_of(layer), inner_scope, node_inputs)
            elif is_separable(layer):
                outputs = self._append_split(layer, node, scope, node_inputs)
            else:
                outputs = [(scope, id(t)) for t in node_outputs]
                self.ops.append(Op(layer, node, node_inputs, outputs, len(self.ops)))
            for tensor, key in zip(node_outputs, outputs):
                keys[id(tensor)] = key
        return [keys[id(t)] for t in graph.outputs]

    def _append_split(self, layer, node, scope, input_keys):
        """Appends the depthwise and pointwise calls a SeparableConv2D call computes (see `separable`)."""
        tensor, parts = self._split_separable(layer, keras_internals.node_inputs(node)[0])
        keys = {id(tensor): input_keys[0]}
        for part in parts:
            part_node = keras_internals.last_node(part)
            part_inputs, part_outputs = keras_internals.node_inputs(part_node), keras_internals.node_outputs(part_node)
            outputs = [(scope, id(t)) for t in part_outputs]
            self.ops.append(Op(part, part_node, [keys[id(part_inputs[0])]], outputs, len(self.ops)))
            keys[id(part_outputs[0])] = outputs[0]
        return outputs

    def calls(self, layer):
        """The `Op`s that call `layer` (more than one for a shared layer)."""
        return self._calls.get(id(layer), [])

    def only_consumer(self, key):
        """The single op consuming `key`, or None (several, none, or a model output)."""
        consumers = self.consumers.get(key, [])
        if len(consumers) == 1 and key not in self.output_keys:
            return consumers[0]
        return None

    def layers(self):
        """Distinct leaf layers (not other operations), in order of first call."""
        seen, layers = set(), []
        for op in self.ops:
            if op.is_layer and id(op.layer) not in seen:
                seen.add(id(op.layer))
                layers.append(op.layer)
        return layers

    def evaluate(self, inputs, call_op, keep=None, observe=None):
        """Runs the graph: `call_op(op, args, kwargs)` computes each op's outputs.

        Args:
            inputs: flat list of values for `input_keys`.
            call_op: function of `(op, args, kwargs)` returning the outputs.
            keep: optional set of keys whose values to keep; others are
                dropped after their last use, bounding memory.
            observe: optional `observe(key, value)`, called on every value
                (the inputs first, then each op's outputs) as it is
                computed: what a caller reads there need not be kept.

        Returns:
            `(outputs, kept)`: flat model outputs and a dict of kept values.
        """
        values = dict(zip(self.input_keys, inputs))
        last_use = {}
        for op in self.ops:
            for key in op.input_keys:
                last_use[key] = op.index
        kept = {k: v for k, v in values.items() if keep is not None and k in keep}
        if observe is not None:
            for key, value in values.items():
                observe(key, value)
        for op in self.ops:
            args, kwargs = op.call_arguments(values)
            try:
                outputs = keras.tree.flatten(call_op(op, args, kwargs))
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
                # E.g. a channels_first Conv2D or a dilated Conv2DTranspose
                # on a CPU without oneDNN: the float layer itself cannot run.
                raise UnsupportedModelError(
                    f"Layer '{op.layer.name}' ({type(op.layer).__name__}) cannot run on this machine's "
                    f"TensorFlow kernels: {op_error_reason(error)}"
                ) from error
            for key, value in zip(op.output_keys, outputs):
                values[key] = value
                if observe is not None:
                    observe(key, value)
                if keep is not None and key in keep:
                    kept[key] = value
            if keep is not None:
                for key in op.input_keys:
                    if last_use.get(key) == op.index and key not in self.output_keys:
                        values.pop(key, None)
        return [values[k] for k in self.output_keys], kept

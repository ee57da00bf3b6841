"""The Keras internals keras-powerquant relies on, in one place.

Keras 3 has no public API to walk a Functional model's graph, to read the
nested structure of its inputs and outputs, or to load a `.keras` archive
or a legacy HDF5 file whatever its name. `keras.models.clone_model` and
Keras' own saving code use the attributes below; this module is the only
part of the package that touches them (tests/test_keras_internals.py
checks that), so a Keras upgrade that moves them is fixed here.

Graph vocabulary: a Functional model is a DAG of nodes; each node is one
call of an *operation*: a `keras.layers.Layer`, or a `keras.ops` operation
that is not a layer (`x + y`, `keras.ops.mean(x)`...), which Keras 3 records
as such in the graph. A node's `input_tensors` and `outputs` are
`KerasTensor`s.
"""

import keras


def functional_class():
    """Keras' `Functional` class (what `keras.Model(inputs, outputs)` builds)."""
    from keras.src.models.functional import Functional

    return Functional


def has_layer_graph(model):
    """Whether `model` computes exactly its layer graph.

    True for Functional and Sequential models that keep Keras' own `call`;
    False for subclassed models, including Functional or Sequential
    subclasses that override `call` (their computation is Python code).
    """
    for base in (keras.Sequential, functional_class()):
        if isinstance(model, base):
            return type(model).call is base.call
    return False


def functional_of(model):
    """The Functional graph behind a Functional or a built Sequential model."""
    return model._functional if isinstance(model, keras.Sequential) else model


def graph_nodes(model):
    """The operation-call nodes of a Functional or built Sequential model.

    Returns:
        A list of nodes in topological order (every node after the nodes
        that produce its inputs); input placeholders are left out.
    """
    functional = functional_of(model)
    nodes = []
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                nodes.append(node)
    return nodes


def node_operation(node):
    """The layer or operation a node calls."""
    return node.operation


def last_node(operation):
    """The node of an operation's most recent call."""
    return operation._inbound_nodes[-1]


def node_inputs(node):
    """The flat list of KerasTensors a node takes."""
    return list(node.input_tensors)


def node_outputs(node):
    """The flat list of KerasTensors a node produces."""
    return list(node.outputs)


def node_call_arguments(node, values):
    """`(args, kwargs)` of a node's call with its input tensors replaced.

    Args:
        node: a node from `graph_nodes`.
        values: the value of each of `node_inputs(node)`, in order.

    Returns:
        `(args, kwargs)` as in the recorded call, non-tensor arguments kept.
    """
    by_id = {id(tensor): value for tensor, value in zip(node.input_tensors, values)}
    return node.arguments.fill_in(by_id)


def node_constants(node):
    """The non-tensor numbers and arrays among a node's call arguments.

    For `x + 3.0` (an `Add` operation) this is `[3.0]`; strings, `None`,
    booleans and tensors are left out.
    """
    constants = []
    for value in keras.tree.flatten((node.arguments.args, node.arguments.kwargs)):
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, keras.KerasTensor):
            continue
        constants.append(value)
    return constants


def is_layer(operation):
    """Whether a graph operation is a layer (as opposed to a `keras.ops` call)."""
    return isinstance(operation, keras.layers.Layer)


def keras_op_name(operation):
    """The class name of a built-in `keras.ops` operation (`"Add"`, `"Mean"`...), or None.

    None for layers and for operations defined outside Keras.
    """
    if is_layer(operation):
        return None
    module = type(operation).__module__
    return type(operation).__name__ if module.startswith("keras.src.ops.") else None


def input_structure(model):
    """The nested structure (tensor, list or dict) of a Functional model's inputs."""
    return functional_of(model)._inputs_struct


def output_structure(model):
    """The nested structure of a Functional model's outputs."""
    return functional_of(model)._outputs_struct


def all_layers(model, include_self=False):
    """Every layer of a model, nested models' layers included, each once."""
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def load_keras_archive(file):
    """Loads a `.keras` archive from an open binary file, whatever its name."""
    from keras.src.saving import saving_lib

    return saving_lib.load_model(file, compile=False, safe_mode=True)


def load_hdf5_model(source, custom_objects=None):
    """Keras' legacy HDF5 loader on an open `h5py` file or group; not compiled."""
    from keras.src.legacy.saving import legacy_h5_format

    return legacy_h5_format.load_model_from_hdf5(source, custom_objects=custom_objects, compile=False)


def builtin_layer_class(class_name):
    """The class `keras.layers` defines under `class_name` (public or not), or None."""
    from keras.src import layers as layers_module

    return layers_module.__dict__.get(class_name)

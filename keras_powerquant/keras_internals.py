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


# Attributes of a layer that hold Keras' own bookkeeping, not sublayers the layer computes with.
_BOOKKEEPING = frozenset({"_layers", "_tracker", "_inbound_nodes", "_outbound_nodes"})


def sublayer_paths(layer):
    """The layers nested in `layer`, each once, by the attribute path that reaches it.

    Walks the layer's attributes, and the lists and dicts among them, into
    each sublayer found (but not into a nested model, whose graph calls its
    layers by identity, not by attribute). A path is a tuple of steps
    `("attr", name)` or `("item", index_or_key)`. The first path found to a
    layer is kept: attributes holding a layer, in name order, then lists
    and dicts.

    Returns:
        A list of `(path, sublayer)` pairs, parents before their children.
    """
    found, seen = [], {id(layer)}

    def visit(value, path):
        if isinstance(value, keras.layers.Layer):
            if id(value) in seen:
                return
            seen.add(id(value))
            found.append((path, value))
            if not isinstance(value, keras.Model):
                walk_layer(value, path)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, path + (("item", index),))
        elif isinstance(value, dict):
            for key in sorted(k for k in value if isinstance(k, str)):
                visit(value[key], path + (("item", key),))

    def walk_layer(owner, path):
        # TensorFlow's trackable bookkeeping (`_self_unconditional_dependency_names`...) is skipped;
        # layers held directly come before those in lists and dicts, so each gets its own attribute.
        names = [n for n in sorted(vars(owner)) if n not in _BOOKKEEPING and not n.startswith("_self_")]
        direct = [n for n in names if isinstance(vars(owner)[n], keras.layers.Layer)]
        for name in direct + [n for n in names if n not in direct]:
            visit(vars(owner)[name], path + (("attr", name),))

    walk_layer(layer, ())
    return found


def sublayer_at(layer, path):
    """The object at `path` (a `sublayer_paths` path) of `layer`; raises LookupError if absent."""
    value = layer
    for kind, step in path:
        try:
            value = vars(value)[step] if kind == "attr" else value[step]
        except (KeyError, IndexError, TypeError) as exc:
            raise LookupError(f"no sublayer at {format_path(path)}") from exc
    return value


def replace_sublayer(layer, path, new):
    """Puts `new` at `path` of `layer` in place of the sublayer there, in Keras' tracking too.

    The replaced layer leaves the owner's tracked layers (so its weights
    leave the model's) and `new` takes its place in their order.
    """
    *parent_path, (kind, step) = path
    parent = sublayer_at(layer, tuple(parent_path))
    old = sublayer_at(layer, path)
    if kind == "attr":
        object.__setattr__(parent, step, new)
        tracker = parent._tracker
    else:
        (list if isinstance(parent, list) else dict).__setitem__(parent, step, new)
        tracker = getattr(parent, "tracker", None)
    if tracker is not None and tracker.is_in_store("layers", old):
        tracker.replace_tracked_value("layers", old, new)
    elif tracker is not None:
        tracker.track(new)


def format_path(path):
    """A path as Python would spell it: `.blocks[0].mlp`."""
    return "".join(f".{step}" if kind == "attr" else f"[{step!r}]" for kind, step in path)


def own_variables(layer):
    """The variables `layer` itself holds (not its sublayers'), as `.keras` files save them."""
    store = {}
    layer.save_own_variables(store)
    return store


def set_own_variables(layer, store):
    """Assigns `own_variables` of another layer of the same structure."""
    layer.load_own_variables(store)


def build_input_shape(layer):
    """The input shape a built layer was built with (its build config), or None."""
    config = layer.get_build_config() or {}
    return config.get("input_shape")


def call_hook(layer, hook):
    """Makes `layer` call `hook(args, kwargs)` before each call; returns a function that undoes it."""
    original = layer.call

    def call(*args, **kwargs):
        hook(args, kwargs)
        return original(*args, **kwargs)

    layer.__dict__["call"] = call

    def undo():
        layer.__dict__.pop("call", None)

    return undo

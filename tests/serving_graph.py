"""Reads a SavedModel's serving graph: the ops a TF Serving request executes."""

import os

from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import kernels
from tensorflow.python.framework import op_def_registry

# The init op TensorFlow's loaders (Python and C++) run after restoring the variables.
LOAD_SIGNATURE = "__saved_model_init_op"


def _meta_graph(saved_model_dir):
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as file:
        saved_model.ParseFromString(file.read())
    return saved_model.meta_graphs[0]


def _called_functions(node):
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func.name
        for func in value.list.func:
            yield func.name


def serving_nodes(saved_model_dir, signature="serving_default"):
    """NodeDefs reachable from a signature's outputs, function bodies included."""
    meta_graph = _meta_graph(saved_model_dir)
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    functions = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    pending = [info.name.split(":")[0] for info in meta_graph.signature_def[signature].outputs.values()]
    seen_nodes, seen_functions, reached = set(), set(), []
    while pending:
        name = pending.pop()
        if name in seen_nodes or name not in nodes:
            continue
        seen_nodes.add(name)
        node = nodes[name]
        reached.append(node)
        pending.extend(i.lstrip("^").split(":")[0] for i in node.input)
        stack = list(_called_functions(node))
        while stack:
            function_name = stack.pop()
            if function_name in seen_functions or function_name not in functions:
                continue
            seen_functions.add(function_name)
            for inner in functions[function_name].node_def:
                reached.append(inner)
                stack.extend(_called_functions(inner))
    return reached


def load_nodes(saved_model_dir):
    """NodeDefs that run once when the SavedModel is loaded: its resource initializers."""
    return serving_nodes(saved_model_dir, LOAD_SIGNATURE)


def _attr(node, name):
    """A node's attr value; NodeDefs in function bodies omit attrs left at their default."""
    if name in node.attr:
        return node.attr[name]
    for attr_def in op_def_registry.get(node.op).attr:
        if attr_def.name == name and attr_def.HasField("default_value"):
            return attr_def.default_value
    return None


def _kernel_matches(kernel, node):
    for constraint in kernel.constraint:
        allowed = set(constraint.allowed_values.list.type)
        attr = _attr(node, constraint.name)
        if attr is None:
            return False
        types = [attr.type] if attr.type else list(attr.list.type)
        if not types or any(t not in allowed for t in types):
            return False
    return True


def nodes_without_gpu_kernel(nodes):
    """`(op, dtypes)` of nodes with no GPU (or device-default) kernel for their types."""
    missing = set()
    for node in nodes:
        registered = kernels.get_registered_kernels_for_op(node.op).kernel
        gpu = [k for k in registered if k.device_type in ("GPU", "DEFAULT")]
        if not any(_kernel_matches(k, node) for k in gpu):
            types = sorted(
                f"{key}={value.type}" for key, value in node.attr.items() if value.type
            )
            missing.add((node.op, tuple(types)))
    return sorted(missing)


def optimized_serving_nodes(saved_model_dir, inputs, signature="serving_default"):
    """NodeDefs a request executes after Grappler, loaded as TF Serving's C++ loader loads it.

    The SavedModel is loaded into a TF1 Session (tag "serve") and the
    signature run once on `inputs` (input key -> array); the partition graphs
    TensorFlow reports are the optimized graph (fused convolutions, rewritten
    ops) that ran.
    """
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], saved_model_dir)
        signature_def = meta_graph.signature_def[signature]
        feed = {signature_def.inputs[key].name: value for key, value in inputs.items()}
        fetches = [output.name for output in signature_def.outputs.values()]
        metadata = tf.compat.v1.RunMetadata()
        options = tf.compat.v1.RunOptions(output_partition_graphs=True)
        session.run(fetches, feed, options=options, run_metadata=metadata)
    return [node for partition in metadata.partition_graphs for node in partition.node]

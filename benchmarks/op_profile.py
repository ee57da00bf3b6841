"""Where a SavedModel's serving time goes: time per op type, as TF Serving runs it.

The SavedModel is loaded into a TF1 `Session` (what TF Serving's C++
`LoadSavedModel` builds, so the graph is the one Grappler optimizes for
serving, with its fused convolutions) and `serving_default` is run with
full tracing. Each traced call gives every executed kernel's time
(`RunMetadata.step_stats`); the profile is their mean per op type per call.
Op times overlap where ops run in parallel, so the sum can differ a little
from the wall time; what matters is the split between op types.

Models are profiled interleaved (call `i` of every model before call
`i + 1` of any), so load from other jobs on the machine hits all alike.
"""

import collections

import numpy as np
import tensorflow as tf

from keras_powerquant.export import SERVING_SIGNATURE

WARMUP_CALLS = 3


def _is_contraction(op_type):
    """Convolutions and matmuls, fused (`_MklNativeFusedConv2D`, `_FusedConv2D`...) or not."""
    return any(name in op_type for name in ("Conv2D", "Conv3D", "DepthwiseConv2d", "MatMul", "Conv2DBackprop"))


class _SessionModel:
    def __init__(self, saved_model_dir, batch):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.session = tf.compat.v1.Session(graph=self.graph)
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], saved_model_dir)
        signature = meta_graph.signature_def[SERVING_SIGNATURE]
        (tensor,) = signature.inputs.values()
        (self.output,) = (output.name for output in signature.outputs.values())
        self.feed = {tensor.name: batch}

    def traced_op_times(self):
        """Microseconds per op type in one call."""
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        metadata = tf.compat.v1.RunMetadata()
        self.session.run(self.output, self.feed, options=options, run_metadata=metadata)
        times = collections.Counter()
        for device in metadata.step_stats.dev_stats:
            for node in device.node_stats:
                # timeline_label reads "name = OpType(inputs)"; nodes without one are bookkeeping.
                if " = " in node.timeline_label:
                    times[node.timeline_label.split(" = ", 1)[1].split("(", 1)[0]] += node.all_end_rel_micros
        return times

    def close(self):
        self.session.close()


def profile(saved_model_dirs, batch, calls):
    """Mean time per op type of one `serving_default` call of each SavedModel.

    Args:
        saved_model_dirs: label -> SavedModel folder, all with one input
            that takes `batch`.
        batch: the input array.
        calls: traced calls per model (after `WARMUP_CALLS` untraced ones).

    Returns:
        label -> {"total_ms", "contraction_ms", "ops_ms": {op type: ms}}
        (op types sorted by time, largest first).
    """
    models = {label: _SessionModel(path, batch) for label, path in saved_model_dirs.items()}
    try:
        for model in models.values():
            for _ in range(WARMUP_CALLS):
                model.session.run(model.output, model.feed)
        totals = {label: collections.Counter() for label in models}
        labels = list(models)
        for i in range(calls):
            shift = i % len(labels)
            for label in labels[shift:] + labels[:shift]:
                totals[label].update(models[label].traced_op_times())
    finally:
        for model in models.values():
            model.close()
    result = {}
    for label, times in totals.items():
        ms = {op: micros / calls / 1e3 for op, micros in times.most_common()}
        result[label] = {
            "total_ms": float(sum(ms.values())),
            "contraction_ms": float(sum(value for op, value in ms.items() if _is_contraction(op))),
            "ops_ms": ms,
        }
    return result


def largest_other_ops(entry, count=5, min_ms=0.005):
    """The `count` costliest op types that are not convolutions or matmuls: [(op type, ms)]."""
    others = [(op, ms) for op, ms in entry["ops_ms"].items() if not _is_contraction(op) and ms >= min_ms]
    return others[:count]


def calls_for(seconds_per_call, budget_seconds, low=5, high=30):
    """Traced calls per model that fit a budget."""
    return int(np.clip(budget_seconds / max(seconds_per_call, 1e-6), low, high))

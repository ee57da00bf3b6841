"""Decoding a layer's kernel codes once, when its SavedModel is loaded, instead of on every call.

A `DecodedKernel` is a float32 variable that is not saved: the SavedModel
stores only the layer's integer codes and scales, and the variable is
filled from them by the resource initializer that TensorFlow runs after
restoring the variables, in `tf.saved_model.load` and in the C++
`LoadSavedModel` that TF Serving uses (the `__saved_model_init_op`). Each
call then reads the decoded kernel instead of running the gather and scale:
the serving graph costs what a float model costs, and the loaded model holds
the float kernel in memory beside its codes.

While `decoded_kernels(...)` is active (when the serving function is
traced), `QuantizedKernelLayer` reads its kernel from its `DecodedKernel`.
"""

import contextlib
import contextvars
import hashlib

import numpy as np
import tensorflow as tf

_ACTIVE = contextvars.ContextVar("keras_powerquant_decoded_kernels", default=None)


class DecodedKernel(tf.saved_model.experimental.TrackableResource):
    """A float32 variable holding the layer's decoded kernel in its op's layout, set when loaded.

    Args:
        layer: a built `QuantizedKernelLayer`.
    """

    def __init__(self, layer):
        self._layer = layer
        self._shape = tuple(layer.op_kernel_shape())
        self._shared_name = _content_name(layer)
        super().__init__()

    def _create_resource(self):
        # A named variable: the C++ loader reruns VarHandleOp on every
        # Session.run, so only a name finds the initialized variable again.
        # The name is derived from the layer's codes, so loads of the same
        # SavedModel in one process share one variable of equal values, and
        # different models never do.
        return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=self._shape, shared_name=self._shared_name)

    def _initialize(self):
        kernel = self._layer.op_kernel(self._layer.dequantized_kernel())
        return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=kernel)

    def _destroy_resource(self):
        # Not destroyed with one loaded object: another load of the same
        # SavedModel may share it. A TF Serving session frees it on unload;
        # a Python process keeps it until it exits.
        return None

    def read(self):
        """The decoded kernel, float32 in the layer's kernel shape."""
        value = tf.raw_ops.ReadVariableOp(resource=self.resource_handle, dtype=tf.float32)
        value.set_shape(self._shape)
        return value


def _content_name(layer):
    digest = hashlib.sha256()
    for variable in (layer.kernel_codes, layer.kernel_scale):
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    digest.update(repr((layer._kernel_shape, layer.weight_bits, layer.weight_exponent)).encode())
    return f"keras_powerquant/decoded_kernel/{layer.name}/{digest.hexdigest()[:24]}"


@contextlib.contextmanager
def decoded_kernels(kernels):
    """Makes the layers of `kernels` (`DecodedKernel`s) read them while active."""
    token = _ACTIVE.set({id(kernel._layer): kernel for kernel in kernels})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_decoded_kernel(layer):
    """The `DecodedKernel` of `layer` inside `decoded_kernels(...)`, else None."""
    active = _ACTIVE.get()
    return None if active is None else active.get(id(layer))

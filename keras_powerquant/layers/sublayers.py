"""Layers that carry PowerQuant into layers the converter cannot rewrite.

A `MultiHeadAttention`, or a user's subclassed layer, computes with kernel
layers of its own (its `EinsumDense` projections, a block's `Dense` MLP)
that are not calls of the model's graph. The converter keeps such a layer
and its `call` as they are, and replaces the kernel layers inside it: each
by its PowerQuant layer, behind the layer's own input quantizer
(`PowerQuantInputQuantized`), so the unchanged `call` quantizes what it
feeds them. `PowerQuantSublayers` holds the outer layer with its
replacements, and redoes them when a `.keras` file is loaded.
"""

import keras

from keras_powerquant import keras_internals


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantInputQuantized(keras.layers.Layer):
    """Quantizes its input with `quantizer`, then calls `layer`.

    A kernel layer nested inside another layer's `call` has no graph edge
    in front of it to put an activation quantizer on; this layer is one.

    Args:
        quantizer: a `PowerQuantActivation` (or its serialized config).
        layer: a PowerQuant kernel layer (or its serialized config).

    Input and output shapes: those of `layer`.
    """

    def __init__(self, quantizer, layer, **kwargs):
        super().__init__(**kwargs)
        self.quantizer = _layer(quantizer)
        self.layer = _layer(layer)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def call(self, inputs):
        return self.layer(self.quantizer(inputs))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "quantizer": keras.saving.serialize_keras_object(self.quantizer),
            "layer": keras.saving.serialize_keras_object(self.layer),
        }


@keras.saving.register_keras_serializable(package="keras_powerquant")
class PowerQuantSublayers(keras.layers.Layer):
    """Runs `layer` unchanged, with some of its nested layers replaced.

    Each replacement puts a layer at an attribute path of `layer`
    (`keras_internals.sublayer_paths`: `("attr", "_query_dense")`, or a list
    index, or a dict key), in place of the layer there, before `layer`
    computes with it. A layer that creates its sublayers in `build` (as
    `MultiHeadAttention` does) gets them replaced once built: at
    construction when `layer` is deserialized built, else on the first call.

    The `.keras` config is `layer`'s own config (so its class must be
    serializable, as any custom layer in a `.keras` file) and the
    replacements' configs; loading rebuilds `layer` from its config and
    puts the replacements back before the weights are read.

    Args:
        layer: the outer layer (or its serialized config).
        replacements: a list of `{"path": path, "layer": new layer or its
            config, "input_shape": the shape it is built with}`.
    """

    def __init__(self, layer, replacements, **kwargs):
        super().__init__(**kwargs)
        self.layer = _layer(layer)
        self.replacements = [
            {
                "path": tuple(tuple(step) for step in r["path"]),
                "layer": _layer(r["layer"]),
                "input_shape": None if r["input_shape"] is None else tuple(r["input_shape"]),
            }
            for r in replacements
        ]
        self._installed = False
        self._install()
        # Nothing of its own to build: `layer` builds on its first call, as it would unwrapped.
        self.built = True

    def _install(self):
        """Puts the replacements in place once every path reaches a layer; whether they are."""
        if self._installed:
            return True
        try:
            current = [keras_internals.sublayer_at(self.layer, r["path"]) for r in self.replacements]
        except LookupError:
            return False
        if not all(isinstance(value, keras.layers.Layer) for value in current):
            return False
        for replacement in self.replacements:
            new = replacement["layer"]
            keras_internals.replace_sublayer(self.layer, replacement["path"], new)
            # A built outer layer will not build its sublayers again (an unbuilt one builds them,
            # in its `build` or on their first call): build each replacement as the layer it replaces.
            if self.layer.built and not new.built and replacement["input_shape"] is not None:
                new.build(replacement["input_shape"])
        self._installed = True
        return True

    def call(self, *args, **kwargs):
        if not self._install():
            # Sublayers created in `build`: one call builds them.
            self.layer(*args, **kwargs)
            if not self._install():
                paths = ", ".join(keras_internals.format_path(r["path"]) for r in self.replacements)
                raise ValueError(f"Layer '{self.layer.name}' has no sublayer at each of {paths}.")
        return self.layer(*args, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "replacements": [
                {
                    "path": [list(step) for step in r["path"]],
                    "layer": keras.saving.serialize_keras_object(r["layer"]),
                    "input_shape": None if r["input_shape"] is None else list(r["input_shape"]),
                }
                for r in self.replacements
            ],
        }


def _layer(value):
    return value if isinstance(value, keras.layers.Layer) else keras.saving.deserialize_keras_object(value)

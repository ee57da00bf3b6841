"""Repairs of Keras 2 / tf.keras model configs that Keras 3 refuses to load.

Keras 3 refuses some real Keras 2 files: layer configs that carry arguments
Keras 3 layers no longer accept (`groups=1` on `DepthwiseConv2D`,
`time_major=False` on RNNs), and Keras 2.1/2.2-era Sequential configs. Each
repair edits the config dict in place and appends one note saying what it
did; a config that cannot be repaired without changing the model raises
`RepairError`. `loading` applies them to an in-memory copy of the file.
"""

import functools
import inspect

import keras

from keras_powerquant import keras_internals

# Arguments that Keras 2 / tf.keras wrote into layer configs and that Keras 3
# layers no longer accept, with the one value at which they have no effect.
# Such an argument is dropped only when it holds this value; any other value
# would change the model, so it is an error.
#   groups: tf.keras 2.3+ Conv.get_config, inherited by DepthwiseConv*,
#       SeparableConv* and Conv*Transpose, which have no grouping in Keras 3.
#   time_major: tf.keras 2.x RNN.get_config (LSTM, GRU, SimpleRNN, ...).
_NEUTRAL_VALUES = {
    "groups": 1,
    "time_major": False,
}

_MODEL_CLASS_NAMES = ("Sequential", "Functional", "Model")


class RepairError(Exception):
    """A layer config that cannot be repaired without changing the model."""


def repair_model_config(model_config, notes):
    """Repairs a model config (`{"class_name", "config"}`) in place, appending a note per repair."""
    class_name = model_config.get("class_name")
    if class_name == "Sequential":
        _repair_sequential(model_config, notes)
    elif class_name in ("Functional", "Model"):
        config = model_config.get("config")
        if isinstance(config, dict):
            for layer in config.get("layers", []):
                _repair_layer(layer, notes)
    else:
        _repair_layer(model_config, notes)


def _repair_sequential(model_config, notes):
    config = model_config.get("config")
    if isinstance(config, list):
        # Keras <= 2.2.2 stored a Sequential config as the bare layer list;
        # Keras 3's Sequential.from_config needs {"name", "layers"}.
        name = model_config.get("name") or "sequential"
        config = {"name": name, "layers": config}
        model_config["config"] = config
        notes.append(
            f"converted the Keras 2.2-style Sequential config of '{name}' "
            "(a plain list of layers) to the dict form Keras 3 expects"
        )
    if not isinstance(config, dict):
        return
    layers = config.get("layers") or []
    first = layers[0] if layers else None
    if (
        isinstance(first, dict)
        and first.get("class_name") != "InputLayer"
        and isinstance(first.get("config"), dict)
        and first["config"].get("batch_input_shape") is not None
    ):
        # Keras 3 would read batch_input_shape as input_shape, batch
        # dimension included, giving the model an extra input dimension.
        # An explicit InputLayer, as tf.keras 2.x writes it, is exact.
        layer_config = first["config"]
        shape = layer_config.pop("batch_input_shape")
        layer_name = layer_config.get("name", first.get("name", "layer"))
        dtype = layer_config.get("dtype")
        if not isinstance(dtype, str):
            dtype = "float32"
        layers.insert(
            0,
            {
                "class_name": "InputLayer",
                "config": {
                    "batch_input_shape": shape,
                    "dtype": dtype,
                    "sparse": False,
                    "name": f"{layer_name}_input",
                },
            },
        )
        notes.append(
            f"moved batch_input_shape={_plain(shape)} of "
            f"{first.get('class_name')} '{layer_name}' into an explicit "
            "InputLayer"
        )
    for layer in layers:
        _repair_layer(layer, notes)


def _repair_layer(layer, notes):
    if not isinstance(layer, dict):
        return
    class_name = layer.get("class_name")
    config = layer.get("config")
    if class_name in _MODEL_CLASS_NAMES:
        repair_model_config(layer, notes)
        return
    if not isinstance(class_name, str) or not isinstance(config, dict):
        return
    cls = _layer_class(class_name)
    if cls is None:
        return  # Unknown or custom class: Keras reports it when loading.
    layer_name = config.get("name", layer.get("name", "?"))
    # Only known legacy arguments are handled here; any other argument Keras 3
    # does not accept is reported by Keras itself when it builds the layer.
    for key, neutral in _NEUTRAL_VALUES.items():
        if key not in config or key in _named_parameters(cls):
            continue
        value = _plain(config[key])
        if not _same(value, neutral):
            raise RepairError(
                f"{class_name} '{layer_name}' has {key}={value!r}, which Keras 3's "
                f"{class_name} does not support (only {key}={neutral!r}, which has no "
                "effect, can be dropped)."
            )
        del config[key]
        notes.append(f"dropped unsupported argument {key}={value!r} from {class_name} '{layer_name}'")
    # Wrapped layers: Bidirectional/TimeDistributed "layer", RNN "cell", ...
    for value in config.values():
        for item in value if isinstance(value, list) else [value]:
            if (
                isinstance(item, dict)
                and isinstance(item.get("class_name"), str)
                and isinstance(item.get("config"), (dict, list))
                and (
                    item["class_name"] in _MODEL_CLASS_NAMES
                    or _layer_class(item["class_name"]) is not None
                )
            ):
                _repair_layer(item, notes)


@functools.cache
def _layer_class(class_name):
    """The Keras 3 layer class the legacy loader would use, or None."""
    cls = keras.saving.get_registered_object(class_name)
    if cls is None:
        cls = keras_internals.builtin_layer_class(class_name)
    if inspect.isclass(cls) and issubclass(cls, keras.layers.Layer):
        return cls
    return None


@functools.cache
def _named_parameters(cls):
    """Keyword arguments named in the `__init__` signatures along `cls`'s MRO."""
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            continue
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return frozenset(names)


def _plain(value):
    """Undoes tf.keras's JSON encoding of tuples, for messages and checks."""
    if isinstance(value, dict) and value.get("class_name") == "__tuple__":
        return tuple(_plain(v) for v in value.get("items", []))
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _same(value, neutral):
    # bool is an int subclass: groups=True must not pass for groups=1.
    return type(value) is type(neutral) and value == neutral

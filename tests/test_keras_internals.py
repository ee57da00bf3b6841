"""Keras internals stay in keras_powerquant/keras_internals.py; models Keras
already quantized are refused with a clear error."""

import pathlib
import re

import keras
import pytest

import keras_powerquant as kpq
from keras_powerquant import keras_internals
from keras_powerquant.errors import UnsupportedModelError
from tests.cli_helpers import assert_one_line_error
from tests.cli_helpers import invoke

PACKAGE = pathlib.Path(kpq.__file__).parent
# Private Keras attributes the package reads (Functional, Sequential, Node,
# Layer); `keras.src` is Keras' private module tree.
KERAS_PRIVATE = re.compile(
    r"keras\.src|\._(functional|nodes_by_depth|inputs_struct|outputs_struct|flatten_layers|keras_history"
    r"|inbound_nodes|outbound_nodes|operations|layers|tracker)\b|\bnode\.(arguments|operation|is_input"
    r"|input_tensors|outputs)\b"
)


def test_keras_internals_are_used_only_through_their_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "keras_internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if KERAS_PRIVATE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []
    # The rule finds what it is meant to find.
    assert KERAS_PRIVATE.search((PACKAGE / "keras_internals.py").read_text())


def test_graph_nodes_are_in_topological_order():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, name="hidden")(inputs)
    outputs = keras.layers.Dense(2, name="out")(hidden + 1.0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="only")])
    names = [keras_internals.node_operation(n).name for n in keras_internals.graph_nodes(keras.Model(inputs, outputs))]
    assert names[0] == "hidden" and names[-1] == "out" and len(names) == 3
    assert [keras_internals.node_operation(n).name for n in keras_internals.graph_nodes(model)] == ["only"]


def _keras_quantized(mode):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc"), keras.layers.Dense(2, name="out")])
    with pytest.warns(UserWarning):  # Keras: InputLayer has no `quantize`
        model.quantize(mode)
    return model


@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_a_model_quantized_by_keras_is_refused(mode):
    with pytest.raises(UnsupportedModelError, match=rf"Layer 'fc' \(Dense\) is already quantized by Keras.*{mode}"):
        kpq.convert(_keras_quantized(mode), 4, 4)


def test_a_converted_model_is_refused():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")])
    converted, _ = kpq.convert(model, 4, None)
    with pytest.raises(UnsupportedModelError, match="converted by keras-powerquant before"):
        kpq.convert(converted, 4, 4)


def test_cli_refuses_a_keras_quantized_file_with_exit_1(tmp_path):
    path = tmp_path / "int8.keras"
    _keras_quantized("int8").save(path)
    result = invoke("convert", path, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert_one_line_error(result.stderr, "'fc'", "already quantized by Keras", "quantization_mode='int8'")
    assert not (tmp_path / "out").exists()

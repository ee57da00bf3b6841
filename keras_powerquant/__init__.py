"""keras-powerquant: post-training PowerQuant quantization for Keras 3.

Converts a trained Keras model (Functional or Sequential, from memory or a
`.keras` / `.h5` file) into a model of `PowerQuant*` layers whose weights
are integer codes, fitted per layer with power exponents (Yvinec et al.,
"PowerQuant: Automorphism Search for Non-Uniform Quantization", ICLR 2023).

`import keras_powerquant` does not import Keras or TensorFlow: the `kpq`
command answers `--help` without them. The first use of a name that needs
Keras (`kpq.convert`, `kpq.load_model`, the layers...) imports Keras, checks
that it uses the TensorFlow backend and registers the `PowerQuant*` layers,
so converted `.keras` files then load with `keras.saving.load_model`. When
Keras is already imported, `import keras_powerquant` registers them at once
(it costs nothing then), so `import keras; import keras_powerquant` is all
a script needs before `keras.saving.load_model`; `import
keras_powerquant.layers` registers them explicitly in any order.
"""

import importlib
import sys

from keras_powerquant.errors import *  # noqa: F401,F403
from keras_powerquant.report import ConversionReport  # noqa: F401

__version__ = "0.1.0"

# Public names that need neither Keras nor TensorFlow, but numpy and scipy:
# imported on first use too, so the `kpq` command starts fast.
_PLAIN_API = {"ConversionConfig": "keras_powerquant.config"}
# Public names that need Keras, and the module that defines each.
_KERAS_API = {
    "PowerQuantExport": "keras_powerquant.callbacks",
    "convert": "keras_powerquant.pipeline",
    "fold_batch_norms": "keras_powerquant.pipeline",
    "inspect_model": "keras_powerquant.pipeline",
    "export_model": "keras_powerquant.export",
    "PowerQuantActivation": "keras_powerquant.layers",
    "PowerQuantConv1D": "keras_powerquant.layers",
    "PowerQuantConv2D": "keras_powerquant.layers",
    "PowerQuantConv2DTranspose": "keras_powerquant.layers",
    "PowerQuantConv3D": "keras_powerquant.layers",
    "PowerQuantDense": "keras_powerquant.layers",
    "PowerQuantDepthwiseConv1D": "keras_powerquant.layers",
    "PowerQuantDepthwiseConv2D": "keras_powerquant.layers",
    "PowerQuantEinsumDense": "keras_powerquant.layers",
    "PowerQuantEmbedding": "keras_powerquant.layers",
    "PowerQuantGRU": "keras_powerquant.layers",
    "PowerQuantLSTM": "keras_powerquant.layers",
    "PowerQuantSimpleRNN": "keras_powerquant.layers",
    "PowerQuantInputQuantized": "keras_powerquant.layers",
    "PowerQuantSublayers": "keras_powerquant.layers",
    "load_model": "keras_powerquant.loading",
    "synthesize_inputs": "keras_powerquant.synthesis",
    "SyntheticData": "keras_powerquant.synthesis",
}
# Subpackages reachable as attributes (`keras_powerquant.layers`), imported on first use.
_SUBMODULES = (
    "callbacks", "config", "converter", "evaluation", "export", "layers", "loading", "pipeline", "quantization",
    "synthesis",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_powerquant.{name}")
    module = _PLAIN_API.get(name) or _KERAS_API.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_powerquant' has no attribute '{name}'")
    if name in _KERAS_API:
        importlib.import_module("keras_powerquant.layers")  # registers the layers with Keras
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PLAIN_API) | set(_KERAS_API) | set(_SUBMODULES))


if "keras" in sys.modules:
    importlib.import_module("keras_powerquant.layers")

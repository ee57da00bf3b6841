"""keras-powerquant: post-training PowerQuant quantization for Keras 3.

Converts a trained Keras model (Functional or Sequential, from memory or a
`.keras` / `.h5` file) into a model of `PowerQuant*` layers whose weights
are integer codes, fitted per layer with power exponents (Yvinec et al.,
"PowerQuant: Automorphism Search for Non-Uniform Quantization", ICLR 2023).

Importing the package registers its layers with Keras, so converted
`.keras` files load with `keras.saving.load_model`.
"""

import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras-powerquant needs Keras' TensorFlow backend; this process uses "
        f"'{_keras.backend.backend()}'. Set KERAS_BACKEND=tensorflow before importing Keras."
    )

from keras_powerquant.callbacks import PowerQuantExport  # noqa: E402
from keras_powerquant.converter import convert  # noqa: E402
from keras_powerquant.converter import fold_batch_norms  # noqa: E402
from keras_powerquant.converter import inspect_model  # noqa: E402
from keras_powerquant.errors import *  # noqa: E402,F401,F403
from keras_powerquant.export import export_model  # noqa: E402
from keras_powerquant.layers import PowerQuantActivation  # noqa: E402
from keras_powerquant.layers import PowerQuantConv2D  # noqa: E402
from keras_powerquant.layers import PowerQuantDense  # noqa: E402
from keras_powerquant.layers import PowerQuantDepthwiseConv2D  # noqa: E402
from keras_powerquant.loading import load_model  # noqa: E402
from keras_powerquant.report import ConversionReport  # noqa: E402
from keras_powerquant.synthesis import synthesize_inputs  # noqa: E402
from keras_powerquant.synthesis import SyntheticData  # noqa: E402

__version__ = "0.1.0"

"""The numpy quantization core: quantizers, exponent search, statistics, folding.

Nothing in this package imports Keras or TensorFlow, so its maths can be used
and tested alone.
"""

from keras_powerquant.quantization.activations import ActivationQuantizer
from keras_powerquant.quantization.folding import fold_batch_norm
from keras_powerquant.quantization.search import ActivationFit
from keras_powerquant.quantization.search import ExponentFit
from keras_powerquant.quantization.search import fit_activation
from keras_powerquant.quantization.search import fit_shared_weight_exponent
from keras_powerquant.quantization.search import fit_weight_exponent
from keras_powerquant.quantization.statistics import ChannelGaussians
from keras_powerquant.quantization.weights import WeightQuantizer

"""Keras 3 layers of a converted model."""

from keras_powerquant import backend  # noqa: F401  (fails early on a non-TensorFlow backend)
from keras_powerquant.layers.activation import PowerQuantActivation
from keras_powerquant.layers.conv import PowerQuantConv1D
from keras_powerquant.layers.conv import PowerQuantConv2D
from keras_powerquant.layers.conv import PowerQuantConv3D
from keras_powerquant.layers.conv import PowerQuantDepthwiseConv1D
from keras_powerquant.layers.conv import PowerQuantDepthwiseConv2D
from keras_powerquant.layers.conv2d_transpose import PowerQuantConv2DTranspose
from keras_powerquant.layers.dense import PowerQuantDense
from keras_powerquant.layers.einsum_dense import PowerQuantEinsumDense
from keras_powerquant.layers.embedding import PowerQuantEmbedding
from keras_powerquant.layers.quantized_kernel import QuantizedKernelLayer
from keras_powerquant.layers.recurrent import PowerQuantGRU
from keras_powerquant.layers.recurrent import PowerQuantGRUCell
from keras_powerquant.layers.recurrent import PowerQuantLSTM
from keras_powerquant.layers.recurrent import PowerQuantLSTMCell
from keras_powerquant.layers.recurrent import PowerQuantSimpleRNN
from keras_powerquant.layers.recurrent import PowerQuantSimpleRNNCell
from keras_powerquant.layers.sublayers import PowerQuantInputQuantized
from keras_powerquant.layers.sublayers import PowerQuantSublayers

"""keras-powerquant: post-training PowerQuant quantization for Keras 3."""

__version__ = "0.1.0"

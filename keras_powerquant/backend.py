"""Keras' TensorFlow backend, which every module building or running Keras models needs.

Imported by those modules before anything else of theirs, so a process set to
another backend gets this message rather than a failure deep inside a layer.
"""

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras-powerquant needs Keras' TensorFlow backend; this process uses "
        f"'{keras.backend.backend()}'. Set KERAS_BACKEND=tensorflow before importing Keras."
    )

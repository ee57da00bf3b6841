"""The numpy quantization core works where Keras and TensorFlow cannot be imported."""

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, types

    class BlockKerasAndTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras", "tensorflow", "tf_keras"):
                raise ImportError(name + " is blocked in this process")
            return None

    sys.meta_path.insert(0, BlockKerasAndTensorFlow())
    # A bare parent package: keras_powerquant/__init__.py registers Keras layers.
    parent = types.ModuleType("keras_powerquant")
    parent.__path__ = [str(pathlib.Path(sys.argv[1]) / "keras_powerquant")]
    sys.modules["keras_powerquant"] = parent

    import numpy as np
    from keras_powerquant import quantization
    from keras_powerquant.quantization import activation_functions, grid, packing, search, statistics

    rng = np.random.default_rng(0)
    fit = quantization.fit_weight_exponent(rng.normal(size=(3, 3, 8, 16)), 4)
    assert 0.1 <= fit.exponent <= 2.0 and fit.error <= fit.uniform_error
    codes, scales = quantization.WeightQuantizer(4, fit.exponent).encode(rng.normal(size=(8, 4)))
    assert (packing.unpack_nibbles(packing.pack_nibbles(codes), codes.size) == codes.ravel()).all()
    activation = quantization.fit_activation(np.maximum(rng.normal(size=5000), 0), 4, signed=False)
    assert activation.clip > 0
    gaussians = statistics.batchnorm_gaussians(np.ones(4), np.zeros(4))
    assert gaussians.samples().shape[0] == 4
    kernel, bias = quantization.fold_batch_norm(
        np.ones((3, 2)), None, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2), 1e-3, "dense"
    )
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow"))
    assert not loaded, loaded
    print("numpy core ok")
    """
)


def test_numpy_core_needs_neither_keras_nor_tensorflow():
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "numpy core ok" in result.stdout

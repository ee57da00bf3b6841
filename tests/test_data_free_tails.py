"""The heavier-tailed sample model that data-free activation ranges are fitted on."""

import numpy as np
import pytest
from scipy import special

from keras_powerquant.quantization.statistics import ChannelGaussians
from keras_powerquant.quantization.statistics import standardized_quantiles


@pytest.mark.parametrize("dof", [3.5, 5, 10, 30])
def test_student_quantiles_have_unit_variance_and_heavier_tails(dof):
    n = 200_000
    q = (np.arange(n) + 0.5) / n
    z = standardized_quantiles(q, dof)
    assert abs(z.mean()) < 1e-9
    # Quantile samples of a heavy tail under-represent its extremes a little.
    assert z.var() == pytest.approx(1.0, rel=0.03 if dof > 4 else 0.1)
    normal = special.ndtri(q)
    assert z.max() > normal.max()
    # Same variance, so more mass near zero too: a narrower middle.
    assert np.percentile(np.abs(z), 50) < np.percentile(np.abs(normal), 50)


def test_normal_quantiles_by_default():
    q = np.array([0.1, 0.5, 0.975])
    np.testing.assert_allclose(standardized_quantiles(q), special.ndtri(q))


@pytest.mark.parametrize("dof", [2, 1, 0, -3])
def test_tail_dof_needs_a_finite_variance(dof):
    with pytest.raises(ValueError, match="`tail_dof` must be > 2"):
        standardized_quantiles(np.array([0.5]), dof)


def test_channel_samples_keep_each_channels_mean_and_scale():
    gaussians = ChannelGaussians(np.array([0.0, 2.0]), np.array([1.0, 9.0]), "test")
    samples = gaussians.samples(total=20_000, tail_dof=10)
    np.testing.assert_allclose(samples.mean(axis=1), [0.0, 2.0], atol=1e-9)
    np.testing.assert_allclose(samples.std(axis=1), [1.0, 3.0], rtol=0.02)

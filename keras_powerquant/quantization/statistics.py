"""Gaussian activation statistics for data-free range fitting (docs/method.md §4).

After BatchNorm folding, the pre-activation of channel `k` of a Conv/Dense +
BatchNorm is modelled as `Normal(beta_k, gamma_k^2)`. An activation's range
is fitted on deterministic samples of its output under that model: normal
quantiles (or, with `tail_dof`, Student-t quantiles of the same mean and
variance) pushed through the activation function. Where no BatchNorm
precedes a tensor, per-channel means and variances are propagated through
the layers in between with channels independent (sums add means and
variances; linear layers map them through the kernel, the taps of one input
channel correlated over positions: `correlated_tap_energy`; pooling:
`max_pool_gaussians`, `average_pool_gaussians`), and the output is again
treated as Gaussian (moment matching).
"""

import dataclasses

import numpy as np
from scipy import special
from scipy import stats

from keras_powerquant.quantization.layouts import input_channel_index
from keras_powerquant.quantization.layouts import to_outputs

# Enough samples to fit a 8-bit quantizer well, few enough to stay fast.
DEFAULT_TOTAL_SAMPLES = 1 << 17
_MIN_SAMPLES_PER_CHANNEL = 64


@dataclasses.dataclass(frozen=True)
class ChannelGaussians:
    """Per-channel Gaussian model of a tensor's last axis.

    Attributes:
        mean: float64 array `(channels,)`.
        var: float64 array `(channels,)`, >= 0.
        rule: how the statistics were obtained, for the conversion report
            (e.g. "batchnorm", "propagated: add").
    """

    mean: np.ndarray
    var: np.ndarray
    rule: str

    def __post_init__(self):
        mean = np.asarray(self.mean, dtype=np.float64).ravel()
        var = np.maximum(np.asarray(self.var, dtype=np.float64).ravel(), 0.0)
        if mean.shape != var.shape:
            raise ValueError(f"mean {mean.shape} and var {var.shape} differ in shape.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "var", var)

    @property
    def channels(self):
        return self.mean.size

    def samples(self, total=DEFAULT_TOTAL_SAMPLES, tail_dof=None):
        """Deterministic samples, `(channels, n)`: quantiles of each channel's distribution.

        `n = max(64, total // channels)`; quantiles at `(i + 1/2) / n` of
        the normal distribution, or with `tail_dof` of a Student t with that
        many degrees of freedom (> 2) scaled to the channel's variance: the
        same mean and variance, heavier tails.
        """
        n = max(_MIN_SAMPLES_PER_CHANNEL, total // max(self.channels, 1))
        z = standardized_quantiles((np.arange(n) + 0.5) / n, tail_dof)
        return self.mean[:, None] + np.sqrt(self.var)[:, None] * z[None, :]

    def map(self, fn, rule, total=DEFAULT_TOTAL_SAMPLES):
        """Pushes the samples through an elementwise `fn`.

        Returns:
            `(samples, gaussians)`: the mapped samples `(channels, n)` and the
            moment-matched `ChannelGaussians` of the output.
        """
        mapped = fn(self.samples(total))
        return mapped, ChannelGaussians(mapped.mean(axis=1), mapped.var(axis=1), rule)


def standardized_quantiles(q, tail_dof=None):
    """Quantiles of a zero-mean, unit-variance normal, or Student t with `tail_dof` > 2."""
    if tail_dof is None:
        return special.ndtri(q)
    if not tail_dof > 2:
        raise ValueError(f"`tail_dof` must be > 2 (finite variance); got {tail_dof}.")
    return stats.t.ppf(q, tail_dof) * np.sqrt((tail_dof - 2.0) / tail_dof)


def batchnorm_gaussians(gamma, beta):
    """The BatchNorm output model `Normal(beta_k, gamma_k^2)`."""
    return ChannelGaussians(beta, np.square(gamma), "batchnorm")


def layernorm_gaussians(gamma, beta):
    """The output model `Normal(beta_k, gamma_k^2)` of a LayerNormalization over the channel axis.

    At every position the channels are normalized to mean 0 and variance 1
    across channels, then scaled by `gamma` and shifted by `beta`. Taking
    each channel's normalized value as standard normal over positions (true
    on average over the channels, approximate for any one of them) gives
    BatchNorm's model.
    """
    return ChannelGaussians(
        np.asarray(beta, dtype=np.float64), np.square(np.asarray(gamma, dtype=np.float64)), "layernorm"
    )


def add_gaussians(inputs, rule="propagated: add"):
    """Sum of independent tensors: means and variances add."""
    return ChannelGaussians(
        np.sum([g.mean for g in inputs], axis=0), np.sum([g.var for g in inputs], axis=0), rule
    )


def concatenate_gaussians(inputs, rule="propagated: concatenate"):
    """Channel-wise concatenation."""
    return ChannelGaussians(
        np.concatenate([g.mean for g in inputs]), np.concatenate([g.var for g in inputs]), rule
    )


def tiled_gaussians(gaussians, repeats):
    """Channels `k` of `repeats * channels`, each channel `k mod channels` of `gaussians`."""
    return ChannelGaussians(np.tile(gaussians.mean, repeats), np.tile(gaussians.var, repeats), gaussians.rule)


def mixed_gaussians(gaussians, channels, rule=None):
    """`channels` channels, channel `k` an equal mixture of channels `k, k + channels, ...` (moment-matched)."""
    means = gaussians.mean.reshape(-1, channels)
    second_moments = (gaussians.var + np.square(gaussians.mean)).reshape(-1, channels)
    mean = means.mean(axis=0)
    return ChannelGaussians(mean, second_moments.mean(axis=0) - np.square(mean), rule or gaussians.rule)


# Spatial correlations of a feature map between neighbouring positions that
# the data-free variance of a convolution's output is the largest of
# (docs/method.md §4): real feature maps are spatially correlated (a
# depthwise output's spread was up to 1.6x the independent estimate on a
# CIFAR Xception), and which correlation maximises the spread depends on the
# kernel (a smoothing kernel grows with it, an edge detector shrinks).
SPATIAL_CORRELATIONS = (0.0, 0.5, 0.75, 0.9)


def spatial_correlation_matrix(spatial_shape, rho):
    """`R[t, t']` = `rho ** (L1 distance of taps t and t')`: a separable exponential correlation."""
    grids = np.meshgrid(*[np.arange(n) for n in spatial_shape], indexing="ij")
    taps = np.stack([g.ravel() for g in grids], axis=-1)
    distance = np.abs(taps[:, None, :] - taps[None, :, :]).sum(axis=-1)
    return np.power(float(rho), distance)


def correlated_tap_energy(kernel, correlations=SPATIAL_CORRELATIONS):
    """`max over rho of w^T R(rho) w` for each kernel slice `[..., c, o]` over its spatial taps.

    The variance of `sum_t w_t x_t` for `x` of unit variance whose positions
    are correlated as `spatial_correlation_matrix(rho)`; `rho = 0` gives
    `sum_t w_t^2` (independent positions). Returns `kernel.shape[-2:]`.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    spatial = kernel.shape[:-2]
    flat = kernel.reshape((-1,) + kernel.shape[-2:])
    energy = np.zeros(kernel.shape[-2:])
    for rho in correlations:
        r = spatial_correlation_matrix(spatial, rho)
        energy = np.maximum(energy, np.einsum("sco,st,tco->co", flat, r, flat))
    return energy


def max_pool_gaussians(gaussians, pool_size, correlation=0.5, rule="propagated: max pooling"):
    """Moments of the maximum of `pool_size` values of each channel, equicorrelated.

    Each value is `mean + std (sqrt(rho) Z0 + sqrt(1 - rho) Z_i)` with
    independent standard normals, so the maximum is `mean + std (sqrt(rho) Z0
    + sqrt(1 - rho) M)`, `M` the maximum of `pool_size` independent standard
    normals: mean `mean + std sqrt(1 - rho) E[M]`, variance
    `var (rho + (1 - rho) Var[M])`. Keeping the input's moments (the rule
    before) left the mean of a max-pooled BatchNorm output about half a
    standard deviation low.
    """
    n = 4096
    z = special.ndtri((np.arange(n) + 0.5) / n)
    # M's quantiles: P(M <= m) = Phi(m)^k, so M = Phi^-1(u^(1/k)).
    m = special.ndtri(np.power((np.arange(n) + 0.5) / n, 1.0 / pool_size)) if pool_size > 1 else z
    rho = float(correlation)
    mean = gaussians.mean + np.sqrt(gaussians.var) * np.sqrt(1 - rho) * m.mean()
    var = gaussians.var * (rho + (1 - rho) * m.var())
    return ChannelGaussians(mean, var, rule)


def average_pool_gaussians(gaussians, window_shape, correlation, rule="propagated: average pooling"):
    """Moments of the average of a window of positions correlated as `spatial_correlation_matrix`.

    The mean is kept; the variance is `var * mean(R(correlation))` over the
    window's pairs of positions (`var / size` for independent positions,
    `var` for identical ones). Keeping the input's variance (the rule
    before) made a global average's clip 2-3.4x the calibrated one.
    """
    r = spatial_correlation_matrix(tuple(int(n) for n in window_shape), correlation)
    return ChannelGaussians(gaussians.mean, gaussians.var * r.mean(), rule)


def linear_gaussians(gaussians, kernel, bias, layout, groups=1, tap_weights=None,
                     correlations=SPATIAL_CORRELATIONS):
    """Propagates through a linear layer, input channels independent, padding ignored.

    Args:
        gaussians: `ChannelGaussians` of the input channels.
        kernel: `(in, out)` for "dense", `(..., in // groups, out)` for
            "conv", `(..., in, multiplier)` for "depthwise" (see `layouts`).
        bias: `(out,)` array or None.
        layout: "dense", "conv" or "depthwise".
        groups: channel groups of a "conv" kernel.
        tap_weights: optional array of the kernel's spatial shape: the
            fraction of output positions each tap reaches (a transposed
            convolution's taps reach about `1 / stride` of them); 1 if None.
        correlations: spatial correlations between neighbouring input
            positions the output variance is maximised over (see
            `correlated_tap_energy`); `(0.0,)` for independent positions.
            Not used with `tap_weights`.

    Returns:
        `ChannelGaussians` of the output channels:
        `mean_out = sum c W mean_in + b`, `var_out = sum c W^2 var_in`, the
        sums over the taps and the input channels each output reads, with
        `c` the tap weights (averaged over output positions); for a kernel
        with several taps and no tap weights, `var_out = sum_c var_c
        max_rho w_c^T R(rho) w_c` instead (input channels independent,
        positions correlated).
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    index = input_channel_index(kernel.shape, layout, groups)
    spatial = tuple(range(kernel.ndim - 2))
    weights = np.ones(kernel.shape[:-2]) if tap_weights is None else np.asarray(tap_weights, np.float64)
    weights = weights.reshape(weights.shape + (1, 1))
    summed, squared = (weights * kernel).sum(axis=spatial), (weights * np.square(kernel)).sum(axis=spatial)
    if tap_weights is None and spatial and int(np.prod(kernel.shape[:-2])) > 1:
        squared = correlated_tap_energy(kernel, correlations)
    mean = to_outputs(gaussians.mean[index] * summed, layout)
    var = to_outputs(gaussians.var[index] * squared, layout)
    if bias is not None:
        mean = mean + np.asarray(bias, dtype=np.float64)
    return ChannelGaussians(mean, var, f"propagated: {layout}")

"""NumPy references written from the papers' equations.

- Batch normalization: Ioffe and Szegedy 2015 (arXiv 1502.03167), Alg. 1.
- Batch renormalization: Ioffe 2017 (arXiv 1702.03275), Alg. 1, with the
  renorm statistics kept as in `keras.layers.BatchNormalization(renorm=True)`.

Everything is float64, so the references are independent of the layers'
float32 rounding.
"""

import numpy as np


def _bshape(x, feature_axes):
    return tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))


def _weights(x, mask, feature_axes):
    if mask is None:
        return np.ones(_bshape_mask(x, feature_axes))
    w = np.asarray(mask, dtype=np.float64)
    for a in feature_axes:
        w = np.expand_dims(w, a)
    return w


def _bshape_mask(x, feature_axes):
    return tuple(1 if a in feature_axes else x.shape[a] for a in range(x.ndim))


def batch_moments(x, mask, feature_axes):
    """Mean, biased variance and count over the unmasked positions."""
    x = np.asarray(x, np.float64)
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    w = np.broadcast_to(_weights(x, mask, feature_axes), x.shape)
    n = w.sum(axis=red)
    count = n.reshape(-1)[0]
    safe = max(count, 1.0)
    mean = (w * x).sum(axis=red) / safe
    mb = mean.reshape(_bshape(x, feature_axes))
    var = (w * (x - mb) ** 2).sum(axis=red) / safe
    return mean, var, count


def normalize_train(x, dy, mask, feature_axes, gamma, beta, eps, r=1.0, d=0.0):
    """Training-mode forward and backward of (re)normalization.

    y = gamma * (x_hat * r + d) + beta with x_hat = (x - mu_B) / sigma_B,
    r and d constants (stop_gradient). Returns y, dL/dx, dL/dgamma, dL/dbeta
    for L = sum(dy * y), and the batch moments.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    bs = _bshape(x, feature_axes)
    mean, var, count = batch_moments(x, mask, feature_axes)
    w = np.broadcast_to(_weights(x, mask, feature_axes), x.shape)
    pshape = tuple(x.shape[a] for a in feature_axes)

    def per_feature(v):
        return np.broadcast_to(np.asarray(v, np.float64), pshape).reshape(bs)

    gamma, beta, r, d = (per_feature(v) for v in (gamma, beta, r, d))
    sigma = np.sqrt(var + eps).reshape(bs)
    g = gamma * r
    xhat = (x - mean.reshape(bs)) / sigma
    y = gamma * (xhat * r + d) + beta
    n = max(count, 1.0)
    dl_dmean = -(dy * g / sigma).sum(axis=red, keepdims=True)
    dl_dsigma = -(dy * g * xhat / sigma).sum(axis=red, keepdims=True)
    dx = dy * g / sigma + w / n * (dl_dmean + dl_dsigma * xhat)
    dgamma = (dy * (xhat * r + d)).sum(axis=red)
    dbeta = dy.sum(axis=red)
    return y, dx, dgamma, dbeta, mean, var, count


def normalize_inference(x, feature_axes, mean, var, gamma, beta, eps):
    x = np.asarray(x, np.float64)
    bs = _bshape(x, feature_axes)
    pshape = tuple(x.shape[a] for a in feature_axes)
    mean, var, gamma, beta = (
        np.broadcast_to(np.asarray(v, np.float64), pshape).reshape(bs)
        for v in (mean, var, gamma, beta)
    )
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def ema(old, new, momentum, count=None):
    if count is not None and count == 0:
        return np.asarray(old, np.float64)
    return np.asarray(old) * momentum + np.asarray(new) * (1 - momentum)


def renorm_correction(mean_b, var_b, renorm_mean, renorm_std, eps, rmax, dmax):
    """r and d of Algorithm 1 (running sigma floored at sqrt(eps))."""
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.maximum(renorm_std, np.sqrt(eps))
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
    d = np.clip((mean_b - renorm_mean) / sigma, -dmax, dmax)
    return r, d


class RenormReference:
    """A whole Batch Renormalization layer's training state, step by step."""

    def __init__(self, channels, eps, momentum, renorm_momentum, gamma=None):
        self.eps = eps
        self.momentum = momentum
        self.renorm_momentum = renorm_momentum
        self.gamma = np.ones(channels) if gamma is None else gamma
        self.beta = np.zeros(channels)
        self.moving_mean = np.zeros(channels)
        self.moving_stddev = np.ones(channels)
        self.moving_variance = np.ones(channels)
        self.renorm_mean = np.zeros(channels)
        self.renorm_stddev = np.ones(channels)

    def train(self, x, dy, mask, feature_axes, rmax, dmax):
        mean_b, var_b, count = batch_moments(x, mask, feature_axes)
        r, d = renorm_correction(
            mean_b,
            var_b,
            self.renorm_mean,
            self.renorm_stddev,
            self.eps,
            rmax,
            dmax,
        )
        out = normalize_train(
            x, dy, mask, feature_axes, self.gamma, self.beta, self.eps, r, d
        )
        sigma_b = np.sqrt(var_b + self.eps)
        rm, m = self.renorm_momentum, self.momentum
        self.renorm_mean = ema(self.renorm_mean, mean_b, rm, count)
        self.renorm_stddev = ema(self.renorm_stddev, sigma_b, rm, count)
        self.moving_mean = ema(self.moving_mean, mean_b, m, count)
        self.moving_stddev = ema(self.moving_stddev, sigma_b, m, count)
        self.moving_variance = np.maximum(self.moving_stddev**2 - self.eps, 0.0)
        return out[:4] + (r, d)

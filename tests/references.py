"""NumPy references written from the papers' equations.

- Batch normalization: Ioffe and Szegedy 2015 (arXiv 1502.03167), Alg. 1.
- Batch renormalization: Ioffe 2017 (arXiv 1702.03275), Alg. 1, with the
  renorm statistics kept as in `keras.layers.BatchNormalization(renorm=True)`.
- Weight standardization: Qiao et al. 2019 (arXiv 1903.10520), Eq. 5-6, and
  the scaled variant of Brock et al. 2021 (arXiv 2102.06171), Eq. 2.

Everything is float64, so the references are independent of the layers'
float32 rounding.
"""

import numpy as np


def _bshape(x, feature_axes):
    return tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))


def _weights(x, mask, feature_axes):
    """The mask as float64 weights of `x`'s shape, read as Keras reads it:
    a mask with one axis less than `x` covers every axis but the last and
    is repeated along the last; one of `x`'s rank broadcasts as it is."""
    if mask is None:
        return np.ones(x.shape)
    w = np.asarray(mask, dtype=np.float64)
    if w.ndim == x.ndim - 1:
        w = w[..., None]
    return np.broadcast_to(w, x.shape)


def batch_moments(x, mask, feature_axes):
    """Mean, biased variance and count (per feature) over the unmasked
    positions."""
    x = np.asarray(x, np.float64)
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    w = _weights(x, mask, feature_axes)
    count = w.sum(axis=red)
    safe = np.maximum(count, 1.0)
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
    w = _weights(x, mask, feature_axes)
    pshape = tuple(x.shape[a] for a in feature_axes)

    def per_feature(v):
        return np.broadcast_to(np.asarray(v, np.float64), pshape).reshape(bs)

    gamma, beta, r, d = (per_feature(v) for v in (gamma, beta, r, d))
    sigma = np.sqrt(var + eps).reshape(bs)
    g = gamma * r
    xhat = (x - mean.reshape(bs)) / sigma
    y = gamma * (xhat * r + d) + beta
    n = np.maximum(count, 1.0).reshape(bs)
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
    """The moving average; features whose statistics come from fewer than
    2 values (`count`: none, or one, whose variance 0 estimates nothing)
    keep `old`."""
    moved = np.asarray(old) * momentum + np.asarray(new) * (1 - momentum)
    if count is None:
        return moved
    return np.where(np.asarray(count) >= 2, moved, np.asarray(old, np.float64))


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


# Cross-Iteration Batch Normalization: Yao et al. 2020 (arXiv 2002.05712),
# equations (5)-(9): Taylor-compensated statistics of the last k steps.


def patches(x, kernel_size, strides, padding, dilation):
    """im2col of a channels-last N-d input: (N, *out, prod(k) * C_in).

    'same' pads as TensorFlow does (the extra pixel after), 'causal' pads
    only before.
    """
    x = np.asarray(x, np.float64)
    rank = x.ndim - 2
    pads = [(0, 0)]
    for d in range(rank):
        extent = (kernel_size[d] - 1) * dilation[d] + 1
        size = x.shape[1 + d]
        if padding == "same":
            out = -(-size // strides[d])
            total = max((out - 1) * strides[d] + extent - size, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append((extent - 1, 0))
        else:
            pads.append((0, 0))
    pads.append((0, 0))
    xp = np.pad(x, pads)
    out_shape = [
        (xp.shape[1 + d] - ((kernel_size[d] - 1) * dilation[d] + 1))
        // strides[d]
        + 1
        for d in range(rank)
    ]
    cols = []
    for offset in np.ndindex(*kernel_size):
        index = [slice(None)]
        for d in range(rank):
            start = offset[d] * dilation[d]
            stop = start + (out_shape[d] - 1) * strides[d] + 1
            index.append(slice(start, stop, strides[d]))
        cols.append(xp[tuple(index)])
    # (N, *out, K, C_in) -> (N, *out, K * C_in), kernel-offset major, like
    # a Keras kernel (*k, C_in, C_out) reshaped to (K * C_in, C_out).
    return np.stack(cols, axis=-2).reshape(*xp.shape[:1], *out_shape, -1)


class CBNReference:
    """A cross-iteration batch normalization of a linear layer y = P @ W.

    `P` are the input patches (rows of a Dense input, im2col for a conv),
    `W` the kernel as a (D, C) matrix. Statistics, their derivatives and the
    compensation follow the paper; gradients are central differences of the
    float64 forward. With `compensation_gradient`, the earlier steps' terms
    are evaluated at the perturbed kernel (they are functions of it, eq. 7);
    without it, they are held at the step's kernel (the authors' code). In
    both, which earlier steps enter the average is decided once per step.
    """

    def __init__(
        self,
        channels,
        window_size,
        burnin_steps,
        compensation,
        eps,
        momentum,
        compensation_gradient=True,
        negative_variance="clamp",
    ):
        self.negative_variance = negative_variance
        self.k = window_size
        self.burnin = burnin_steps
        self.compensation = compensation
        self.compensation_gradient = compensation_gradient
        self.eps = eps
        self.momentum = momentum
        self.moving_mean = np.zeros(channels)
        self.moving_variance = np.ones(channels)
        self.buffer = []  # most recent first: (W, dmu, dnu, mu, nu)
        self.step = 0

    @staticmethod
    def _current(P, W, w):
        y = P @ W
        n = w.sum()
        safe = max(n, 1.0)
        mu = (w[:, None] * y).sum(0) / safe
        nu = (w[:, None] * y**2).sum(0) / safe
        return y, mu, nu, n

    def _past(self, W):
        mus, nus = [], []
        for Wp, dmu, dnu, mu, nu in self.buffer:
            if self.compensation:
                mu = mu + dmu @ (W - Wp)  # eq. (7) for the mean
                nu = nu + (dnu * (W - Wp)).sum(0)  # and for nu
            mus.append(mu)
            nus.append(nu)
        return mus, nus

    def _forward(self, P, W, w, gamma, beta, past):
        y, mu, nu, _ = self._current(P, W, w)
        mus, nus, uses = past
        if self.compensation_gradient:
            mus, nus = self._past(W)
        total_mu, total_nu, count = mu.copy(), nu.copy(), np.ones_like(mu)
        for m, v, use in zip(mus, nus, uses):
            if self.negative_variance == "clamp":
                v = np.maximum(v, m**2)  # eq. (9): max(nu, mu^2)
            total_mu += use * m
            total_nu += use * v
            count += use
        mean = total_mu / count  # eq. (8)
        var = total_nu / count - mean**2  # eq. (9)
        out = gamma * (y - mean) / np.sqrt(var + self.eps) + beta
        return out, mean, var, count

    def train(self, x, to_patches, W, gamma, beta, dy, w=None, h=1e-6):
        """One training step on input `x`, with `to_patches(x)` (M, D).

        `W` is (D, C), `dy` (M, C), `w` the mask weights (M,). Returns the
        outputs (M, C), dL/dx, dL/dW, dL/dgamma, dL/dbeta of
        L = sum(dy * outputs), and the number of earlier steps used per
        channel.
        """
        x = np.asarray(x, np.float64)
        P = to_patches(x)
        W = np.asarray(W, np.float64)
        w = np.ones(len(P)) if w is None else np.asarray(w, np.float64)
        mus, nus = self._past(W)
        active = self.step >= self.burnin
        if self.negative_variance == "clamp":  # the paper's eq. (9)
            uses = [np.full(W.shape[1], float(active)) for _ in mus]
        else:  # the authors' code: left out of the channel's average
            uses = [
                ((v - m**2) >= 0).astype(float) * active
                for m, v in zip(mus, nus)
            ]
        past = (mus, nus, uses)

        def loss(x_, W_):
            out_ = self._forward(to_patches(x_), W_, w, gamma, beta, past)
            return (dy * out_[0]).sum()

        out, mean, var, steps = self._forward(P, W, w, gamma, beta, past)
        dx, dW = np.zeros_like(x), np.zeros_like(W)
        for grad, arr, which in ((dx, x, 0), (dW, W, 1)):
            for idx in np.ndindex(*arr.shape):
                plus, minus = arr.copy(), arr.copy()
                plus[idx] += h
                minus[idx] -= h
                if which == 0:
                    grad[idx] = loss(plus, W) - loss(minus, W)
                else:
                    grad[idx] = loss(x, plus) - loss(x, minus)
        dx /= 2 * h
        dW /= 2 * h
        xhat = (out - beta) / gamma
        dgamma = (dy * xhat).sum(0)
        dbeta = dy.sum(0)

        y, mu, nu, n = self._current(P, W, w)
        # The moving statistics follow the window's (those the step
        # normalizes with), from n values per step of the window.
        m = self.momentum
        values = n * steps
        self.moving_mean = ema(self.moving_mean, mean, m, values)
        self.moving_variance = ema(self.moving_variance, var, m, values)
        if self.k > 1 and active and n > 0:
            dmu = (w[:, None] * P).sum(0) / n  # d mu / d W[:, c], any c
            dnu = 2 * (w[:, None] * P).T @ y / n  # d nu / d W
            self.buffer.insert(0, (W, dmu, dnu, mu, nu))
            del self.buffer[self.k - 1 :]
        self.step += 1
        return out, dx, dW, dgamma, dbeta, sum(uses)


def standardize_kernel(kernel, reduction_axes, eps, gain=None):
    """`(W - mean) / sqrt(var + eps)` per output channel, the mean and the
    biased variance over `reduction_axes`; with `gain` (shaped to broadcast
    against the kernel) the scaled variant, `gain * W_hat / sqrt(fan_in)`.

    Returns `(W_hat, backward)`, `backward(dW_hat)` giving `(dW, dgain)`:
    with `Z = (W - mean) / sigma` and `a` the factor after it,
    `dZ = a dW_hat` and `dW = (dZ - mean(dZ) - Z mean(dZ Z)) / sigma`
    (the chain rule through the mean and the variance)."""
    w = np.asarray(kernel, np.float64)
    axes = tuple(reduction_axes)
    mean = w.mean(axis=axes, keepdims=True)
    sigma = np.sqrt(((w - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    z = (w - mean) / sigma
    factor = 1.0
    if gain is not None:
        fan_in = np.prod([w.shape[a] for a in axes])
        factor = np.asarray(gain, np.float64) / np.sqrt(fan_in)

    def backward(d_hat):
        d_hat = np.asarray(d_hat, np.float64)
        dz = factor * d_hat
        dw = dz - dz.mean(axis=axes, keepdims=True)
        dw = (dw - z * (dz * z).mean(axis=axes, keepdims=True)) / sigma
        dgain = None
        if gain is not None:
            dgain = (d_hat * z).sum(axis=axes, keepdims=True) / np.sqrt(fan_in)
        return dw, dgain

    return factor * z, backward

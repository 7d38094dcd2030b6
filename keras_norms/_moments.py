"""Moments and what the layers do with them, written once with `keras.ops`.

Private module: per-feature moments (masked, or over the global batch via
`_reductions`), the one rule for which statistics may update the moving
ones (`updatable`), the safe moving average, and the normalization and
affine maps that apply them. This is the general path on every backend,
the reference every fast path of `_backend` is tested against; where a
backend has a faster kernel for a case, the helper asks `_backend` first.
Nothing here holds state; the helpers that update moving statistics take
the variable and assign to it.
"""

import math
import warnings

from keras import backend
from keras import ops

from keras_norms import _axes
from keras_norms import _backend
from keras_norms import _reductions


def moments(inputs, axes, mask=None, synchronized=False, shift=None):
    """Per-feature mean and (biased) variance over `axes`.

    Args:
        inputs: Tensor of float dtype (float32 or wider).
        axes: Tuple of reduction axes (see `_axes.reduction_axes`).
        mask: Optional `_axes.broadcast_mask` (boolean, of `inputs`' rank);
            the positions where it is false take no part in the statistics.
        synchronized: If `True`, the statistics are over the global batch
            (see `_reductions.synchronized_moments`), as they always are
            under a `keras.distribution` on JAX.
        shift: Optional per-feature constant near the mean, shared by the
            replicas (e.g. the moving mean), for
            `_reductions.synchronized_moments`.

    Returns:
        `(mean, variance, count)`, mean and variance with the reduced axes
        removed. `count` is the number of positions that entered the
        statistics: with `mask`, per feature (of size 1 along a feature
        axis where the mask does not vary); without, the same for every
        feature (`_axes.position_count`: a Python int where the shape is
        known; over the global batch when synchronized). With every
        position masked, mean and variance are 0 (never NaN).
    """
    if synchronized or _backend.global_batch_program():
        # One-pass sums: the collective(s) for them fuse into one.
        mean, variance, count, _ = _reductions.synchronized_moments(
            inputs, axes, mask, shift
        )
        return mean, variance, count
    if mask is None:
        # Two passes on every backend (as tf.nn.moments does): Keras's torch
        # backend uses E[x^2] - E[x]^2, which loses the variance to float32
        # cancellation when |mean| >> std.
        count = _axes.position_count(inputs, axes)
        if isinstance(count, int) and count > 0:
            mean = ops.mean(inputs, axis=axes, keepdims=True)
            centered = inputs - ops.stop_gradient(mean)
            variance = ops.mean(ops.square(centered), axis=axes)
            return ops.squeeze(mean, axis=axes), variance, count
        # A size unknown when traced (or 0): sums over at least 1, so that
        # an empty batch's moments are 0, not NaN (see `zero_if_empty`).
        safe = ops.maximum(ops.cast(count, inputs.dtype), 1.0)
        mean = ops.sum(inputs, axis=axes, keepdims=True) / safe
        centered = inputs - ops.stop_gradient(mean)
        variance = ops.sum(ops.square(centered), axis=axes) / safe
        return ops.squeeze(mean, axis=axes), variance, count
    fast = _backend.masked_moments(inputs, axes, mask)
    if fast is not None:
        return fast
    # `where`, not a product with the mask: padding may hold inf or NaN.
    weighted = ops.where(mask, inputs, 0.0)
    count = _axes.mask_count(mask, inputs, axes)
    safe = ops.maximum(count, 1.0)
    mean = ops.sum(weighted, axis=axes, keepdims=True) / safe
    centered = ops.where(mask, inputs - mean, 0.0)
    variance = ops.sum(ops.square(centered), axis=axes, keepdims=True) / safe
    return tuple(ops.squeeze(v, axis=axes) for v in (mean, variance, count))


def updatable(mean, variance, count, minimum=2):
    """Per feature, whether a batch's statistics may enter the moving ones:
    both finite (an empty batch's are NaN, and so are those of a feature
    with a NaN or inf in the batch) and taken from at least `minimum`
    values: `count` positions (see `moments`; a Python int or a tensor).
    One value per feature (a `Dense` output at batch size 1) has variance
    0 whatever the data: it estimates nothing, and would pull the moving
    variance towards 0. The one rule every layer's statistics updates
    follow; CBN stores a step of one value in its window (`minimum=1`),
    where the other steps give it a spread."""
    update = ops.isfinite(mean + variance)  # one test for both
    if isinstance(count, int):  # known when traced: no test at run time
        return update if count >= minimum else ops.zeros_like(update)
    return ops.logical_and(update, count >= minimum)


def one_value(count):
    """Whether statistics over `count` positions (see `moments`) come from
    a single value per feature: a Python bool where `count` is a Python
    int, else a boolean tensor."""
    if isinstance(count, int):
        return count == 1
    return ops.equal(count, 1)


def streaming_stddev(mean, stddev, value, momentum, epsilon):
    """The exponentially weighted stddev after one more value per feature
    (`value`), for statistics kept as a mean and `stddev = sqrt(variance +
    epsilon)`: with `delta = value - mean`, `variance = momentum *
    (variance + (1 - momentum) * delta**2)`, the variance of the weights
    that move the mean by `(1 - momentum) * delta` (as `moving_average`
    moves it towards a batch whose mean is `value`). A batch of one value
    per feature has no variance of its own; its deviation from the running
    mean has."""
    delta = value - mean
    variance = ops.relu(ops.square(stddev) - epsilon)
    variance = momentum * (variance + (1.0 - momentum) * ops.square(delta))
    return ops.sqrt(variance + epsilon)


def warn_if_one_value(layer, count):
    """Warns, once per layer, when a training batch gives each feature one
    value (`count`, positions per feature, equals 1: a `Dense` output at
    batch size 1): its variance is 0, every normalized output is the same,
    and nothing before the layer can learn through it.

    A count known when the step is traced (eager calls, JAX, PyTorch,
    TensorFlow with a known batch size) is checked in Python, at no cost
    per step; an unknown one on TensorFlow (e.g. after `fit()` met a batch
    of another size) by `_backend.warn_when`, once (the flag made by
    `prepare_one_value_warning`)."""
    if getattr(layer, "_warned_one_value", False):
        return

    def warn():
        if getattr(layer, "_warned_one_value", False):
            return
        layer._warned_one_value = True
        warnings.warn(
            f"{type(layer).__name__} {layer.name!r} got a training batch "
            "with one value per feature (e.g. batch size 1 after a Dense "
            f"layer): its batch variance is 0. {layer.ONE_VALUE_BEHAVIOUR} "
            "For online learning, keras_norms."
            "CrossIterationBatchNormalization(Dense(..., use_bias=False), "
            "window_size=8) normalizes with the statistics of the last "
            "steps; keras.layers.LayerNormalization, or batches of 2 or "
            "more, also learn. (Warned once per layer.)",
            UserWarning,
        )

    single = one_value(count)
    if isinstance(single, bool):
        if single:
            warn()
        return
    _backend.warn_when(
        single, warn, getattr(layer, "_one_value_warning_flag", None)
    )


def prepare_one_value_warning(layer):
    """For a layer's `build` (outside any traced step): the flag with which
    a compiled step warns once (`_backend.warning_flag`), kept out of the
    layer's weights and saved state."""
    object.__setattr__(
        layer, "_one_value_warning_flag", _backend.warning_flag()
    )


def zero_if_empty(inputs, *statistics):
    """`statistics` of `inputs`, or zeros when `inputs` has no element.

    An empty batch's moments from a fused kernel are NaN (0 / 0). Its
    output is empty whatever normalizes it, but a NaN statistic would still
    turn the gradients of the weights it meets into NaN (0 * NaN); zeros
    keep them at 0, as `moments` gives them. A batch of a known, non-zero
    size costs nothing here."""
    shape = tuple(inputs.shape)
    if None not in shape and math.prod(shape) > 0:
        return statistics
    nonempty = ops.size(inputs) > 0
    return tuple(ops.where(nonempty, s, ops.zeros_like(s)) for s in statistics)


def moving_average(variable, value, momentum, update, instead=None):
    """Assigns `variable * momentum + value * (1 - momentum)` to `variable`
    where `update` (see `updatable`) is true; elsewhere the variable keeps
    its value. `instead`: optional `(where, new)`, a new value computed
    otherwise (e.g. `streaming_stddev`) that the variable takes where
    `where` is true. Returns the new value in `value`'s dtype."""
    old = ops.cast(variable, value.dtype)
    new = old * momentum + value * (1.0 - momentum)
    if instead is not None:
        where, other = instead
        new = ops.where(where, other, new)
        update = ops.logical_or(update, where)
    new = ops.where(update, new, old)
    variable.assign(ops.cast(new, variable.dtype))
    return new


def normalize(inputs, mean, variance, scale, offset, epsilon, shape):
    """`(inputs - mean) / sqrt(variance + epsilon) * scale + offset`.

    `mean`, `variance`, `scale` and `offset` are per-feature tensors that are
    reshaped to `shape` (see `broadcast_shape`); `scale`/`offset` may be None.
    Computed as one multiply and one add per element.
    """
    inv = ops.rsqrt(variance + epsilon)
    if scale is not None:
        inv = inv * scale
    shift = -mean * inv
    if offset is not None:
        shift = shift + offset
    return affine(inputs, inv, shift, shape)


def normalize_with(inputs, mean, variance, scale, offset, epsilon, axes):
    """`normalize` with statistics that take no gradient (the moving ones,
    at inference), over one or more feature `axes`.

    On PyTorch, one feature axis that is the last or axis 1 runs torch's
    inference-mode kernel (`_backend.normalize_with`); elsewhere
    `normalize`.
    """
    outputs = _backend.normalize_with(
        inputs, mean, variance, scale, offset, epsilon, axes
    )
    if outputs is not None:
        return outputs
    shape = _axes.broadcast_shape(inputs.shape, axes)
    return normalize(inputs, mean, variance, scale, offset, epsilon, shape)


def affine(inputs, scale, offset, shape):
    """`inputs * scale + offset`, per-feature `scale` and `offset` reshaped
    to `shape` (on PyTorch one `addcmul` kernel, not two)."""
    scale, offset = ops.reshape(scale, shape), ops.reshape(offset, shape)
    return _backend.multiply_add(inputs, scale, offset)


def compute_dtype_for(inputs):
    """float32 for float16/bfloat16/float32 inputs; float64 stays float64."""
    return backend.result_type(inputs.dtype, "float32")


def compose(r, d, scale, offset):
    """Folds the renormalization `x_hat * r + d` into scale and offset:
    `gamma * (x_hat * r + d) + beta = x_hat * (gamma * r) + (gamma * d +
    beta)`."""
    new_scale = r if scale is None else scale * r
    new_offset = d if scale is None else scale * d
    if offset is not None:
        new_offset = new_offset + offset
    return new_scale, new_offset

"""Statistics over the global batch: sums across replicas and processes.

Private module. `all_reduce_sum` sums a list of tensors over the replicas
with ONE collective (a `tf.distribute` replica context on TensorFlow, a
`torch.distributed` process group on PyTorch: `_backend.replica_sum`); on
JAX, a step under a `keras.distribution` is one program over the global
batch (`_backend.global_batch_program`), whose sums XLA already makes
global. `synchronized_moments` builds the layers' global moments on it.
"""

import math

from keras import ops

from keras_norms import _axes
from keras_norms import _backend


def all_reduce_sum(values):
    """Sums a list of tensors over the replicas, with ONE collective.

    The tensors are flattened into one vector for a single differentiable
    all-reduce: the strategy's with TensorFlow inside a `tf.distribute`
    replica context, `torch.distributed`'s with PyTorch inside a process
    group of several processes. Elsewhere the values are returned as they
    are: on JAX, `keras.distribution` compiles one program over the global
    batch, so a sum over the batch axis already is the global sum (XLA
    inserts the collective).
    """
    replica_sum = _backend.replica_sum()
    if replica_sum is None:
        return list(values)
    sizes = [math.prod(v.shape) for v in values]
    flat = ops.concatenate([ops.reshape(v, (-1,)) for v in values], axis=0)
    flat = replica_sum(flat)
    out, start = [], 0
    for v, n in zip(values, sizes):
        out.append(ops.reshape(flat[start : start + n], ops.shape(v)))
        start += n
    return out


def synchronized_moments(inputs, axes, mask=None, shift=None, sums=()):
    """`_moments.moments` over the global batch, with one all-reduce.

    Each replica sums `x - shift` and its square (and counts positions);
    these sums, plus any extra per-replica `sums` a layer needs reduced in
    the same collective, go through one `all_reduce_sum`. The variance is
    `E[(x - shift)^2] - E[x - shift]^2`: `shift` (a per-feature constant
    that every replica shares, e.g. the moving mean) keeps the float32
    cancellation of that difference small once it approximates the mean.

    Returns `(mean, variance, count, sums)`: `count` is the global number of
    positions (a scalar without a mask; per feature with one, as in
    `_moments.moments`) and `sums` the globally summed extras.
    """
    ndim = len(inputs.shape)
    feature_axes = tuple(a for a in range(ndim) if a not in axes)
    if shift is None:
        shifted = inputs
    else:
        shape = _axes.broadcast_shape(inputs.shape, feature_axes)
        shifted = inputs - ops.reshape(ops.stop_gradient(shift), shape)
    if mask is None:
        count = ops.cast(
            ops.size(inputs)
            // math.prod(inputs.shape[a] for a in feature_axes),
            inputs.dtype,
        )
    else:
        # `where`, not a product with the mask: padding may hold inf or NaN.
        shifted = ops.where(mask, shifted, 0.0)
        count = ops.squeeze(_axes.mask_count(mask, inputs, axes), axis=axes)
    total, total_sq, count, *sums = all_reduce_sum(
        [
            ops.sum(shifted, axis=axes),
            ops.sum(ops.square(shifted), axis=axes),
            count,
            *sums,
        ]
    )
    safe = ops.maximum(count, 1.0)
    centered_mean = total / safe
    variance = ops.relu(total_sq / safe - ops.square(centered_mean))
    if shift is None:
        return centered_mean, variance, count, sums
    mean = centered_mean + ops.stop_gradient(shift)
    return mean, variance, count, sums

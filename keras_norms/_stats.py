"""Shared batch-normalization math, written once with `keras.ops`.

Private module: the layers call these helpers so that each layer file reads
as its paper's algorithm. Nothing here holds state; the helpers that update
moving statistics take the variable and assign to it.
"""

import functools
import math

from keras import backend
from keras import ops

from keras_norms import _axes


def positions_layout_helps():
    """Whether features-last inputs train faster viewed as `(positions,
    features)` (`as_positions`): on TensorFlow, whose XLA reduces this
    layout far faster than the same reduction over several leading axes
    (0.3x the time for a 32x32x32x64 batch norm step on CPU), and on
    PyTorch (one 2-D reduction). Not on JAX, whose XLA reduces both layouts
    alike but compiled the train step around the reshape 1.16-1.21x slower
    on 32x100x256 and 32x32x32x64 (README, "Speed")."""
    return backend.backend() != "jax"


def _replica_context():
    """The `tf.distribute` replica context when there are several replicas
    to synchronize with (TensorFlow backend), else None."""
    if backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def global_batch_program():
    """Whether the step is one program over a batch split across devices:
    the JAX backend under a `keras.distribution` (XLA partitions it and
    inserts the collectives). Batch statistics there are always global."""
    if backend.backend() != "jax":
        return False
    from keras import distribution

    return distribution.distribution() is not None


def _torch_process_group():
    """Whether a `torch.distributed` process group of several processes
    is initialized (PyTorch backend)."""
    if backend.backend() != "torch":
        return False
    import torch.distributed as dist

    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


@functools.cache
def _torch_all_reduce():
    """A differentiable `torch.distributed.all_reduce` (sum): the backward
    of a sum over processes is the sum over processes of the gradients, as
    in torch's own `SyncBatchNorm`. Defined once (cached)."""
    import torch
    import torch.distributed as dist

    class AllReduceSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, flat):
            flat = flat.clone()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            return flat

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            return grad

    return AllReduceSum.apply


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
    ctx = _replica_context()
    if ctx is None and not _torch_process_group():
        return list(values)
    sizes = [math.prod(v.shape) for v in values]
    flat = ops.concatenate([ops.reshape(v, (-1,)) for v in values], axis=0)
    if ctx is None:
        flat = _torch_all_reduce()(flat)
    else:
        import tensorflow as tf

        flat = ctx.all_reduce(tf.distribute.ReduceOp.SUM, flat)
    out, start = [], 0
    for v, n in zip(values, sizes):
        out.append(ops.reshape(flat[start : start + n], ops.shape(v)))
        start += n
    return out


def synchronized_moments(inputs, axes, mask=None, shift=None, sums=()):
    """`moments` over the global batch, with one all-reduce.

    Each replica sums `x - shift` and its square (and counts positions);
    these sums, plus any extra per-replica `sums` a layer needs reduced in
    the same collective, go through one `all_reduce_sum`. The variance is
    `E[(x - shift)^2] - E[x - shift]^2`: `shift` (a per-feature constant
    that every replica shares, e.g. the moving mean) keeps the float32
    cancellation of that difference small once it approximates the mean.

    Returns `(mean, variance, count, sums)`: `count` is the global number of
    positions (a scalar without a mask; per feature with one, as in
    `moments`) and `sums` the globally summed extras.
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


def moments(inputs, axes, mask=None, synchronized=False, shift=None):
    """Per-feature mean and (biased) variance over `axes`.

    Args:
        inputs: Tensor of float dtype (float32 or wider).
        axes: Tuple of reduction axes (see `reduction_axes`).
        mask: Optional `broadcast_mask` (boolean, of `inputs`' rank); the
            positions where it is false take no part in the statistics.
        synchronized: If `True`, the statistics are over the global batch
            (see `synchronized_moments`), as they always are under a
            `keras.distribution` on JAX.
        shift: Optional per-feature constant near the mean, shared by the
            replicas (e.g. the moving mean), for `synchronized_moments`.

    Returns:
        `(mean, variance, count)`, mean and variance with the reduced axes
        removed. `count` is the number of positions that entered the
        statistics when `mask` is given (per feature, of size 1 along a
        feature axis where the mask does not vary), else `None`. With every
        position masked, mean and variance are 0 (never NaN).
    """
    if synchronized or global_batch_program():
        # One-pass sums: the collective(s) for them fuse into one.
        mean, variance, count, _ = synchronized_moments(
            inputs, axes, mask, shift
        )
        return mean, variance, None if mask is None else count
    if mask is None:
        # Two passes on every backend (as tf.nn.moments does): Keras's torch
        # backend uses E[x^2] - E[x]^2, which loses the variance to float32
        # cancellation when |mean| >> std.
        mean = ops.mean(inputs, axis=axes, keepdims=True)
        centered = inputs - ops.stop_gradient(mean)
        variance = ops.mean(ops.square(centered), axis=axes)
        return ops.squeeze(mean, axis=axes), variance, None
    if backend.backend() == "torch":
        fast = _torch_masked_moments(inputs, axes, mask)
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


def updatable(mean, variance, count=None):
    """Per feature, whether a batch's statistics may enter the moving ones:
    both finite (an empty batch's are NaN, and so are those of a feature
    with a NaN or inf in the batch) and, with a mask, from at least one
    position. The one rule every layer's statistics updates follow."""
    update = ops.isfinite(mean + variance)  # one test for both
    if count is not None:
        update = ops.logical_and(update, count > 0)
    return update


def zero_if_empty(inputs, *statistics):
    """`statistics` of `inputs`, or zeros when `inputs` has no element.

    An empty batch's moments are NaN (0 / 0). Its output is empty whatever
    normalizes it, but a NaN statistic would still turn the gradients of
    the weights it meets into NaN (0 * NaN); zeros keep them at 0. A batch
    of a known, non-zero size costs nothing here."""
    shape = tuple(inputs.shape)
    if None not in shape and math.prod(shape) > 0:
        return statistics
    nonempty = ops.size(inputs) > 0
    return tuple(ops.where(nonempty, s, ops.zeros_like(s)) for s in statistics)


def moving_average(variable, value, momentum, update):
    """Assigns `variable * momentum + value * (1 - momentum)` to `variable`
    where `update` (see `updatable`) is true; elsewhere the variable keeps
    its value. Returns the new value in `value`'s dtype."""
    old = ops.cast(variable, value.dtype)
    new = ops.where(update, old * momentum + value * (1.0 - momentum), old)
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
    inference-mode kernel (`torch.nn.functional.batch_norm`: one pass, and
    one for each gradient that is needed); elsewhere `normalize`.
    """
    ndim = len(inputs.shape)
    if backend.backend() == "torch" and ndim >= 2 and len(axes) == 1:
        import torch

        if axes == (ndim - 1,) and ndim != 2:
            x = inputs.reshape(-1, inputs.shape[-1])
        elif axes == (1,):
            x = inputs
        else:
            x = None
        if x is not None:
            outputs = torch.nn.functional.batch_norm(
                x, mean, variance, scale, offset, False, 0.0, epsilon
            )
            return outputs.reshape(inputs.shape)
    shape = _axes.broadcast_shape(inputs.shape, axes)
    return normalize(inputs, mean, variance, scale, offset, epsilon, shape)


def affine(inputs, scale, offset, shape):
    """`inputs * scale + offset`, per-feature `scale` and `offset` reshaped
    to `shape` (on PyTorch one `addcmul` kernel, not two)."""
    scale, offset = ops.reshape(scale, shape), ops.reshape(offset, shape)
    if backend.backend() == "torch":
        import torch

        return torch.addcmul(offset, inputs, scale)
    return inputs * scale + offset


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


def _as_nhwc(inputs):
    """`inputs` (features last) as `(batch, positions, 1, features)`, in the
    NHWC layout of TensorFlow's fused kernel: each example one image of
    `positions` rows (a 2-D input: one pixel). With oneDNN (TensorFlow's
    default on x86), BN and BRN train steps take 0.96x the time they take
    with the whole batch as one image on 32x100x256, 0.98-0.99x on
    32x32x32x64 and the same (0.99-1.04x) on 256x1024; as `positions`
    images of one pixel, 4-D steps were 1.05x (README, "Speed")."""
    import tensorflow as tf

    inner = inputs.shape[1:-1]
    if None in inner:
        positions = tf.reduce_prod(tf.shape(inputs)[1:-1])
    else:  # known: a constant, no op (and no -1, which an empty batch
        # could not resolve)
        positions = math.prod(inner)
    return tf.reshape(
        inputs, [tf.shape(inputs)[0], positions, 1, inputs.shape[-1]]
    )


# The fused kernel pays for itself above this many input elements. Below
# it, its fixed cost outweighs the passes it saves: on 2 CPU cores with
# oneDNN, BN/BRN train steps on the general path took 0.75-1.07x / 0.78-0.96x
# the fused path's time on 2-D and 3-D inputs of 4K-262K elements (1.00x /
# 0.90x on 256x1024), but 1.04-1.43x / 0.98-1.16x from 409K elements up
# (README, "Speed"). An input whose size is unknown when traced is fused.
FUSE_ABOVE_SIZE = 2**18


def can_fuse(inputs, feature_axes, synchronized):
    """Whether the backend's own batch-norm kernel applies to a training
    batch: one feature axis that is the last, no cross-replica statistics,
    and

    - TensorFlow: a float32 input of more than `FUSE_ABOVE_SIZE` elements,
      not compiled by XLA (`tf.nn.fused_batch_norm`);
    - PyTorch: more than one position per feature (its kernel refuses one),
      float32 or float64 (`torch.nn.functional.batch_norm`).
    """
    shape = tuple(inputs.shape)
    if synchronized or feature_axes != (len(shape) - 1,):
        return False
    dtype = backend.standardize_dtype(inputs.dtype)
    if backend.backend() == "torch":
        return dtype in ("float32", "float64") and _positions_known(shape) > 1
    return (
        backend.backend() == "tensorflow"
        and dtype == "float32"
        and (None in shape or math.prod(shape) > FUSE_ABOVE_SIZE)
        and not _in_xla_compilation()
    )


def _positions_known(shape):
    """Positions per feature of a features-last shape (0 if unknown)."""
    return 0 if None in shape else math.prod(shape[:-1])


def _in_xla_compilation():
    """Whether TensorFlow is tracing a function for XLA (`jit_compile`).

    XLA rewrites the fused kernel with a one-pass variance (E[x^2] -
    E[x]^2, which float32 loses when |mean| >> std) and runs the general
    path on `(positions, features)` faster anyway. This asks a private
    TensorFlow helper (there is no public one); should it move, the answer
    is "yes", which picks the general path.
    """
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        graph = tf.compat.v1.get_default_graph()
        return bool(control_flow_util.GraphOrParentsInXlaContext(graph))
    except (ImportError, AttributeError):
        return True


def _positions(inputs):
    """The number of positions per feature of a features-last input: a
    Python float for a known shape (a constant, no op), else a tensor."""
    import tensorflow as tf

    positions = inputs.shape[:-1]
    if None in positions:
        return tf.cast(tf.size(inputs) // inputs.shape[-1], inputs.dtype)
    return float(math.prod(positions))


def _biased(variance, inputs):
    """The biased variance from the kernel's Bessel-corrected one."""
    import tensorflow as tf

    n = _positions(inputs)
    return variance * ((n - 1.0) / tf.maximum(n, 1.0))


def fused_batch_norm(inputs, scale, offset, epsilon):
    """Training-mode `tf.compat.v1.nn.fused_batch_norm` (features last).

    Returns `(outputs, mean, variance)` with the biased batch variance, like
    `moments` (the kernel reports the Bessel-corrected one).
    """
    if backend.backend() == "torch":
        return _torch_fused_batch_norm(inputs, scale, offset, epsilon)
    import tensorflow as tf

    channels = inputs.shape[-1]
    if scale is None:
        scale = tf.ones((channels,), inputs.dtype)
    if offset is None:
        offset = tf.zeros((channels,), inputs.dtype)
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        _as_nhwc(inputs),
        scale,
        offset,
        epsilon=epsilon,
        data_format="NHWC",
        is_training=True,
    )
    variance = _biased(variance, inputs)
    return tf.reshape(outputs, tf.shape(inputs)), mean, variance


def fused_renormalization(inputs, correct, scale, offset, epsilon):
    """Training-mode renormalization with TensorFlow's fused kernels.

    `outputs = x_hat * (scale * r) + (scale * d + offset)` where `x_hat` is
    the batch-normalized input and `(r, d) = correct(mean, variance)` are
    constants computed from the batch moments (`correct` may update
    statistics). The training-mode kernel gives the (two-pass) moments; the
    outputs are then one inference-mode kernel call on the inputs with those
    moments and the renormalized scale and offset (one multiply-add per
    element, 0.90x the time of a separate multiply and add over the
    kernel's `x_hat`). The gradient is the training-mode kernel's gradient
    at scale `scale * r`, whose by-products `sum(dy * x_hat)` and `sum(dy)`
    give the gradients of `scale` and `offset`: no extra reduction over the
    batch. `scale`/`offset` may be None. Returns the outputs.
    """
    if backend.backend() == "torch":
        return _torch_fused_renormalization(
            inputs, correct, scale, offset, epsilon
        )
    import tensorflow as tf

    shape = tf.shape(inputs)
    channels = inputs.shape[-1]
    inputs = _as_nhwc(inputs)
    ones = tf.ones((channels,), inputs.dtype)
    _, mean, variance, *saved = tf.raw_ops.FusedBatchNormV3(
        x=tf.stop_gradient(inputs),
        scale=ones,
        offset=tf.zeros((channels,), inputs.dtype),
        mean=tf.zeros((0,), inputs.dtype),
        variance=tf.zeros((0,), inputs.dtype),
        epsilon=epsilon,
        data_format="NHWC",
        is_training=True,
    )
    variance = _biased(variance, inputs)
    # An empty batch's r, d are NaN: zeros keep its gradients at 0.
    r, d = zero_if_empty(inputs, *correct(mean, variance))
    r, d = tf.stop_gradient(r), tf.stop_gradient(d)

    @tf.custom_gradient
    def renormalize(inputs, scale, offset):
        total_scale = scale * r
        outputs = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=total_scale,
            offset=scale * d + offset,
            mean=mean,
            variance=variance,
            epsilon=epsilon,
            data_format="NHWC",
            is_training=False,
        )[0]

        def grad(dy):
            dx, d_total_scale, d_offset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=inputs,
                scale=total_scale,
                reserve_space_1=saved[0],
                reserve_space_2=saved[1],
                reserve_space_3=saved[2],
                epsilon=epsilon,
                data_format="NHWC",
                is_training=True,
            )
            return dx, d_total_scale * r + d_offset * d, d_offset

        return outputs, grad

    outputs = renormalize(
        inputs,
        ones if scale is None else scale,
        tf.zeros_like(ones) if offset is None else offset,
    )
    return tf.reshape(outputs, shape)


def fused_normalization(inputs, statistics, scale, offset, epsilon):
    """Training-mode normalization with statistics derived from the batch's
    moments, on TensorFlow's fused kernels (features last).

    `(mean, variance) = statistics(batch_mean, batch_variance)` maps the
    (two-pass) batch moments from the training-mode kernel to the
    statistics that normalize, differentiably (e.g. averages with earlier
    steps; `statistics` may update state). Returns
    `(inputs - mean) / sqrt(variance + epsilon) * scale + offset`, one
    inference-mode kernel call. The gradient: the inference-mode gradient
    kernel gives the input's direct term and, from its by-products
    `sum(dy * x_hat)` and `sum(dy)`, the gradients of `scale`, `offset`,
    `mean` and `variance`; the batch moments add
    `d_mean / N + d_variance * 2 (x - batch_mean) / N`, one multiply-add
    per element. `scale`/`offset` may be None.
    """
    if backend.backend() == "torch":
        return _torch_fused_normalization(
            inputs, statistics, scale, offset, epsilon
        )
    import tensorflow as tf

    shape = tf.shape(inputs)
    channels = inputs.shape[-1]
    inputs = _as_nhwc(inputs)
    dtype = inputs.dtype
    ones = tf.ones((channels,), dtype)
    zeros = tf.zeros((channels,), dtype)
    positions = tf.maximum(_positions(inputs), 1.0)

    @tf.custom_gradient
    def batch_moments(x):
        _, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=ones,
            offset=zeros,
            mean=tf.zeros((0,), dtype),
            variance=tf.zeros((0,), dtype),
            epsilon=epsilon,
            data_format="NHWC",
            is_training=True,
        )
        variance = _biased(variance, x)

        def grad(d_mean, d_variance):
            b = 2.0 * d_variance / positions
            return x * b + (d_mean / positions - mean * b)

        return (mean, variance), grad

    @tf.custom_gradient
    def apply(x, mean, variance, scale, offset):
        outputs, _, _, _, _, reserve = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=mean,
            variance=variance,
            epsilon=epsilon,
            data_format="NHWC",
            is_training=False,
        )

        def grad(dy):
            dx, d_scale, d_offset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=x,
                scale=scale,
                reserve_space_1=mean,
                reserve_space_2=variance,
                reserve_space_3=reserve,
                epsilon=epsilon,
                data_format="NHWC",
                is_training=False,
            )
            inv = tf.math.rsqrt(variance + epsilon)
            d_mean = -scale * inv * d_offset
            d_variance = -0.5 * scale * inv * inv * d_scale
            return dx, d_mean, d_variance, d_scale, d_offset

        return outputs, grad

    mean, variance = statistics(*batch_moments(inputs))
    outputs = apply(
        inputs,
        mean,
        variance,
        ones if scale is None else scale,
        zeros if offset is None else offset,
    )
    return tf.reshape(outputs, shape)


def _torch_compiling():
    """Whether `torch.compile` (Keras's `jit_compile=True`) is tracing."""
    import torch

    return torch.compiler.is_compiling()


def _torch_positions(inputs):
    """A features-last torch tensor as `(positions, features)` (a view)."""
    return inputs.reshape(-1, inputs.shape[-1])


def _torch_fused_batch_norm(inputs, scale, offset, epsilon):
    """`torch.nn.functional.batch_norm` on `(positions, features)`: its
    kernel computes the moments (precisely: per feature, mean then centred
    squares) and normalizes, and its backward is one kernel too. The
    moments come out through running statistics at momentum 1 (the batch's
    own, the variance Bessel-corrected)."""
    import torch

    x = _torch_positions(inputs)
    positions, channels = x.shape
    mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
    variance = torch.ones(channels, dtype=x.dtype, device=x.device)
    outputs = torch.nn.functional.batch_norm(
        x, mean, variance, scale, offset, True, 1.0, epsilon
    )
    variance = variance * ((positions - 1) / positions)
    return outputs.reshape(inputs.shape), mean, variance


def _torch_fused_renormalization(inputs, correct, scale, offset, epsilon):
    """Renormalization on torch's kernel, called twice: once without
    gradient for the batch moments (as in `_torch_fused_batch_norm`; 0.55
    ms on 32768 x 64, where `torch.var_mean` takes 7.9 ms), from which `r`
    and `d` follow as constants, then in training mode with the
    renormalized scale and offset, whose backward kernel differentiates
    through its own batch moments and gives the scale's and offset's
    gradients (an `addcmul` on `x_hat` instead made the step 1.46-1.66x
    BN's, its backward being a product and a sum over the batch)."""
    import torch

    with torch.no_grad():
        _, mean, variance = _torch_fused_batch_norm(inputs, None, None, epsilon)
    r, d = correct(mean, variance)
    scale, offset = compose(r, d, scale, offset)
    outputs = torch.nn.functional.batch_norm(
        _torch_positions(inputs), None, None, scale, offset, True, 0.0, epsilon
    )
    return outputs.reshape(inputs.shape)


@functools.cache
def _torch_moments():
    """Differentiable batch moments of `(positions, features)` from torch's
    kernel (no gradient; `torch.var_mean` takes 14x as long on 32768 x
    64), with their gradient written out: `d_mean / N + (x - mean) * 2
    d_variance / N`, a subtraction and a multiply-add per element (with the
    subtraction folded into the multiply-add, float32 cancellation lost
    the gradient where |mean| * d_variance is large).

    With `keep` (one boolean per position), only the kept rows enter: they
    are gathered for the kernel (what padding holds, inf or NaN included,
    never reaches it) and the gradient is zero elsewhere. Fewer than two
    kept rows (the kernel refuses one) give their sum and a zero variance:
    the one row's own values, or zeros for an all-masked batch, as the
    general path. Returns `(mean, variance, count)`. Defined once
    (cached)."""
    import torch

    class Moments(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, keep):
            with torch.no_grad():
                rows = x if keep is None else x[keep]
                count = rows.shape[0]
                if count > 1:  # (1.0: the discarded output's epsilon)
                    _, mean, variance = _torch_fused_batch_norm(
                        rows, None, None, 1.0
                    )
                else:
                    mean = rows.sum(dim=0)
                    variance = torch.zeros_like(mean)
            ctx.save_for_backward(x, keep, mean)
            ctx.count = max(count, 1)
            count = torch.full((1,), count, dtype=x.dtype, device=x.device)
            ctx.mark_non_differentiable(count)
            return mean, variance, count

        @staticmethod
        def backward(ctx, d_mean, d_variance, _):
            x, keep, mean = ctx.saved_tensors
            b = 2.0 * d_variance / ctx.count
            d_x = torch.addcmul(d_mean / ctx.count, x - mean, b)
            if keep is not None:
                d_x = torch.where(keep[:, None], d_x, 0.0)
            return d_x, None

    return Moments.apply


def _torch_masked_moments(inputs, axes, mask):
    """`moments` with a mask on torch, from torch's kernel over the kept
    positions (`_torch_moments`): where the features are the last axis,
    every other axis is reduced and the mask does not vary along the
    features (Keras's masks), in float32 or float64, eagerly. `None`
    elsewhere, and under `torch.compile` (`jit_compile=True`), which would
    break its graph at the gather whose size depends on the mask. A masked
    32x100x256 layer call with its backward took 4.7 ms against 10.4 ms
    for the general path."""
    ndim = len(inputs.shape)
    if (
        _torch_compiling()
        or axes != tuple(range(ndim - 1))
        or mask.shape[-1] != 1
        or backend.standardize_dtype(inputs.dtype) not in ("float32", "float64")
    ):
        return None
    keep = mask.expand(*inputs.shape[:-1], 1).reshape(-1)
    return _torch_moments()(_torch_positions(inputs), keep)


def _torch_fused_normalization(inputs, statistics, scale, offset, epsilon):
    """CBN's normalization on torch: the batch moments from torch's kernel
    (`_torch_moments`; under `torch.compile`, whose graph the autograd
    Function would break, `moments`), `statistics` maps them, `normalize`
    applies."""
    x = _torch_positions(inputs)
    if _torch_compiling():
        mean, variance, _ = moments(x, (0,))
    else:
        mean, variance, _ = _torch_moments()(x, None)
    mean, variance = statistics(mean, variance)
    outputs = normalize(x, mean, variance, scale, offset, epsilon, (1, -1))
    return outputs.reshape(inputs.shape)

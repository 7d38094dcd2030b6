"""TensorFlow's fast paths: its fused batch-norm kernels, the strategy's
all-reduce, and its convolution kernel-gradient ops.

Private module, imported by `_backend` on the TensorFlow backend (and by
tests, on any backend): TensorFlow is imported inside each function.
"""

import contextlib
import math

from keras import backend

from keras_norms import _linear
from keras_norms import _moments

# No fast path of this backend's own for these: the general answers.
from keras_norms._backend.general import masked_moments  # noqa: F401
from keras_norms._backend.general import multiply_add  # noqa: F401
from keras_norms._backend.general import normalize_with  # noqa: F401
from keras_norms._backend.general import snapshot  # noqa: F401

# The fused kernel pays for itself above this many input elements. Below
# it, its fixed cost outweighs the passes it saves: on 2 CPU cores with
# oneDNN, BN/BRN train steps on the general path took 0.75-1.07x / 0.78-0.96x
# the fused path's time on 2-D and 3-D inputs of 4K-262K elements (1.00x /
# 0.90x on 256x1024), but 1.04-1.43x / 0.98-1.16x from 409K elements up
# (README, "Speed"). An input whose size is unknown when traced is fused.
FUSE_ABOVE_SIZE = 2**18


def positions_layout_helps():
    """Yes: XLA reduces `(positions, features)` far faster than the same
    reduction over several leading axes (0.3x the time for a 32x32x32x64
    batch norm step on CPU)."""
    return True


def can_fuse(inputs):
    """A float32 input of more than `FUSE_ABOVE_SIZE` elements, not
    compiled by XLA (`tf.nn.fused_batch_norm`)."""
    shape = tuple(inputs.shape)
    dtype = backend.standardize_dtype(inputs.dtype)
    return (
        dtype == "float32"
        and (None in shape or math.prod(shape) > FUSE_ABOVE_SIZE)
        and not _in_xla_compilation()
    )


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
    `_moments.moments` (the kernel reports the Bessel-corrected one).
    """
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
    r, d = _moments.zero_if_empty(inputs, *correct(mean, variance))
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


def replica_sum():
    """Inside a `tf.distribute` replica context with several replicas, the
    strategy's all-reduce (sum) of a flat tensor; else None."""
    ctx = _replica_context()
    if ctx is None:
        return None
    import tensorflow as tf

    return lambda flat: ctx.all_reduce(tf.distribute.ReduceOp.SUM, flat)


def _replica_context():
    """The `tf.distribute` replica context when there are several replicas
    to synchronize with, else None."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def global_batch_program():
    """False: each replica runs the step on its own batch."""
    return False


def conv_statistic_gradients(layer, inputs, grad_y, count):
    """`_linear.statistic_gradients` of a convolution (channels last) from
    TensorFlow's own kernel-gradient op; None (the generic path) for a
    dilated one."""
    # TensorFlow's kernel-gradient ops take dilations > 1 on CPU only with
    # oneDNN (x86 builds); without it (e.g. TF_ENABLE_ONEDNN_OPTS=0, ARM)
    # they raise, so dilated convolutions take the generic path.
    if not all(r == 1 for r in layer.dilation_rate):
        return None
    import tensorflow as tf

    rank = len(layer.kernel_size)
    kernel_size = list(layer.kernel_size)
    strides = list(layer.strides)
    dilations = list(layer.dilation_rate)
    padding = layer.padding.upper()
    if padding == "CAUSAL":
        inputs = _linear.pad_input(layer, inputs)
        padding = "VALID"
    if rank == 1:  # as a 2-D convolution of height 1
        inputs, grad_y = inputs[:, None], grad_y[:, None]
        kernel_size, strides, dilations = (
            [1] + kernel_size,
            [1] + strides,
            [1] + dilations,
        )
    backprop = (
        tf.compat.v1.nn.conv2d_backprop_filter
        if len(kernel_size) == 2
        else tf.compat.v1.nn.conv3d_backprop_filter_v2
    )
    cin = inputs.shape[-1]

    def kernel_gradient(x, g):
        return backprop(
            x,
            kernel_size + [cin, g.shape[-1]],
            g,
            strides=[1] + strides + [1],
            padding=padding,
            dilations=[1] + dilations + [1],
        )

    dnu = kernel_gradient(inputs, grad_y)
    # Summing the batch first makes d mu / d W cost 1/N of d nu / d W.
    x_sum = tf.reduce_sum(inputs, axis=0, keepdims=True)
    # One example of ones over the output positions (not `grad_y[:1]`,
    # which has no example when the batch is empty).
    positions = tf.shape(grad_y)[1:-1]
    ones = tf.ones(tf.concat([[1], positions, [1]], 0), grad_y.dtype) / count
    dmu = kernel_gradient(x_sum, ones)
    if rank == 1:
        dnu, dmu = dnu[0], dmu[0]
    return dmu, dnu


def no_grad():
    """A context that records no gradient: nothing to do (TensorFlow
    records only under a `GradientTape`)."""
    return contextlib.nullcontext()


def warning_flag():
    """A boolean variable, false, for `warn_when` to record that it has
    warned; None under a `tf.distribute` strategy (its variables are per
    replica). Made outside any traced step (a layer's `build`): a
    `tf.function` makes variables in its first trace only, and a warning
    may first be traced in a later one."""
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return None
    with tf.init_scope():
        return tf.Variable(False, trainable=False, name="warned")


def warn_when(condition, warn, flag=None):
    """Calls `warn()` (Python) if the scalar boolean tensor `condition` is
    true when the step runs: at once when eager; in a `tf.function`, a
    `tf.py_function` in the true branch of a `tf.cond`; nothing under XLA,
    which cannot run Python. With a `flag` (`warning_flag`), the branch
    sets it and runs only while it is false: a `tf.py_function` costs
    about 0.1 ms, which every batch-1 step would pay long after the
    warning (TensorFlow's BN train step of a 2-layer MLP 1.18x Keras's
    instead of 1.03x)."""
    import tensorflow as tf

    if tf.executing_eagerly():
        if bool(condition):
            warn()
        return
    if _in_xla_compilation():
        return
    if tf.distribute.has_strategy():
        flag = None

    def call_warn():
        warn()
        return 0

    def fire():
        record = [] if flag is None else [flag.assign(True)]
        with tf.control_dependencies(record):
            return tf.py_function(call_warn, [], tf.int32)

    if flag is not None:
        condition = tf.logical_and(condition, tf.logical_not(flag))
    tf.cond(condition, fire, lambda: tf.constant(0, tf.int32))

"""JAX's paths: no fused kernel (XLA fuses the general path itself), the
global batch of a `keras.distribution`, and XLA's convolution kernel
gradient.

Private module, imported by `_backend` on the JAX backend: JAX is
imported inside each function.
"""

import contextlib
import math

from keras import ops

from keras_norms import _linear

# No fast path of this backend's own for these: the general answers.
from keras_norms._backend.general import masked_moments  # noqa: F401
from keras_norms._backend.general import multiply_add  # noqa: F401
from keras_norms._backend.general import normalize_with  # noqa: F401
from keras_norms._backend.general import snapshot  # noqa: F401
from keras_norms._backend.general import warning_flag  # noqa: F401


def positions_layout_helps():
    """No: XLA reduces both layouts alike, but compiled the train step
    around the reshape to `(positions, features)` 1.16-1.21x slower on
    32x100x256 and 32x32x32x64 (docs/benchmarks.md)."""
    return False


def can_fuse(inputs):
    """False: no batch-norm kernel; XLA compiles the general path."""
    return False


def replica_sum():
    """None: under a `keras.distribution` the step is one program over the
    global batch (`global_batch_program`), whose sums XLA makes global."""
    return None


def global_batch_program():
    """Whether the step is one program over a batch split across devices:
    under a `keras.distribution` (XLA partitions it and inserts the
    collectives). Batch statistics there are always global."""
    from keras import distribution

    return distribution.distribution() is not None


def conv_statistic_gradients(layer, inputs, grad_y, count):
    """`_linear.statistic_gradients` of a convolution (channels last) from
    XLA's kernel gradient of the convolution, the transpose
    of the linear map W -> conv(x, W) (`jax.linear_transpose`), with the
    padding given to the convolution (on an explicitly padded input XLA's
    CPU kernel gradient took 2.6x as long); d mu / d W from windows of the
    batch sum, taken as a matrix-vector product (`sum` over the batch axis
    took 20x as long on 32x32x32x64). Both: 0.4x the time of the
    strided-window matmuls for a 3x3 Conv2D on 32x32x32x64 (README,
    "Speed")."""
    import jax

    rank = len(layer.kernel_size)
    spatial = "DHW"[3 - rank :]
    numbers = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    cin, cout = inputs.shape[-1], grad_y.shape[-1]

    def conv(kernel):
        return jax.lax.conv_general_dilated(
            inputs,
            kernel,
            window_strides=tuple(layer.strides),
            padding=_linear.spatial_padding(layer, inputs.shape[1:-1]),
            rhs_dilation=tuple(layer.dilation_rate),
            dimension_numbers=numbers,
        )

    kernel = jax.ShapeDtypeStruct(
        tuple(layer.kernel_size) + (cin, cout), grad_y.dtype
    )
    (dnu,) = jax.linear_transpose(conv, kernel)(grad_y)
    batch = inputs.shape[0]
    ones = ops.ones((1, batch), inputs.dtype)
    inputs_sum = ops.reshape(
        ops.matmul(
            ones, ops.reshape(inputs, (batch, math.prod(inputs.shape[1:])))
        ),
        (1,) + tuple(inputs.shape[1:]),
    )
    dmu = _linear.window_sums(
        layer, _linear.pad_input(layer, inputs_sum), grad_y.shape[1:-1]
    )
    return dmu / count, dnu


def no_grad():
    """A context that records no gradient: nothing to do (JAX records
    nothing outside a transformation)."""
    return contextlib.nullcontext()


def warn_when(condition, warn, flag=None):
    """Calls `warn()` if the scalar boolean `condition` is true: at once
    for a concrete value; under `jax.jit` nothing (the layers ask only
    about sizes, which JAX always knows when it traces). `flag` is
    unused."""
    import jax

    if not isinstance(condition, jax.core.Tracer) and bool(condition):
        warn()

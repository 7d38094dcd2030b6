"""JAX's paths: no fused kernel (XLA fuses the general path itself), the
global batch of a `keras.distribution`, and XLA's convolution kernel
gradient.

Private module, imported by `_backend` on the JAX backend: JAX is
imported inside each function.
"""


def positions_layout_helps():
    """No: XLA reduces both layouts alike, but compiled the train step
    around the reshape to `(positions, features)` 1.16-1.21x slower on
    32x100x256 and 32x32x32x64 (README, "Speed")."""
    return False


def can_fuse(inputs):
    """False: no batch-norm kernel; XLA compiles the general path."""
    return False


def masked_moments(inputs, axes, mask):
    """None: masked moments take the general path."""
    return None


def normalize_with(inputs, mean, variance, scale, offset, epsilon, axes):
    """None: inference takes the general path (`_stats.normalize`)."""
    return None


def multiply_add(inputs, scale, offset):
    """`inputs * scale + offset`."""
    return inputs * scale + offset


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

"""Any other Keras backend (numpy, openvino): no fast path, every case
takes the general `keras.ops` path.

Private module, imported by `_backend` on a backend without a module of
its own.
"""

import contextlib


def positions_layout_helps():
    """Yes, as on TensorFlow and PyTorch (one 2-D reduction)."""
    return True


def can_fuse(inputs):
    """False: no batch-norm kernel."""
    return False


def masked_moments(inputs, axes, mask):
    """None: masked moments take the general path."""
    return None


def normalize_with(inputs, mean, variance, scale, offset, epsilon, axes):
    """None: inference takes the general path (`_moments.normalize`)."""
    return None


def multiply_add(inputs, scale, offset):
    """`inputs * scale + offset`."""
    return inputs * scale + offset


def replica_sum():
    """None: no replicas to synchronize with."""
    return None


def global_batch_program():
    """False."""
    return False


def conv_statistic_gradients(layer, inputs, grad_y, count):
    """None: the generic path (`_linear`)."""
    return None


def no_grad():
    """A context that records no gradient: nothing to do."""
    return contextlib.nullcontext()


def warning_flag():
    """No flag: `warn_when` needs none."""
    return None


def warn_when(condition, warn, flag=None):
    """Calls `warn()` if the scalar boolean tensor `condition` is true
    (eager tensors only); `flag` is unused."""
    if bool(condition):
        warn()


def snapshot(values):
    """The values: a backward pass reads what the forward read."""
    return [getattr(v, "value", v) for v in values]

"""The one place that picks a path per backend.

Private package. Each backend's fast paths live in a module named for it
(`tensorflow.py`, `torch.py`, `jax.py`; `general.py` for any other Keras
backend), with the same function names where they do the same job, as in
Keras's `keras/src/backend/<name>/nn.py`. The functions here forward to
the running backend's module, so that no other module tests
`keras.backend.backend()` for a fast path or imports a backend library.
Where a backend has no fast path for a case, its function says so (False
or None) and the caller takes the general `keras.ops` path (`_moments`,
`_reductions`, `_linear`): the reference every fast path is tested
against.

The backend modules import their library inside each function, and are
themselves imported on first use: importing keras_norms imports neither
TensorFlow nor PyTorch on JAX.
"""

import importlib

from keras import backend

_MODULES = ("tensorflow", "torch", "jax")


_LOADED = {}


def _module():
    """The running backend's module of fast paths, imported on first use.

    A dict, not `functools.cache`: `torch.compile` warns at every cached
    function it traces (and ignores the cache)."""
    name = backend.backend()
    module = _LOADED.get(name)
    if module is None:
        known = name if name in _MODULES else "general"
        module = importlib.import_module(f"{__name__}.{known}")
        _LOADED[name] = module
    return module


def positions_layout_helps():
    """Whether features-last inputs train faster viewed as `(positions,
    features)` (`_axes.as_positions`): on TensorFlow and PyTorch, not on
    JAX (each module says why)."""
    return _module().positions_layout_helps()


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
    return _module().can_fuse(inputs)


def fused_batch_norm(inputs, scale, offset, epsilon):
    """Training-mode batch normalization on the backend's kernel (features
    last, where `can_fuse`). Returns `(outputs, mean, variance)` with the
    biased batch variance, like `_moments.moments`. `scale`/`offset` may be
    None."""
    return _module().fused_batch_norm(inputs, scale, offset, epsilon)


def fused_renormalization(inputs, correct, scale, offset, epsilon):
    """Training-mode renormalization on the backend's kernel (where
    `can_fuse`): `x_hat * (scale * r) + (scale * d + offset)`, where
    `(r, d) = correct(mean, variance)` are constants computed from the
    batch moments (`correct` may update statistics). Returns the
    outputs."""
    return _module().fused_renormalization(
        inputs, correct, scale, offset, epsilon
    )


def fused_normalization(inputs, statistics, scale, offset, epsilon):
    """Training-mode normalization on the backend's kernel (where
    `can_fuse`) with statistics derived from the batch moments:
    `(mean, variance) = statistics(batch_mean, batch_variance)`,
    differentiably (CBN's average over steps). Returns the outputs."""
    return _module().fused_normalization(
        inputs, statistics, scale, offset, epsilon
    )


def masked_moments(inputs, axes, mask):
    """`_moments.moments` with a mask from the backend's kernel, or None
    where it has none for this case (PyTorch's: see its module)."""
    return _module().masked_moments(inputs, axes, mask)


def normalize_with(inputs, mean, variance, scale, offset, epsilon, axes):
    """`_moments.normalize_with` on the backend's inference-mode kernel, or
    None where it has none for this case (PyTorch's: see its module)."""
    return _module().normalize_with(
        inputs, mean, variance, scale, offset, epsilon, axes
    )


def multiply_add(inputs, scale, offset):
    """`inputs * scale + offset`, broadcast (one kernel on PyTorch)."""
    return _module().multiply_add(inputs, scale, offset)


def replica_sum():
    """A differentiable sum of a flat tensor over the replicas, with one
    collective: the `tf.distribute` strategy's inside a replica context
    of several replicas, `torch.distributed`'s in a process group of
    several processes. None where there is none to synchronize with,
    among them JAX (see `global_batch_program`)."""
    return _module().replica_sum()


def global_batch_program():
    """Whether the step is one program over a batch split across devices:
    the JAX backend under a `keras.distribution` (XLA partitions it and
    inserts the collectives). Batch statistics there are always global."""
    return _module().global_batch_program()


def conv_statistic_gradients(layer, inputs, grad_y, count):
    """`_linear.statistic_gradients` of a convolution (channels-last
    `inputs` and `grad_y`, the cotangent of its output) from the backend's
    own kernel-gradient op: `(dmu, dnu)`, or None where it has none for
    this case (the generic path of `_linear` then runs)."""
    return _module().conv_statistic_gradients(layer, inputs, grad_y, count)


def warning_flag():
    """A flag for `warn_when` (TensorFlow: a boolean variable; None
    elsewhere), to be made outside any traced step, e.g. in `build`."""
    return _module().warning_flag()


def warn_when(condition, warn, flag=None):
    """Calls the Python function `warn()` when the scalar boolean tensor
    `condition` is true at run time, where the backend can (TensorFlow's
    graphs through `tf.py_function`, not under XLA; eager tensors); for
    the conditions that a trace cannot decide, e.g. a batch size unknown
    when TensorFlow traced the step. With a `flag` from `warning_flag`, a
    compiled step warns the first time only."""
    return _module().warn_when(condition, warn, flag)


def no_grad():
    """A context in which calls record no gradient (PyTorch's eager calls
    record an autograd graph otherwise)."""
    return _module().no_grad()


def snapshot(values):
    """The current values of a training step's state variables (a list),
    as its backward pass must see them after the step has assigned new
    ones: on PyTorch under `torch.compile`, copies pinned as saved
    activations (see `_backend.torch.snapshot`); elsewhere the values as
    they are."""
    return _module().snapshot(values)

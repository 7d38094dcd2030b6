"""Axes and masks: which axes hold the features, which ones the statistics
reduce over, and which positions a mask keeps.

Private module, `keras.ops` only. The one feature-axis check
(`canonicalize_axes`), the one mask rule of every layer (`broadcast_mask`)
and its count (`mask_count`), and the `(positions, features)` view of a
features-last input (`as_positions`; whether it helps is the backend's
call, `_backend.positions_layout_helps`).
"""

import math
import numbers

import numpy as np
from keras import ops


def canonicalize_axes(axis, ndim=None, arg_name="axis"):
    """Returns the feature axes as a sorted tuple of non-negative ints.

    Raises a `TypeError` naming `arg_name` when it is not an int or a
    non-empty list of ints, and a `ValueError` when an axis repeats or is out
    of range for an input of rank `ndim` (with `ndim=None`, only the types
    are checked and `None` is returned).
    """
    axes = [axis] if isinstance(axis, numbers.Integral) else axis
    if not isinstance(axes, (list, tuple)) or not axes:
        raise TypeError(
            f"Argument `{arg_name}` must be an int or a non-empty list of "
            f"ints. Received: {arg_name}={axis!r}"
        )
    positive = []
    for a in axes:
        if isinstance(a, (bool, np.bool_)) or not isinstance(
            a, numbers.Integral
        ):
            raise TypeError(
                f"Argument `{arg_name}` must be an int or a non-empty list of "
                f"ints. Received: {arg_name}={axis!r}"
            )
        if ndim is None:
            continue
        if not -ndim <= a < ndim:
            raise ValueError(
                f"Argument `{arg_name}` is out of range for an input of rank "
                f"{ndim}: accepted values are in [{-ndim}, {ndim - 1}]. "
                f"Received: {arg_name}={axis!r}"
            )
        positive.append(int(a) % ndim)
    if ndim is None:
        return None
    if len(set(positive)) != len(positive):
        raise ValueError(
            f"Argument `{arg_name}` contains the same axis twice. "
            f"Received: {arg_name}={axis!r}"
        )
    return tuple(sorted(positive))


def reduction_axes(feature_axes, ndim):
    """The axes that statistics reduce over: all but the feature axes."""
    return tuple(a for a in range(ndim) if a not in feature_axes)


def broadcast_shape(input_shape, feature_axes):
    """The shape that makes per-feature parameters broadcast over inputs."""
    return tuple(
        input_shape[a] if a in feature_axes else 1
        for a in range(len(input_shape))
    )


def broadcast_mask(mask, inputs):
    """A mask in Keras's convention, as a boolean tensor of `inputs`' rank.

    The one mask rule of every layer. As in Keras, a mask with one axis
    less than `inputs` (what `Masking`, `Embedding(mask_zero=True)` and
    recurrent layers pass on) covers every axis but the last and is
    broadcast over the last axis, whatever the feature axes are; a mask of
    `inputs`' rank is taken as it is. Either must broadcast to `inputs`
    (e.g. `(batch, 1, time)` for channels-first sequences): anything else is
    a ValueError that names the accepted shapes.
    """
    given, input_shape = tuple(mask.shape), tuple(inputs.shape)
    shape = given + (1,) if len(given) == len(input_shape) - 1 else given
    broadcasts = len(shape) == len(input_shape) and all(
        m is None or i is None or m in (1, i)
        for m, i in zip(shape, input_shape)
    )
    if not broadcasts:
        raise ValueError(
            "Argument `mask` must have the shape of `inputs` without the last "
            f"axis, i.e. {input_shape[:-1]} (Keras's convention: it is "
            "broadcast over the last axis, whatever `axis` is), or the rank "
            f"of `inputs` and a shape that broadcasts to {input_shape}, "
            "e.g. with 1 at the feature axes. Received: "
            f"mask.shape={given}, inputs.shape={input_shape}"
        )
    if shape != given:
        mask = ops.expand_dims(mask, -1)
    return ops.cast(mask, "bool")


def mask_count(keep, inputs, axes):
    """How many positions a `broadcast_mask` keeps over `axes`, per feature
    (keepdims; of size 1 along a feature axis where the mask does not vary)."""
    count = ops.sum(ops.cast(keep, inputs.dtype), axis=axes, keepdims=True)
    for a in axes:
        if keep.shape[a] == 1 and inputs.shape[a] != 1:
            count = count * ops.cast(ops.shape(inputs)[a], inputs.dtype)
    return count


def position_count(inputs, axes):
    """How many positions each feature's statistics over `axes` are taken
    from (no mask): a Python int where those sizes are known when traced,
    else a scalar tensor."""
    sizes = [inputs.shape[a] for a in axes]
    if all(isinstance(size, int) for size in sizes):
        return math.prod(sizes)
    features = math.prod(
        inputs.shape[a] for a in range(len(inputs.shape)) if a not in axes
    )
    return ops.size(inputs) // features


def as_positions(inputs, mask=None):
    """Inputs with the features last as `(positions, features)` (and a
    `broadcast_mask` as `(positions, 1 or features)`); see
    `_backend.positions_layout_helps`."""
    if mask is not None:
        last = mask.shape[-1]
        if (
            tuple(mask.shape[:-1]) != tuple(inputs.shape[:-1])
            or None in (mask.shape[:-1])
        ):
            mask = ops.broadcast_to(mask, ops.shape(inputs)[:-1] + (last,))
        mask = ops.reshape(mask, (-1, last))
    return ops.reshape(inputs, (-1, inputs.shape[-1])), mask

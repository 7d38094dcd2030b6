"""Weight Standardization: a wrapper that standardizes the wrapped kernel."""

import contextlib
import math

import keras
from keras import layers
from keras import ops
from keras.src.backend import AutocastScope
from keras.src.backend import get_stateless_scope

from keras_norms import _checks

# Layer class -> where its kernel keeps the output channels: "last"
# (..., C_in, C), "transpose" (..., C, C_in) or "depthwise"
# (..., C_in, depth_multiplier), one output channel per (c, m) pair.
# `EinsumDense` reads them from its equation.
_LAYOUTS = (
    ((layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D), "last"),
    (
        (
            layers.Conv1DTranspose,
            layers.Conv2DTranspose,
            layers.Conv3DTranspose,
        ),
        "transpose",
    ),
    ((layers.DepthwiseConv1D, layers.DepthwiseConv2D), "depthwise"),
)

_ACCEPTED = (
    "Dense, EinsumDense, Conv1D, Conv2D, Conv3D, Conv1DTranspose, "
    "Conv2DTranspose, Conv3DTranspose, DepthwiseConv1D or DepthwiseConv2D"
)


@keras.saving.register_keras_serializable(package="keras_norms")
class WeightStandardization(layers.Wrapper):
    """Standardizes the kernel of the wrapped layer at every call.

    The wrapped layer runs as usual (its bias, activation, padding, strides,
    dilation and groups unchanged) with its kernel `W` replaced by

    ```
    W_hat = (W - mean(W)) / sqrt(var(W) + epsilon)
    ```

    where the mean and the (biased) variance are taken, per output channel,
    over every other axis of the kernel: the inputs (and the kernel window)
    that reach one output unit. The kernel variable itself is never
    modified, and gradients flow through the standardization to it. This
    is the same in training and in inference, so the wrapper has no state
    (except the gain with `scaled=True`).

    Weight Standardization is meant to be followed by a normalization of
    the activations: the paper pairs it with `keras.layers.GroupNormalization`
    for micro-batches, where batch statistics are unusable, and with batch
    normalization otherwise. `keras_norms.utils.fold_normalization` turns a
    wrapped layer into the plain layer with the standardized kernel for
    export.

    The output channels of each accepted layer are: the last kernel axis of
    `Dense` and `Conv1D/2D/3D`; the next-to-last of
    `Conv1DTranspose/2D/3D`; each (input channel, multiplier) pair of
    `DepthwiseConv1D/2D`, whose kernel window alone is standardized; and,
    for `EinsumDense`, the kernel axes that appear in the output (the
    others must be summed with the inputs).

    The standardization is computed in float32 at least (in the kernel's
    dtype if wider), so mixed precision (`"mixed_float16"`,
    `"mixed_bfloat16"`) standardizes the float32 kernel before it is cast.

    Args:
        layer: The layer to wrap: a `Dense`, `EinsumDense`, `Conv1D/2D/3D`,
            `Conv1DTranspose/2D/3D` or `DepthwiseConv1D/2D` layer, without
            LoRA or quantization.
        epsilon: Small float added to the variance of each output channel.
            Defaults to `1e-5`.
        scaled: If `True`, the scaled variant of normalizer-free networks
            (Brock et al. 2021): `W_hat` is further multiplied by
            `1 / sqrt(fan_in)` (`fan_in` being the number of kernel entries
            per output channel) and by a learned `gain` per output channel
            (initialized to ones), so that a unit-variance input gives a
            unit-variance output without a normalization layer. Defaults to
            `False`.
        **kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).

    Call arguments:
        inputs: The wrapped layer's input. A mask on it is handled as the
            wrapped layer handles it.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_norms
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras_norms.WeightStandardization(
    ...         keras.layers.Conv2D(16, 3, padding="same", use_bias=False)),
    ...     keras.layers.GroupNormalization(groups=4),
    ...     keras.layers.ReLU(),
    ... ])
    >>> tuple(model(np.ones((2, 8, 8, 3))).shape)
    (2, 8, 8, 16)

    Reference:

    - [Qiao et al., 2019](https://arxiv.org/abs/1903.10520), "Micro-Batch
      Training with Batch-Channel Normalization and Weight Standardization".
    - [Brock et al., 2021](https://arxiv.org/abs/2102.06171),
      "High-Performance Large-Scale Image Recognition Without
      Normalization" (the scaled variant).
    """

    def __init__(self, layer, epsilon=1e-5, scaled=False, **kwargs):
        super().__init__(layer, **kwargs)
        _check_supported(layer)
        self.epsilon = _checks.check_positive("epsilon", epsilon)
        self.scaled = _checks.check_bool("scaled", scaled)
        self.supports_masking = layer.supports_masking
        self.gain = None

    def build(self, input_shape):
        super().build(input_shape)
        self.output_axes = _output_axes(self.layer)
        shape = tuple(self.layer.kernel.shape)
        self.reduction_axes = tuple(
            axis for axis in range(len(shape)) if axis not in self.output_axes
        )
        self.fan_in = math.prod(shape[axis] for axis in self.reduction_axes)
        if self.scaled:
            self.gain = self.add_weight(
                name="gain",
                shape=tuple(shape[axis] for axis in self.output_axes),
                initializer="ones",
                dtype=self.layer.kernel.dtype,
            )

    def standardized_kernel(self):
        """The kernel the wrapped layer uses: `W_hat`, in the kernel's dtype.

        Computed in float32 (or the kernel's dtype if wider); the gradient
        flows through it to the kernel variable (and to `gain`).
        """
        _check_plain_kernel(self.layer)
        kernel = self.layer.kernel
        dtype = kernel.dtype
        if dtype in ("float16", "bfloat16"):
            dtype = "float32"
        # Read in the variables' own dtype: under a mixed precision policy
        # the call runs in an autocast scope that would give a float16 copy
        # (and Keras enters it even for a layer with `autocast=False`).
        with AutocastScope(None):
            value = ops.cast(kernel.value, dtype)
            gain = None if self.gain is None else self.gain.value
        mean = ops.mean(value, axis=self.reduction_axes, keepdims=True)
        centered = value - mean
        variance = ops.mean(
            ops.square(centered), axis=self.reduction_axes, keepdims=True
        )
        scale = ops.rsqrt(variance + self.epsilon)
        if self.scaled:
            gain = ops.cast(gain, dtype)
            scale = scale * _expand(gain, self.output_axes, len(kernel.shape))
            scale = scale / math.sqrt(self.fan_in)
        return ops.cast(centered * scale, kernel.dtype)

    def call(self, inputs):
        kernel = self.standardized_kernel()
        with _kernel_replaced(self.layer.kernel, kernel) as scope:
            outputs = self.layer(inputs)
        # The wrapped layer's own losses (its activity regularization),
        # collected in the scope, go where they would have gone without it:
        # to the enclosing scope (which attributes them by id to the
        # wrapped layer alone), or else to the wrapped layer's list.
        for loss in scope.losses:
            self.layer.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def get_config(self):
        config = {"epsilon": self.epsilon, "scaled": self.scaled}
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # `Wrapper.from_config` pops the layer out of the dict it is given.
        return super().from_config(dict(config), custom_objects)


def _check_supported(layer):
    """Raises a ValueError naming `layer` unless it can be wrapped."""
    name = type(layer).__name__
    if not isinstance(layer, (layers.EinsumDense,)) and not any(
        isinstance(layer, types) for types, _ in _LAYOUTS
    ):
        raise ValueError(
            f"WeightStandardization wraps a {_ACCEPTED} layer. Received: "
            f"layer={name}."
        )
    if isinstance(layer, layers.EinsumDense):
        _einsum_output_axes(layer)  # raises for an ambiguous equation
    _check_plain_kernel(layer)


def _check_plain_kernel(layer):
    if getattr(layer, "lora_enabled", False) or getattr(
        layer, "quantization_mode", None
    ):
        raise ValueError(
            f"The wrapped {type(layer).__name__} ('{layer.name}') uses LoRA "
            "or quantization, whose kernel is not a plain variable. "
            "WeightStandardization wraps a layer without them; fold the "
            "wrapper (keras_norms.utils.fold_normalization) before "
            "enabling them."
        )


def _output_axes(layer):
    """The kernel axes that index the output channels of `layer`."""
    if isinstance(layer, layers.EinsumDense):
        return _einsum_output_axes(layer)
    rank = len(layer.kernel.shape)
    layout = next(kind for types, kind in _LAYOUTS if isinstance(layer, types))
    return {
        "last": (rank - 1,),
        "transpose": (rank - 2,),
        "depthwise": (rank - 2, rank - 1),
    }[layout]


def _einsum_output_axes(layer):
    """Output axes of an EinsumDense kernel; a ValueError if ambiguous.

    In `"ab,bc->ac"` the kernel's `c` is in the output (an output channel)
    and its `b` is summed with the inputs (standardized over). A kernel
    axis in neither, an ellipsis in the kernel, or a kernel with no axis
    of one kind leaves no per-output-channel standardization to do.
    """
    equation = layer.equation.replace(" ", "")
    sources, _, output = equation.partition("->")
    parts = sources.split(",")
    reason = None
    if len(parts) != 2 or not output:
        reason = "it is not of the form 'inputs,kernel->output'"
    else:
        inputs, kernel = parts
        if "." in kernel:
            reason = "the kernel has an ellipsis"
        else:
            kept = tuple(i for i, a in enumerate(kernel) if a in output)
            summed = [a for a in kernel if a not in output]
            if any(a not in inputs for a in summed):
                reason = "a kernel axis is in neither the inputs nor the output"
            elif not kept or not summed:
                reason = (
                    "the kernel needs both an axis in the output and an "
                    "axis summed with the inputs"
                )
    if reason is not None:
        raise ValueError(
            "WeightStandardization needs the output axes of an EinsumDense "
            f"kernel to be unambiguous, and {reason}. Received: "
            f"equation={layer.equation!r} ('{layer.name}')."
        )
    return kept


def _expand(values, axes, rank):
    """`values` (shaped as the kernel's `axes`) broadcastable to the kernel."""
    shape = [1] * rank
    for axis, size in zip(axes, values.shape):
        shape[axis] = size
    return ops.reshape(values, shape)


@contextlib.contextmanager
def _kernel_replaced(variable, value):
    """Reads of `variable` give `value` inside the block.

    A `keras.StatelessScope` does this. One opened inside another (JAX's
    `stateless_call`, symbolic calls) starts from the outer scope's values
    and hands its updates back to it. The scope collects the losses added
    inside it (e.g. the wrapped layer's activity regularization) for the
    caller to add.
    """
    outer = get_stateless_scope()
    scope = keras.StatelessScope(
        collect_losses=True, initialize_variables=False
    )
    if outer is not None:
        scope.state_mapping.update(outer.state_mapping)
    replaced = ops.cast(value, variable.dtype)
    scope.state_mapping[id(variable)] = replaced
    with scope:
        yield scope
    updates = [
        (key, new)
        for key, new in scope.state_mapping.items()
        if key != id(variable)
        and (outer is None or outer.state_mapping.get(key) is not new)
    ]
    if updates and outer is not None:
        outer.state_mapping.update(updates)
    elif updates:
        raise RuntimeError(
            "The layer wrapped by WeightStandardization assigned a variable "
            "in its call, which the wrapper cannot carry out of its scope."
        )
    if scope.state_mapping[id(variable)] is not replaced:
        raise RuntimeError(
            "The layer wrapped by WeightStandardization assigned its kernel "
            "in its call."
        )

"""Folds inference-mode batch normalization into the preceding linear layer.

In inference mode a batch normalization is a per-channel affine map,
`y = x * s + t` with `s = gamma / sqrt(moving_variance + epsilon)` and
`t = beta - moving_mean * s`. After a linear layer `x = W u + b` it can be
merged into the layer: `y = (W * s) u + (b * s + t)`, scaling the kernel
along its output-channel axis.
"""

import warnings

import keras
import numpy as np
from keras import layers

from keras_norms.layers import BatchNormalization
from keras_norms.layers import BatchRenormalization
from keras_norms.layers import CrossIterationBatchNormalization
from keras_norms.utils import _graph

# Exact classes: a subclass may override `call`, so its inference formula is
# unknown and it is kept.
_NORMALIZATIONS = (
    BatchNormalization,
    BatchRenormalization,
    CrossIterationBatchNormalization,
    layers.BatchNormalization,
)

# Linear layer class -> (kernel attribute, layout of the output channels in
# the kernel): "last" (..., C), "transpose" (..., C, C_in) or "depthwise"
# (..., C_in, depth_multiplier) with channel c * depth_multiplier + m.
_LINEAR = {
    layers.Dense: ("kernel", "last"),
    layers.Conv1D: ("kernel", "last"),
    layers.Conv2D: ("kernel", "last"),
    layers.Conv3D: ("kernel", "last"),
    layers.Conv1DTranspose: ("kernel", "transpose"),
    layers.Conv2DTranspose: ("kernel", "transpose"),
    layers.Conv3DTranspose: ("kernel", "transpose"),
    layers.DepthwiseConv1D: ("kernel", "depthwise"),
    layers.DepthwiseConv2D: ("kernel", "depthwise"),
    layers.SeparableConv1D: ("pointwise_kernel", "last"),
    layers.SeparableConv2D: ("pointwise_kernel", "last"),
}


def fold_normalization(model, return_report=False):
    """Returns a copy of `model` with batch normalization folded away.

    Every `keras_norms.BatchNormalization`, `keras_norms.BatchRenormalization`
    or `keras.layers.BatchNormalization` that directly follows a `Dense` or
    convolution layer (`Conv1D/2D/3D`, their `Transpose` variants,
    `DepthwiseConv1D/2D`, `SeparableConv1D/2D`), and every
    `keras_norms.CrossIterationBatchNormalization` (with the layer it wraps),
    is merged into that layer's kernel and bias using its inference formula

    `outputs = gamma * (inputs - moving_mean) / sqrt(moving_variance +
    epsilon) + beta`

    (also that of `BatchRenormalization`, and of the CBN applied to its
    wrapped layer's bias-free output). The folded layer keeps its name and
    gets `use_bias=True`. The new model gives the predictions of `model` in
    inference mode (`training=False`) up to float32 rounding, with fewer
    layers and operations. The weights are computed in float64 and cast to
    the dtype of each variable. `model` itself is not modified.

    A normalization layer is kept (copied with its weights, and so is the
    layer before it) when folding would change the predictions or is not
    supported:

    - its input does not come directly from a supported linear layer (e.g.
      it is the first layer, or follows a pooling or a nested model);
    - the linear layer has an activation (`Dense(activation="relu")`), LoRA
      or quantization;
    - the linear layer's output is also used elsewhere (another layer, a
      model output), or the linear or the normalization layer is called
      more than once in the model;
    - its feature axis is not the linear layer's channel axis (e.g.
      `axis=1` after a channels-last convolution);
    - it is called with `training=True` or with an explicit `mask` (the
      mask would not reach the next layers after folding);
    - it is a subclass of a supported class (its `call` may differ).

    A `UserWarning` names each kept layer and the reason; `return_report`
    gives the same as a dict. A shared CBN is folded into one shared linear
    layer. Nested `Sequential` and functional models are folded
    recursively (a normalization layer is never folded across a model
    boundary). A model without normalization layers is returned as a plain
    copy, without a warning. If `model` is compiled, the copy is compiled
    with the same configuration.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.
            Subclassed models have no graph to rewrite and are refused.
        return_report: If `True`, also return the report. Defaults to
            `False`.

    Returns:
        The folded model, or `(folded_model, report)` if `return_report`;
        `report` maps the name of each kept normalization layer (as
        `"nested_model/layer"` inside a nested model) to the reason, and is
        empty when everything was folded.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_norms
    >>> from keras_norms.utils import fold_normalization
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8, use_bias=False),
    ...     keras_norms.BatchNormalization(),
    ...     keras.layers.ReLU(),
    ...     keras.layers.Dense(1),
    ... ])
    >>> folded, report = fold_normalization(model, return_report=True)
    >>> [type(layer).__name__ for layer in folded.layers]
    ['Dense', 'ReLU', 'Dense']
    >>> report
    {}
    >>> x = np.random.normal(size=(16, 4)).astype("float32")
    >>> y = model.predict(x, verbose=0)
    >>> bool(np.allclose(folded.predict(x, verbose=0), y, atol=1e-5))
    True
    """
    folded, report = _graph.rewrite(model, _Folding)
    for name, reason in report.items():
        warnings.warn(
            f"fold_normalization kept layer '{name}': {reason}.",
            UserWarning,
            stacklevel=2,
        )
    if return_report:
        return folded, report
    return folded


class _Folding(_graph.Plan):
    """Decides what to fold, makes the new layers and then their weights."""

    targets = _NORMALIZATIONS
    utility = "fold_normalization"

    def __init__(self, graph, prefix):
        super().__init__(graph, prefix)
        self.folds = {}  # id(linear or CBN) -> (linear, normalization)
        self.removed = set()  # id(normalization folded into the previous)
        self.folded = []  # (linear, normalization, new layer)
        self.unwrapped = set()  # id(new layer) that replaces a CBN
        self.names = {layer.name for layer in graph.model.layers}
        candidates = {}  # id(normalization) -> (key in folds, linear, it)
        for call in graph.calls:
            norm = call.layer
            if not isinstance(norm, _NORMALIZATIONS):
                continue
            reason = _subclass_reason(norm) or _training_reason(call)
            if isinstance(norm, CrossIterationBatchNormalization):
                reason = reason or _graph.call_reason(call)
                key, linear = id(norm), norm.layer
            else:
                reason = reason or graph.pair_reason(call, _LINEAR)
                key, linear = id(call.source), call.source
            if reason is None:
                candidates[id(norm)] = (key, linear, norm)
            else:
                self.report[prefix + norm.name] = reason
        for norm_id, (key, linear, norm) in candidates.items():
            if prefix + norm.name in self.report:
                continue  # a shared CBN, one of whose calls cannot be folded
            self.folds[key] = (linear, norm)
            if key != norm_id:
                self.removed.add(norm_id)

    def replace(self, layer):
        if id(layer) in self.removed:
            return _graph.SKIP
        if id(layer) not in self.folds:
            return None
        linear, norm = self.folds[id(layer)]
        config = linear.get_config()
        config["use_bias"] = True
        if linear is not layer:  # a CBN's wrapped layer
            self.names.discard(layer.name)
            if config["name"] in self.names:
                config["name"] = layer.name
            self.names.add(config["name"])
        new = type(linear).from_config(config)
        if linear is not layer:
            self.unwrapped.add(id(new))
        self.folded.append((linear, norm, new))
        return new

    def call(self, layer, args, kwargs):
        if id(layer) in self.unwrapped:  # was a CBN: no mask, training
            kwargs.pop("mask", None)
            kwargs.pop("training", None)
        return layer(*args, **kwargs)

    def set_weights(self):
        for linear, norm, new in self.folded:
            kernel_name, layout = _LINEAR[type(linear)]
            for old, var in zip(linear.get_weights(), new.weights):
                var.assign(old)  # e.g. a separable depthwise kernel
            scale, shift = _affine(norm)
            kernel = _numpy(getattr(linear, kernel_name))
            bias = _numpy(linear.bias) if linear.use_bias else 0.0
            kernel = kernel * _kernel_shape(scale, layout, kernel.shape)
            _assign(getattr(new, kernel_name), kernel)
            _assign(new.bias, bias * scale + shift)


def _training_reason(call):
    if call.kwargs.get("training") and call.layer.trainable:
        return (
            "it is called with training=True, so it always normalizes with "
            "the statistics of the batch"
        )
    return None


def _subclass_reason(layer):
    """Why a subclass of a supported class is kept (None if not one)."""
    if type(layer) in _NORMALIZATIONS:
        return None
    base = next(c for c in _NORMALIZATIONS if isinstance(layer, c))
    return (
        f"it is a {type(layer).__name__}, a subclass of "
        f"{base.__name__} whose inference formula may differ"
    )


def _numpy(variable):
    # `.numpy()`: convert_to_numpy warns about NumPy 2's `copy` on TF.
    return np.asarray(variable.numpy(), dtype=np.float64)


def _assign(variable, value):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    variable.assign(np.asarray(value, dtype=dtype))


def _affine(norm):
    """`(scale, shift)` in float64 with `norm(x) = x * scale + shift`."""
    mean = _numpy(norm.moving_mean)
    variance = _numpy(norm.moving_variance)
    scale = 1.0 / np.sqrt(variance + norm.epsilon)
    if norm.scale:
        scale = scale * _numpy(norm.gamma)
    shift = -mean * scale
    if norm.center:
        shift = shift + _numpy(norm.beta)
    return scale, shift


def _kernel_shape(scale, layout, shape):
    """`scale` reshaped to multiply a kernel's output channels."""
    ones = (1,) * (len(shape) - 2)
    if layout == "last":
        return scale.reshape(ones + (1, -1))
    if layout == "transpose":
        return scale.reshape(ones + (-1, 1))
    return scale.reshape(ones + tuple(shape[-2:]))  # depthwise

"""Folds inference-mode batch normalization into the preceding linear layer.

In inference, a batch normalization is `y = x * s + t` per channel, with
`s = gamma / sqrt(moving_variance + epsilon)`, `t = beta - moving_mean * s`.
After `x = W u + b` it folds into `y = (W * s) u + (b * s + t)`. A weight
standardization wrapper folds the same way: its layer with `W` replaced by
the standardized kernel, which it uses in inference as in training.
"""

import warnings

import numpy as np
from keras import layers

from keras_norms.layers import BatchNormalization
from keras_norms.layers import BatchRenormalization
from keras_norms.layers import CrossIterationBatchNormalization
from keras_norms.layers import WeightStandardization
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
    is merged into that layer's kernel and bias (computed in float64) by
    its inference formula, `gamma * (inputs - moving_mean) /
    sqrt(moving_variance + epsilon) + beta`. The folded layer keeps its name
    and gets `use_bias=True`. Every `keras_norms.WeightStandardization`
    becomes the layer it wraps, with the standardized kernel (and the
    normalization after it folded in, as above, when the wrapped layer is
    one of those listed). The new model predicts as `model` does with
    `training=False`, up to float32 rounding; `model` is not modified.

    A normalization layer is kept, as is the layer before it, when folding
    would change the predictions or is not supported:

    - its input does not come directly from a supported linear layer (e.g.
      it is the first layer, or follows a pooling or a nested model);
    - the linear layer has an activation, LoRA or quantization, or its
      output is also used elsewhere (another layer, a model output);
    - either layer is called more than once in the model;
    - its feature axis is not the linear layer's channel axis (e.g.
      `axis=1` after a channels-last convolution);
    - it is called with `training=True` or an explicit `mask` (which would
      not reach the next layers after folding);
    - it is a subclass of a supported class (its `call` may differ).

    A weight standardization wrapper is kept when it is a subclass, or is
    called with more than one input tensor.

    A `UserWarning` names each kept layer and the reason. A shared CBN
    becomes one shared linear layer. Nested `Sequential` and functional
    models are folded too, never across a model boundary. A compiled
    `model` gives a copy compiled the same way.

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
    >>> [type(layer).__name__ for layer in folded.layers], report
    (['Dense', 'ReLU', 'Dense'], {})
    >>> x = np.random.normal(size=(16, 4)).astype("float32")
    >>> y = model.predict(x, verbose=0)
    >>> bool(np.allclose(folded.predict(x, verbose=0), y, atol=1e-5))
    True
    """
    folded, report = _graph.rewrite(model, _Folding)
    for name, reason in report.items():
        warnings.warn(
            f"fold_normalization kept layer '{name}': {reason}.",
            stacklevel=2,
        )
    return (folded, report) if return_report else folded


class _Folding(_graph.Plan):
    """Folds each normalization it can into the layer before it, and each
    weight standardization into the layer it wraps."""

    targets = _NORMALIZATIONS + (WeightStandardization,)
    utility = "fold_normalization"

    def __init__(self, model, prefix):
        super().__init__(model, prefix)
        # id(linear, WS or CBN) -> (linear or WS, normalization or None)
        self.folds = {}
        self.removed = set()  # id(normalization folded into the previous)
        self.names = {layer.name for layer in model.layers}
        for call in self.calls:  # a wrapped layer is called with its WS
            if type(call.layer) is WeightStandardization:
                self.counts[id(call.layer.layer)] = self.counts[id(call.layer)]
        for call in self.calls:
            norm = call.layer
            if not isinstance(norm, _NORMALIZATIONS):
                continue
            cbn = isinstance(norm, CrossIterationBatchNormalization)
            if type(norm) not in _NORMALIZATIONS:
                base = next(c for c in _NORMALIZATIONS if isinstance(norm, c))
                reason = (
                    f"it is a {type(norm).__name__}, a subclass of "
                    f"{base.__name__} whose inference formula may differ"
                )
            elif call.training and norm.trainable:
                reason = (
                    "it is called with training=True, so it always "
                    "normalizes with the statistics of the batch"
                )
            elif cbn:
                reason = _graph.call_reason(call)
            else:
                reason = self.pair_reason(_unwrapped_source(call), _LINEAR)
            if reason is not None:
                self.report[prefix + norm.name] = reason
            elif cbn:
                self.folds[id(norm)] = (norm.layer, norm)
            else:
                self.folds[id(call.source)] = (call.source, norm)
                self.removed.add(id(norm))
        # A shared CBN stays if one of its calls cannot be folded.
        for key, (_, norm) in list(self.folds.items()):
            if prefix + norm.name in self.report:
                del self.folds[key]
        # A weight standardization with no normalization folded into it
        # becomes its layer with the standardized kernel.
        for call in self.calls:
            ws = call.layer
            if not isinstance(ws, WeightStandardization):
                continue
            if type(ws) is not WeightStandardization:
                reason = (
                    f"it is a {type(ws).__name__}, a subclass of "
                    "WeightStandardization whose kernel may differ"
                )
            else:
                reason = _graph.call_reason(call)
            if reason is not None:
                self.report[prefix + ws.name] = reason
            elif id(ws) not in self.folds:
                self.folds[id(ws)] = (ws, None)
        for key, (linear, norm) in list(self.folds.items()):
            kept = prefix + linear.name in self.report
            if isinstance(linear, WeightStandardization) and kept and norm:
                # Its WS cannot be folded: the normalization stays too.
                del self.folds[key]
                self.removed.discard(id(norm))
                self.report[prefix + norm.name] = (
                    f"the {_graph.describe(linear)} before it is kept"
                )

    def replace(self, layer):
        if id(layer) in self.removed:
            return _graph.SKIP
        if id(layer) not in self.folds:
            return None
        linear, norm = self.folds[id(layer)]
        linear = _unwrapped(linear)
        config = linear.get_config()
        if norm is not None:
            config["use_bias"] = True
        if linear is not layer:  # a CBN's or WS's layer takes its place
            self.names.discard(layer.name)
            if config["name"] in self.names:
                config["name"] = layer.name
            self.names.add(config["name"])
        return type(linear).from_config(config)

    def set_weights(self, old, new):
        source, norm = self.folds[id(old)]
        linear = _unwrapped(source)
        if norm is None:  # a weight standardization alone
            values = linear.get_weights()
            values[0] = _graph.tensor_numpy(source.standardized_kernel())
            new.set_weights(values)
            return
        kernel_name, layout = _LINEAR[type(linear)]
        for value, variable in zip(linear.get_weights(), new.weights):
            variable.assign(value)  # e.g. a separable depthwise kernel
        # `norm(x) = x * scale + shift`, in float64.
        variance = _graph.numpy(norm.moving_variance)
        scale = 1.0 / np.sqrt(variance + norm.epsilon)
        if norm.scale:
            scale = scale * _graph.numpy(norm.gamma)
        shift = -_graph.numpy(norm.moving_mean) * scale
        if norm.center:
            shift = shift + _graph.numpy(norm.beta)
        if source is linear:
            kernel = _graph.numpy(getattr(linear, kernel_name))
        else:
            kernel = _graph.tensor_numpy(source.standardized_kernel())
        # `scale` along the output channels in the kernel's last two axes.
        last = {"last": (1, -1), "transpose": (-1, 1)}.get(layout)
        shape = (1,) * (kernel.ndim - 2) + (last or kernel.shape[-2:])
        _graph.assign(getattr(new, kernel_name), kernel * scale.reshape(shape))
        bias = _graph.numpy(linear.bias) if linear.use_bias else 0.0
        _graph.assign(new.bias, bias * scale + shift)


def _unwrapped(layer):
    """The layer a weight standardization wraps, or `layer` itself."""
    if type(layer) is WeightStandardization:
        return layer.layer
    return layer


def _unwrapped_source(call):
    """`call` with a weight-standardized source seen as the wrapped layer
    (which is called exactly as often as its wrapper)."""
    if type(call.source) is not WeightStandardization:
        return call
    return call._replace(source=call.source.layer)

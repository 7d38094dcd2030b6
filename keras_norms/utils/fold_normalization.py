"""Folds inference-mode batch normalization into the preceding linear layer.

In inference mode a batch normalization is a per-channel affine map,
`y = x * s + t` with `s = gamma / sqrt(moving_variance + epsilon)` and
`t = beta - moving_mean * s`. After a linear layer `x = W u + b` it can be
merged into the layer: `y = (W * s) u + (b * s + t)`, scaling the kernel
along its output-channel axis.

The model's graph is read from Keras's private `Functional` structures
(`_nodes_by_depth`, `_keras_history`, a `Sequential`'s input layer), as
`keras.models.clone_model` does; these are confined to `_Graph`.
"""

import collections
import warnings

import keras
import numpy as np
from keras import layers

from keras_norms.layers import BatchNormalization
from keras_norms.layers import BatchRenormalization
from keras_norms.layers import CrossIterationBatchNormalization

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
    folded, report = _fold(model, prefix="")
    for name, reason in report.items():
        warnings.warn(
            f"fold_normalization kept layer '{name}': {reason}.",
            UserWarning,
            stacklevel=2,
        )
    if return_report:
        return folded, report
    return folded


def _fold(model, prefix):
    """The folded model and the report, nested models included."""
    graph = _Graph(model)
    plan = _Plan(graph, prefix)
    clones = {}  # id(original layer) -> its replacement

    def clone_function(layer):
        if id(layer) not in clones:
            clones[id(layer)] = plan.replacement(layer)
        return clones[id(layer)]

    if graph.sequential:
        new_layers = [clone_function(layer) for layer in model.layers]
        new_layers = [x for x in new_layers if not isinstance(x, _Removed)]
        folded = keras.Sequential(
            [graph.input_layer()] + new_layers,
            name=model.name,
            trainable=model.trainable,
        )
        if model.compiled:
            folded.compile_from_config(model.get_compile_config())
    else:

        def call_function(layer, *args, **kwargs):
            if isinstance(layer, _Removed):
                return args[0]
            if id(layer) in plan.unwrapped:  # was a CBN: no mask, training
                kwargs.pop("mask", None)
                kwargs.pop("training", None)
            return layer(*args, **kwargs)

        folded = keras.models.clone_model(
            model,
            input_tensors=graph.inputs(),
            clone_function=clone_function,
            call_function=call_function,
        )
        if not model.trainable:  # clone_model forgets it; Sequential not
            folded.trainable = False
    plan.set_weights()
    return folded, plan.report


class _Removed:
    """Stands for a normalization layer folded into the previous layer."""

    def __init__(self, layer):
        self.layer = layer


def _has_graph(model):
    """Whether `model` is a Sequential or functional model."""
    return isinstance(model, keras.Sequential) or hasattr(
        model, "_nodes_by_depth"
    )


class _Call:
    """One call of a layer in a model's graph."""

    def __init__(self, layer, source, rank, uses, kwargs):
        self.layer = layer
        self.source = source  # the layer that made the input, or None
        self.rank = rank  # rank of the input, or None if unknown
        self.uses = uses  # number of uses of the input (outputs included)
        # "training": its value; "mask": a mask other than the input's;
        # "inputs": more input tensors than the input and its mask.
        self.kwargs = kwargs


class _Graph:
    """The calls of a `Sequential` or functional model's layers."""

    def __init__(self, model):
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Argument `model` must be a keras.Model (Sequential or "
                f"functional). Received: model={model!r}"
            )
        self.model = model
        self.sequential = isinstance(model, keras.Sequential)
        if not _has_graph(model):
            raise ValueError(
                "Argument `model` must be a Sequential or functional model: "
                "a subclassed model has no graph of layer calls to rewrite. "
                "Rebuild it as a functional model, or fold by hand. "
                f"Received: model of type {type(model).__name__}"
            )
        if not model.built:
            raise ValueError(
                "Argument `model` must be built (give it an `Input` or call "
                f"it once). Received: unbuilt model '{model.name}'"
            )
        self.calls = (
            self._sequential_calls() if self.sequential else self._calls()
        )
        self.counts = collections.Counter(id(c.layer) for c in self.calls)

    def _sequential_calls(self):
        calls, source = [], None
        for layer in self.model.layers:
            spec = getattr(layer, "input_spec", None)
            rank = getattr(spec, "ndim", None)
            calls.append(_Call(layer, source, rank, 1, {}))
            source = layer
        return calls

    def _calls(self):
        by_depth = self.model._nodes_by_depth
        nodes = [
            node
            for depth in sorted(by_depth, reverse=True)  # inputs first
            for node in by_depth[depth]
            if not node.is_input
        ]
        uses = collections.Counter()
        for node in nodes:
            uses.update(id(x) for x in node.input_tensors)
        uses.update(id(x) for x in self.model.outputs)
        calls = []
        for node in nodes:
            args, kwargs = node.arguments.args, node.arguments.kwargs
            first = args[0] if args else None
            source = rank = None
            if isinstance(first, keras.KerasTensor):
                source = first._keras_history.operation
                rank = len(first.shape)
            # Keras records the input's own mask as `mask=` (and passes it
            # on to later layers as theirs); any other tensor is extra.
            own_mask = getattr(first, "_keras_mask", None)
            extra = {
                "training": kwargs.get("training"),
                "mask": kwargs.get("mask") is not own_mask,
                "inputs": any(
                    x is not first and x is not own_mask
                    for x in node.input_tensors
                ),
            }
            calls.append(
                _Call(node.operation, source, rank, uses[id(first)], extra)
            )
        return calls

    def input_layer(self):
        """A new `Input` like the Sequential model's."""
        # Once built, a Sequential starts with an InputLayer, maybe implicit.
        return _new_input(self.model._layers[0])

    def inputs(self):
        """New `Input`s like the functional model's, in its structure.

        `clone_model` would name each after its tensor, not its layer.
        """
        return keras.tree.map_structure(
            lambda x: _new_input(x._keras_history.operation), self.model.input
        )


def _new_input(layer):
    return keras.Input(
        batch_shape=layer.batch_shape,
        dtype=layer.dtype,
        sparse=layer.sparse,
        ragged=layer.ragged,
        name=layer.name,
        optional=layer.optional,
    )


class _Plan:
    """Decides what to fold, makes the new layers and then their weights."""

    def __init__(self, graph, prefix):
        self.prefix = prefix
        self.report = {}
        self.folds = {}  # id(linear or CBN) -> (linear, normalization)
        self.removed = set()  # id(normalization folded into the previous)
        self.copies = []  # (original, new) pairs that get the same weights
        self.folded = []  # (linear, normalization, new layer)
        self.unwrapped = set()  # id(new layer) that replaces a CBN
        self.names = {layer.name for layer in graph.model.layers}
        candidates = {}  # id(normalization) -> (key in folds, linear, it)
        for call in graph.calls:
            norm = call.layer
            if isinstance(norm, CrossIterationBatchNormalization):
                reason = _check_call(call) or _subclass_reason(norm)
                key, linear = id(norm), norm.layer
            elif isinstance(
                norm, (BatchNormalization, layers.BatchNormalization)
            ):
                reason = _reason(call, graph)
                key, linear = id(call.source), call.source
            else:
                continue
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

    def replacement(self, layer):
        """The layer that takes the place of `layer` in the new model."""
        if id(layer) in self.removed:
            return _Removed(layer)
        if isinstance(layer, keras.Model) and _has_graph(layer):
            folded, report = _fold(layer, f"{self.prefix}{layer.name}/")
            self.report.update(report)
            return folded
        if isinstance(layer, keras.Model):  # subclassed: copied as it is
            for sub in layer._flatten_layers(include_self=False):
                if isinstance(sub, _NORMALIZATIONS):
                    self.report[f"{self.prefix}{layer.name}/{sub.name}"] = (
                        f"it is inside the subclassed model '{layer.name}', "
                        "which has no graph to rewrite"
                    )
        if id(layer) in self.folds:
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
        new = type(layer).from_config(layer.get_config())
        if isinstance(layer, layers.Layer):  # not e.g. a keras.ops operation
            self.copies.append((layer, new))
        return new

    def set_weights(self):
        for old, new in self.copies:
            new.set_weights(old.get_weights())
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


def _check_call(call):
    """Why a call cannot be folded, from its arguments alone (or None)."""
    if call.kwargs.get("training") and call.layer.trainable:
        return (
            "it is called with training=True, so it always normalizes with "
            "the statistics of the batch"
        )
    if call.kwargs.get("mask"):
        return (
            "it is called with a mask other than its input's, which would "
            "no longer reach the next layers"
        )
    if call.kwargs.get("inputs"):
        return "it is called with more than one input tensor"
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


def _reason(call, graph):
    """Why a batch normalization cannot be folded (or None)."""
    norm = call.layer
    reason = _subclass_reason(norm)
    if reason is not None:
        return reason
    if graph.counts[id(norm)] > 1:
        return f"it is shared (called {graph.counts[id(norm)]} times)"
    reason = _check_call(call)
    if reason is not None:
        return reason
    linear = call.source
    if linear is None:
        return "it is the first layer: no Dense or convolution before it"
    what = f"{type(linear).__name__} '{linear.name}'"
    if isinstance(linear, layers.InputLayer):
        return f"its input is the model input '{linear.name}'"
    if type(linear) not in _LINEAR:
        base = next((c for c in _LINEAR if isinstance(linear, c)), None)
        if base is not None:
            return (
                f"the {what} before it is a subclass of {base.__name__} "
                "whose call may differ"
            )
        return f"its input comes from {what}, not a Dense or convolution"
    if graph.counts[id(linear)] > 1:
        return (
            f"the {what} before it is shared (called "
            f"{graph.counts[id(linear)]} times)"
        )
    activation = getattr(linear.activation, "__name__", str(linear.activation))
    if activation != "linear":
        return f"the {what} before it has activation '{activation}'"
    if getattr(linear, "lora_enabled", False):
        return f"the {what} before it has LoRA enabled"
    if getattr(linear, "quantization_mode", None):
        return f"the {what} before it is quantized"
    if call.uses > 1:
        return (
            f"the output of the {what} before it is also used elsewhere "
            "(by another layer or as a model output)"
        )
    if call.rank is None:
        return "the rank of its input is unknown"
    axes = _feature_axes(norm, call.rank)
    channel = _channel_axis(linear, call.rank)
    if axes != (channel,):
        return (
            f"its feature axes {list(axes)} are not the channel axis "
            f"{channel} of the {what} before it"
        )
    return None


def _feature_axes(norm, rank):
    axes = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
    return tuple(sorted(a % rank for a in axes))


def _channel_axis(linear, rank):
    if getattr(linear, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


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

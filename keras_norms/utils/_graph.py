"""What the model utilities share: reading and rebuilding a model's graph
(`rewrite` for fold_normalization and convert_normalization, `nodes` for
the passes of recompute_statistics), reading and writing its weights.

Keras has no public graph API: the private structures that `clone_model`
itself reads are used only here.
"""

import collections

import keras
import numpy as np
from keras import layers

# What `Plan.replace` returns for a layer whose input goes straight on.
SKIP = object()

# One call of a layer: the layer that made its input and the input's rank
# (None if unknown), the number of uses of the input (model outputs
# included), `training`, and whether it is passed a mask other than its
# input's own or more tensors than the input and its mask.
Call = collections.namedtuple(
    "Call",
    "layer source rank uses training other_mask other_inputs",
    defaults=(1, None, False, False),
)


def has_graph(layer):
    """Whether `layer` is a model whose call runs a graph of layer calls (a
    `Sequential`, or `keras.Model(inputs, outputs)`), not Python code."""
    if isinstance(layer, keras.Sequential):
        return type(layer).call is keras.Sequential.call
    call = getattr(type(layer).call, "__qualname__", "")
    graph = getattr(layer, "_nodes_by_depth", None)
    return call == "Functional.call" and isinstance(graph, dict)


def nodes(model):
    """The layer calls of a functional model, inputs first."""
    by_depth = model._nodes_by_depth
    return [
        node
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def inner_layers(layer, types, include_self=False):
    """The layers of `types` inside `layer`, depth first."""
    inner = layer._flatten_layers(include_self=include_self)
    return [sub for sub in inner if isinstance(sub, types)]


def describe(layer):
    return f"{type(layer).__name__} '{layer.name}'"


def numpy(variable):
    """The value of `variable` as a float64 NumPy array."""
    # `.numpy()`: convert_to_numpy warns about NumPy 2's `copy` on TF.
    return np.asarray(variable.numpy(), np.float64)


def tensor_numpy(tensor):
    """A computed tensor (e.g. a standardized kernel) as float64 NumPy."""
    value = keras.ops.convert_to_numpy(keras.ops.stop_gradient(tensor))
    return np.asarray(value, np.float64)


def assign(variable, value):
    """Assigns a NumPy `value` in the dtype and shape of `variable`."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    variable.assign(np.asarray(value, dtype).reshape(variable.shape))


def statistics(mean, variance, epsilon):
    """Moving statistics from `mean` and `variance`, renormalization's too."""
    stddev = np.sqrt(variance + epsilon)
    return {
        "moving_mean": mean,
        "moving_variance": variance,
        "moving_stddev": stddev,
        "renorm_mean": mean,
        "renorm_stddev": stddev,
    }


def feature_axes(norm, rank):
    axes = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
    return tuple(sorted(a % rank for a in axes))


class Plan:
    """The `calls` of one model's layers and what they become: a utility's
    subclass names its `targets` and `utility`, fills `report`, returns from
    `replace(layer)` a new layer, `SKIP` or None (a copy), and sets the new
    layers' weights in `set_weights(old, new)` once the model is built."""

    def __init__(self, model, prefix):
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Argument `model` must be a keras.Model (Sequential or "
                f"functional). Received: model={model!r}"
            )
        if not has_graph(model):
            names = [x.name for x in inner_layers(model, self.targets)]
            raise ValueError(
                "Argument `model` must be a Sequential or functional model: "
                f"{self.utility} cannot reach the layers {names} of a "
                "subclassed model, which has no graph of layer calls to "
                "rewrite. Rebuild it as a functional model. Received: model "
                f"of type {type(model).__name__}"
            )
        if not model.built:
            raise ValueError(
                "Argument `model` must be built (give it an `Input` or call "
                f"it once). Received: unbuilt model '{model.name}'"
            )
        self.model, self.prefix, self.report = model, prefix, {}
        self.sequential = isinstance(model, keras.Sequential)
        if self.sequential:
            sources = [None] + model.layers[:-1]
            self.calls = [
                Call(layer, source, getattr(layer.input_spec, "ndim", None))
                for layer, source in zip(model.layers, sources)
            ]
        else:
            self.calls = list(_functional_calls(model))
        self.counts = collections.Counter(id(c.layer) for c in self.calls)

    def pair_reason(self, call, linear_types):
        """Why `call`'s layer cannot merge into one of `linear_types` before
        it (None if it can)."""
        layer, linear = call.layer, call.source
        if self.counts[id(layer)] > 1:
            return f"it is shared (called {self.counts[id(layer)]} times)"
        if reason := call_reason(call):
            return reason
        if linear is None:
            return "it is the first layer: no Dense or convolution before it"
        what = describe(linear)
        if isinstance(linear, layers.InputLayer):
            return f"its input is the model input '{linear.name}'"
        if type(linear) not in linear_types:
            base = next((c for c in linear_types if isinstance(linear, c)), 0)
            if base:
                return (
                    f"the {what} before it is a subclass of {base.__name__} "
                    "whose call may differ"
                )
            names = ", ".join(sorted({c.__name__ for c in linear_types}))
            return (
                f"its input comes from {what}, not a Dense or convolution "
                f"of the supported kinds ({names})"
            )
        if self.counts[id(linear)] > 1:
            return (
                f"the {what} before it is shared (called "
                f"{self.counts[id(linear)]} times)"
            )
        activation = getattr(linear.activation, "__name__", "")
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
        axes = feature_axes(layer, call.rank)
        channels_first = getattr(linear, "data_format", "") == "channels_first"
        channel = 1 if channels_first else call.rank - 1
        if axes != (channel,):
            return (
                f"its feature axes {list(axes)} are not the channel axis "
                f"{channel} of the {what} before it"
            )
        return None

    def kept(self, name, layer, reason):
        """Reports a target `layer` that stays as it is."""
        self.report[name] = reason


def _functional_calls(model):
    found = nodes(model)
    inputs = [x for node in found for x in node.input_tensors]
    uses = collections.Counter(id(x) for x in inputs + model.outputs)
    for node in found:
        args, kwargs = node.arguments.args, node.arguments.kwargs
        x = args[0] if args else None
        known = isinstance(x, keras.KerasTensor)
        # Keras records the input's own mask as `mask=` (and passes it on
        # to later layers as theirs); any other tensor is extra.
        mask = getattr(x, "_keras_mask", None)
        yield Call(
            node.operation,
            x._keras_history.operation if known else None,
            len(x.shape) if known else None,
            uses[id(x)],
            kwargs.get("training"),
            kwargs.get("mask") is not mask,
            any(t is not x and t is not mask for t in node.input_tensors),
        )


def call_reason(call):
    """Why the arguments of `call` keep its layer in place (or None)."""
    if call.other_mask:
        return (
            "it is called with a mask other than its input's, which would "
            "no longer reach the next layers"
        )
    if call.other_inputs:
        return "it is called with more than one input tensor"
    return None


def rewrite(model, make_plan, prefix="", **options):
    """`(new_model, report)`: `model` rebuilt as `make_plan(model, prefix,
    **options)` says, nested models included, with its names, `trainable`
    and compile configuration; the plans' reports merged."""
    plan = make_plan(model, prefix, **options)
    report, clones, copies, made = plan.report, {}, [], {}

    def clone(layer):
        if id(layer) in clones:  # a shared layer stays shared
            return clones[id(layer)]
        name = f"{prefix}{layer.name}/"
        if isinstance(layer, keras.Model) and has_graph(layer):
            new, inner = rewrite(layer, make_plan, name, **options)
            report.update(inner)
        else:
            if isinstance(layer, keras.Model):  # subclassed: as it is
                for sub in inner_layers(layer, make_plan.targets):
                    plan.kept(
                        name + sub.name,
                        sub,
                        f"it is inside the subclassed model '{layer.name}', "
                        "which has no graph to rewrite",
                    )
            new = plan.replace(layer)
            if new is None:
                new = _copy(layer)
                if isinstance(layer, layers.Layer):  # not a keras.ops op
                    copies.append((layer, new))
            elif new is not SKIP:
                made[id(new)] = (layer, new)
        clones[id(layer)] = new
        return new

    def call_function(layer, *args, **kwargs):
        if layer is SKIP:
            return args[0]
        if id(layer) in made and not layer._call_has_mask_arg:
            kwargs.pop("mask", None)  # e.g. a Dense that replaces a CBN
        return layer(*args, **kwargs)

    if plan.sequential:  # once built, it starts with an InputLayer
        new_layers = [_copy(model._layers[0])]
        new_layers += [clone(layer) for layer in model.layers]
        rebuilt = keras.Sequential(
            [layer for layer in new_layers if layer is not SKIP],
            name=model.name,
            trainable=model.trainable,
        )
        if model.compiled:
            rebuilt.compile_from_config(model.get_compile_config())
    else:
        rebuilt = keras.models.clone_model(
            model,
            # `clone_model` would name the inputs after their tensors.
            input_tensors=keras.tree.map_structure(
                lambda x: _copy(x._keras_history.operation).output, model.input
            ),
            clone_function=clone,
            call_function=call_function,
        )
        if not model.trainable:  # clone_model forgets it; Sequential not
            rebuilt.trainable = False
    for old, new in copies:
        new.set_weights(old.get_weights())
    for old, new in made.values():
        plan.set_weights(old, new)
    return rebuilt, report


def _copy(layer):
    return type(layer).from_config(layer.get_config())

"""Reads and rebuilds the graph of a Sequential or functional model.

One walk of a model's layer calls serves the model utilities:
`fold_normalization` and `convert_normalization` rebuild a model with some
layers replaced or skipped (`rewrite`), `recompute_statistics` orders its
passes by who feeds whom (`nodes`). Keras has no public graph API: the
private structures `clone_model` itself reads (`_nodes_by_depth`,
`_keras_history`, a `Sequential`'s input layer) are confined here.
"""

import collections

import keras
from keras import layers

# `Plan.replace` returns this for a layer whose input goes straight on.
SKIP = object()


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


def inner_layers(layer, types):
    """The layers of `types` inside `layer` (not itself), depth first."""
    return [
        sub
        for sub in layer._flatten_layers(include_self=False)
        if isinstance(sub, types)
    ]


class Call:
    """One call of a layer in a model's graph."""

    def __init__(self, layer, source, rank, uses, kwargs):
        self.layer = layer
        self.source = source  # the layer that made the input, or None
        self.rank = rank  # rank of the input, or None if unknown
        self.uses = uses  # number of uses of the input (outputs included)
        # "training": its value; "mask": a mask other than the input's;
        # "inputs": more input tensors than the input and its mask.
        self.kwargs = kwargs


class Graph:
    """The calls of a `Sequential` or functional model's layers."""

    def __init__(self, model, utility, targets):
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Argument `model` must be a keras.Model (Sequential or "
                f"functional). Received: model={model!r}"
            )
        if not has_graph(model):
            names = [layer.name for layer in inner_layers(model, targets)]
            raise ValueError(
                "Argument `model` must be a Sequential or functional model: "
                f"{utility} cannot reach the layers {names} of a subclassed "
                "model, which has no graph of layer calls to rewrite. "
                "Rebuild it as a functional model. Received: model of type "
                f"{type(model).__name__}"
            )
        if not model.built:
            raise ValueError(
                "Argument `model` must be built (give it an `Input` or call "
                f"it once). Received: unbuilt model '{model.name}'"
            )
        self.model = model
        self.sequential = isinstance(model, keras.Sequential)
        self.calls = (
            self._sequential_calls() if self.sequential else self._calls()
        )
        self.counts = collections.Counter(id(c.layer) for c in self.calls)

    def _sequential_calls(self):
        calls, source = [], None
        for layer in self.model.layers:
            spec = getattr(layer, "input_spec", None)
            rank = getattr(spec, "ndim", None)
            calls.append(Call(layer, source, rank, 1, {}))
            source = layer
        return calls

    def _calls(self):
        found = nodes(self.model)
        uses = collections.Counter()
        for node in found:
            uses.update(id(x) for x in node.input_tensors)
        uses.update(id(x) for x in self.model.outputs)
        calls = []
        for node in found:
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
                Call(node.operation, source, rank, uses[id(first)], extra)
            )
        return calls

    def pair_reason(self, call, linear_types):
        """Why the layer of `call` cannot be merged with the layer before it,
        one of `linear_types` (None if it can)."""
        layer, linear = call.layer, call.source
        if self.counts[id(layer)] > 1:
            return f"it is shared (called {self.counts[id(layer)]} times)"
        reason = call_reason(call)
        if reason is not None:
            return reason
        if linear is None:
            return "it is the first layer: no Dense or convolution before it"
        what = f"{type(linear).__name__} '{linear.name}'"
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
        channel = 1 if _channels_first(linear) else call.rank - 1
        if axes != (channel,):
            return (
                f"its feature axes {list(axes)} are not the channel axis "
                f"{channel} of the {what} before it"
            )
        return None

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


def call_reason(call):
    """Why the arguments of `call` keep its layer in place (or None)."""
    if call.kwargs.get("mask"):
        return (
            "it is called with a mask other than its input's, which would "
            "no longer reach the next layers"
        )
    if call.kwargs.get("inputs"):
        return "it is called with more than one input tensor"
    return None


def feature_axes(norm, rank):
    axes = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
    return tuple(sorted(a % rank for a in axes))


def _channels_first(layer):
    return getattr(layer, "data_format", None) == "channels_first"


def _new_input(layer):
    return keras.Input(
        batch_shape=layer.batch_shape,
        dtype=layer.dtype,
        sparse=layer.sparse,
        ragged=layer.ragged,
        name=layer.name,
        optional=layer.optional,
    )


class Plan:
    """What the layers of one model become; subclassed by each utility.

    `targets` are the layer types the utility works on, `utility` its
    name for messages. A plan fills `report` (layer name, with the nested
    models' names as a prefix, -> what happened) and returns from
    `replace` a new layer, `SKIP`, or None for a copy of the layer.
    """

    targets = ()
    utility = ""

    def __init__(self, graph, prefix):
        self.graph = graph
        self.prefix = prefix
        self.report = {}

    def replace(self, layer):
        return None

    def call(self, layer, args, kwargs):
        """Calls a new layer in the new functional model."""
        return layer(*args, **kwargs)

    def unreachable(self, name, layer, reason):
        """Reports a target `layer` that the rewrite cannot reach."""
        self.report[name] = reason

    def set_weights(self):
        """Gives the new layers their weights, once they are built."""


def rewrite(model, make_plan, prefix="", **options):
    """A new model where `make_plan(graph, prefix, **options)` says what
    each layer becomes, nested Sequential and functional models included.

    Copies keep their weights; the plan sets the others'. The new model
    keeps the names, `trainable` and compile configuration of `model`.
    Returns `(new_model, report)`, the plans' reports merged.
    """
    graph = Graph(model, make_plan.utility, make_plan.targets)
    plan = make_plan(graph, prefix, **options)
    report, copies, clones = plan.report, [], {}

    def clone(layer):
        if id(layer) in clones:  # a shared layer stays shared
            return clones[id(layer)]
        if isinstance(layer, keras.Model) and has_graph(layer):
            name = f"{prefix}{layer.name}/"
            new, inner = rewrite(layer, make_plan, name, **options)
            report.update(inner)
        else:
            if isinstance(layer, keras.Model):  # subclassed: as it is
                for sub in inner_layers(layer, make_plan.targets):
                    plan.unreachable(
                        f"{prefix}{layer.name}/{sub.name}",
                        sub,
                        f"it is inside the subclassed model '{layer.name}', "
                        "which has no graph to rewrite",
                    )
            new = plan.replace(layer)
            if new is None:
                new = type(layer).from_config(layer.get_config())
                if isinstance(layer, layers.Layer):  # not a keras.ops op
                    copies.append((layer, new))
        clones[id(layer)] = new
        return new

    if graph.sequential:
        new_layers = [clone(layer) for layer in model.layers]
        rebuilt = keras.Sequential(
            [graph.input_layer()] + [x for x in new_layers if x is not SKIP],
            name=model.name,
            trainable=model.trainable,
        )
        if model.compiled:
            rebuilt.compile_from_config(model.get_compile_config())
    else:

        def call_function(layer, *args, **kwargs):
            if layer is SKIP:
                return args[0]
            return plan.call(layer, args, kwargs)

        rebuilt = keras.models.clone_model(
            model,
            input_tensors=graph.inputs(),
            clone_function=clone,
            call_function=call_function,
        )
        if not model.trainable:  # clone_model forgets it; Sequential not
            rebuilt.trainable = False
    for old, new in copies:
        new.set_weights(old.get_weights())
    plan.set_weights()
    return rebuilt, report

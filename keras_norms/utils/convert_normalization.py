"""Converts the batch normalizations of an existing model to another kind."""

import functools
import warnings

import numpy as np
from keras import layers

from keras_norms import _linear
from keras_norms.layers import BatchNormalization
from keras_norms.layers import BatchRenormalization
from keras_norms.layers import CrossIterationBatchNormalization
from keras_norms.utils import _graph

# Exact classes: a subclass may override `call`; it is kept.
_SOURCES = (
    layers.BatchNormalization,
    BatchNormalization,
    BatchRenormalization,
)
_TARGETS = (
    BatchNormalization,
    BatchRenormalization,
    CrossIterationBatchNormalization,
)
# Keras's renormalization arguments, which only BatchRenormalization reads.
_KERAS_RENORM = ("renorm", "renorm_clipping", "renorm_momentum")


def convert_normalization(model, to, return_report=False, **layer_kwargs):
    """Returns a copy of `model` whose batch normalizations are `to` layers.

    Every `keras.layers.BatchNormalization`, `keras_norms.BatchNormalization`
    and `keras_norms.BatchRenormalization` of a `Sequential` or functional
    model, nested models included (e.g. a `keras.applications` backbone
    inside a model), becomes a `to` layer with the same name, arguments,
    `trainable` flag and weights: γ, β and the moving statistics. The new
    model's inference outputs equal the original's, and it trains, saves
    to `.keras` and loads wherever `keras_norms` is imported. `model`
    itself is not modified; other layers are copied with their weights.

    - `to=keras_norms.BatchRenormalization`: the renormalization statistics
      start from the moving ones (`moving_stddev = sqrt(moving_variance +
      epsilon)`); a Keras layer with `renorm=True` keeps its clipping and
      its renormalization statistics.
    - `to=keras_norms.CrossIterationBatchNormalization` (`CBN`): a batch
      normalization fed only by a bias-free `Dense` or `Conv1D/2D/3D` (no
      activation, called once, its output used by nothing else, its
      channel axis the normalized one) becomes a CBN that wraps a copy of
      that layer, kernel included. One that CBN cannot wrap (after a
      depthwise convolution, an addition, a layer with a bias or used
      twice, ...) becomes a `keras_norms.BatchNormalization`.
    - A subclass of the converted classes (its `call` may differ) and a
      layer inside a subclassed model (which has no graph to rebuild) are
      kept.

    A `UserWarning` says how many layers did not become `to`; the report
    names each layer, what it became and why.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.
            A subclassed model is refused with the layers it cannot reach.
        to: `keras_norms.BatchNormalization`,
            `keras_norms.BatchRenormalization` or
            `keras_norms.CrossIterationBatchNormalization`.
        return_report: If `True`, also return the report. Defaults to
            `False`.
        **layer_kwargs: Arguments of `to` given to every new layer, over
            the converted layer's own (e.g. `rmax=3.0, dmax=5.0` or
            `window_size=4`). Those `keras_norms.BatchNormalization` does
            not take are not given to the layers that become one.

    Returns:
        The new model, or `(new_model, report)` if `return_report`;
        `report` maps the name of every batch normalization (as
        `"nested_model/layer"` inside a nested model) to a dict with keys
        `"to"` (the class name of what it became) and `"reason"`.

    Example:

    >>> import keras
    >>> import keras_norms
    >>> from keras_norms.utils import convert_normalization
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
    ...     keras.layers.BatchNormalization(name="bn"),
    ...     keras.layers.ReLU(),
    ... ])
    >>> new, report = convert_normalization(
    ...     model, keras_norms.CBN, return_report=True, window_size=4)
    >>> [type(layer).__name__ for layer in new.layers]
    ['CrossIterationBatchNormalization', 'ReLU']
    >>> report["bn"]["reason"]
    "wraps the Conv2D 'conv' that feeds it"
    """
    if not (isinstance(to, type) and to in _TARGETS):
        raise TypeError(
            "Argument `to` must be keras_norms.BatchNormalization, "
            "keras_norms.BatchRenormalization or "
            f"keras_norms.CrossIterationBatchNormalization. Received: to={to!r}"
        )
    _example(to, layer_kwargs)  # the arguments' errors, before any work
    new, report = _graph.rewrite(
        model, _Conversion, to=to, layer_kwargs=layer_kwargs
    )
    others = [name for name, entry in report.items() if entry["to"] != to]
    if others:
        warnings.warn(
            f"convert_normalization: {len(others)} of {len(report)} layers "
            f"did not become {to.__name__}: {others}. "
            "`return_report=True` says why.",
            UserWarning,
            stacklevel=2,
        )
    for entry in report.values():
        entry["to"] = entry["to"].__name__
    if return_report:
        return new, report
    return new


class _Conversion(_graph.Plan):
    """Decides what each batch normalization becomes, then its weights."""

    targets = _SOURCES
    utility = "convert_normalization"

    def __init__(self, graph, prefix, to, layer_kwargs):
        super().__init__(graph, prefix)
        self.to = to
        self.layer_kwargs = layer_kwargs
        self.wrapped = {}  # id(linear) -> the normalization that wraps it
        self.converted = []  # (old layer, new layer)
        for call in graph.calls:
            norm = call.layer
            if type(norm) not in _SOURCES:
                if isinstance(norm, _SOURCES):
                    self._note(
                        norm,
                        type(norm),
                        f"kept: it is a {type(norm).__name__}, a subclass "
                        "whose call may differ",
                    )
                continue
            if to is not CrossIterationBatchNormalization:
                self._note(norm, to, "converted")
                continue
            reason = _wrap_reason(call, graph)
            if reason is None:
                self.wrapped[id(call.source)] = norm
                why = f"wraps the {_what(call.source)} that feeds it"
                self._note(norm, to, why)
            else:
                self._note(
                    norm, BatchNormalization, f"CBN cannot wrap it: {reason}"
                )

    def _note(self, layer, to, reason):
        renorm = isinstance(layer, BatchRenormalization) or getattr(
            layer, "renorm", False
        )
        if renorm and to is not BatchRenormalization:
            reason += (
                f"; {to.__name__} does not renormalize: the renormalization "
                "clipping and statistics are dropped"
            )
        self.report[self.prefix + layer.name] = {"to": to, "reason": reason}

    def unreachable(self, name, layer, reason):
        self.report[name] = {"to": type(layer), "reason": f"kept: {reason}"}

    def replace(self, layer):
        if id(layer) in self.wrapped:
            return _graph.SKIP
        entry = self.report.get(self.prefix + layer.name)
        if type(layer) not in _SOURCES or entry is None:
            return None
        to = entry["to"]
        config = _config_for(to, layer.get_config(), self.layer_kwargs)
        if to is CrossIterationBatchNormalization:
            linear = next(x for x in self.graph.calls if x.layer is layer)
            linear = linear.source
            inner = type(linear).from_config(linear.get_config())
            new = to(inner, **config)
            self.converted.append((layer, new, linear))
        else:
            new = to.from_config(config)
            self.converted.append((layer, new, None))
        return new

    def set_weights(self):
        for old, new, linear in self.converted:
            if linear is not None:
                new.layer.set_weights(linear.get_weights())
            values = _statistics(old)
            for name, value in values.items():
                variable = getattr(new, name, None)
                if variable is not None:
                    variable.assign(
                        np.asarray(value, variable.dtype).reshape(
                            variable.shape
                        )
                    )


def _example(to, layer_kwargs):
    """A `to` layer made with `layer_kwargs`: raises their errors."""
    if to is CrossIterationBatchNormalization:
        return to(layers.Dense(1, use_bias=False), **layer_kwargs)
    return to(**layer_kwargs)


def _config_for(to, config, layer_kwargs):
    """The constructor arguments of a `to` layer replacing a normalization
    with `config`; `layer_kwargs` override them, where `to` takes them."""
    accepted = _accepted(to)
    config = {k: v for k, v in config.items() if k in accepted}
    if config.get("renorm"):  # Keras's clipping, as rmax, rmin and dmax
        config = to.from_config(config).get_config()
    config.pop("renorm", None)
    config.pop("renorm_clipping", None)
    config.update(layer_kwargs)
    return {k: v for k, v in config.items() if k in accepted}


@functools.cache
def _accepted(to):
    """The arguments of `to` that a converted layer's config may give."""
    accepted = set(_example(to, {}).get_config()) - {"layer"}
    if to is BatchRenormalization:
        accepted.update(_KERAS_RENORM)  # from_config maps them
    return accepted


def _what(layer):
    return f"{type(layer).__name__} '{layer.name}'"


def _wrap_reason(call, graph):
    """Why CBN cannot wrap the layer before a batch normalization."""
    reason = graph.pair_reason(call, _linear.SUPPORTED)
    if reason is not None:
        return reason
    if call.source.use_bias:
        return f"the {_what(call.source)} before it has a bias"
    try:
        _linear.check_supported(call.source)
    except ValueError as error:
        return str(error)
    return None


def _statistics(norm):
    """The weights of `norm` by name, with a BatchRenormalization's
    statistics started from the moving ones where `norm` has none."""
    values = {
        name: np.asarray(getattr(norm, name).numpy(), np.float64)
        for name in ("gamma", "beta", "moving_mean", "moving_variance")
        if getattr(norm, name, None) is not None
    }
    stddev = np.sqrt(values["moving_variance"] + norm.epsilon)
    values["moving_stddev"] = stddev
    values["renorm_mean"] = values["moving_mean"]
    values["renorm_stddev"] = stddev
    for name in ("moving_stddev", "renorm_mean", "renorm_stddev", "step"):
        if getattr(norm, name, None) is not None:  # a renorm layer's own
            values[name] = np.asarray(getattr(norm, name).numpy())
    return values

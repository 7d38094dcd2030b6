"""Converts the batch normalizations of an existing model to another kind."""

import functools
import warnings

from keras import layers

from keras_norms import _linear
from keras_norms.layers import BatchNormalization
from keras_norms.layers import BatchRenormalization
from keras_norms.layers import CrossIterationBatchNormalization
from keras_norms.layers import WeightStandardization
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
# The weights a new layer takes from the one it replaces, where both have it.
_WEIGHTS = (
    "gamma beta moving_mean moving_variance moving_stddev renorm_mean "
    "renorm_stddev step"
).split()


def convert_normalization(model, to, return_report=False, **layer_kwargs):
    """Returns a copy of `model` whose batch normalizations are `to` layers.

    Every `keras.layers.BatchNormalization`, `keras_norms.BatchNormalization`
    and `keras_norms.BatchRenormalization` of a `Sequential` or functional
    model, nested models included (e.g. a `keras.applications` backbone),
    becomes a `to` layer with the same name, arguments, `trainable` flag and
    weights (γ, β, moving statistics): the new model's inference outputs
    equal the original's, and it trains, saves to `.keras` and loads
    wherever `keras_norms` is imported. Other layers are copied with their
    weights; `model` is not modified.

    - `to=keras_norms.BatchRenormalization`: the renormalization statistics
      start from the moving ones (`moving_stddev = sqrt(moving_variance +
      epsilon)`); a Keras layer with `renorm=True` keeps its clipping and
      its renormalization statistics.
    - `to=keras_norms.CrossIterationBatchNormalization` (`CBN`): a batch
      normalization fed only by a `Dense` or `Conv1D/2D/3D` (no
      activation, called once, its output used by nothing else, its
      channel axis the normalized one) becomes a CBN that wraps a copy of
      that layer, its bias included (CBN's moving mean is that of the
      output with its bias: the statistics carry over as they are). One
      that CBN cannot wrap (after a depthwise convolution, an addition, a
      layer used twice, ...) becomes a `keras_norms.BatchNormalization`.
    - A subclass of the converted classes (its `call` may differ) and a
      layer inside a subclassed model (no graph to rebuild) are kept.

    A `UserWarning` says how many layers did not become `to`.

    Args:
        model: A built `keras.Sequential` or functional `keras.Model`.
            A subclassed model is refused with the layers it cannot reach.
        to: `keras_norms.BatchNormalization`, `BatchRenormalization` or
            `CrossIterationBatchNormalization`.
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
            stacklevel=2,
        )
    for entry in report.values():  # classes that share a name differ above
        entry["to"] = entry["to"].__name__
    return (new, report) if return_report else new


class _Conversion(_graph.Plan):
    """Decides what each batch normalization becomes, then its weights."""

    targets = _SOURCES
    utility = "convert_normalization"

    def __init__(self, model, prefix, to, layer_kwargs):
        super().__init__(model, prefix)
        self.layer_kwargs = layer_kwargs
        self.new = {}  # id(normalization) -> (its new class, linear or None)
        self.wrapped = set()  # id(linear layer that a new CBN wraps)
        for call in self.calls:
            norm, linear = call.layer, call.source
            if type(norm) not in _SOURCES:
                if isinstance(norm, _SOURCES):
                    self.kept(
                        prefix + norm.name,
                        norm,
                        f"it is a {type(norm).__name__}, a subclass whose "
                        "call may differ",
                    )
                continue
            if to is not CrossIterationBatchNormalization:
                self._plan(norm, to, "converted")
            elif reason := self._wrap_reason(call):
                reason = f"CBN cannot wrap it: {reason}"
                self._plan(norm, BatchNormalization, reason)
            else:
                self.wrapped.add(id(linear))
                reason = f"wraps the {_graph.describe(linear)} that feeds it"
                self._plan(norm, to, reason, linear)

    def _plan(self, layer, to, reason, linear=None):
        renorm = isinstance(layer, BatchRenormalization) or getattr(
            layer, "renorm", False
        )
        if renorm and to is not BatchRenormalization:
            reason += (
                f"; {to.__name__} does not renormalize: the renormalization "
                "clipping and statistics are dropped"
            )
        self.new[id(layer)] = (to, linear)
        self.report[self.prefix + layer.name] = {"to": to, "reason": reason}

    def kept(self, name, layer, reason):
        self.report[name] = {"to": type(layer), "reason": f"kept: {reason}"}

    def replace(self, layer):
        if id(layer) in self.wrapped:
            return _graph.SKIP
        if id(layer) not in self.new:
            return None
        to, linear = self.new[id(layer)]
        config = _config_for(to, layer.get_config(), self.layer_kwargs)
        if linear is None:
            return to.from_config(config)
        return to(type(linear).from_config(linear.get_config()), **config)

    def set_weights(self, old, new):
        _, linear = self.new[id(old)]
        if linear is not None:
            new.layer.set_weights(linear.get_weights())
        weights = {
            name: _graph.numpy(getattr(old, name))
            for name in _WEIGHTS
            if getattr(old, name, None) is not None
        }
        # Renormalization statistics start from the moving ones.
        moving = weights["moving_mean"], weights["moving_variance"]
        weights = _graph.statistics(*moving, old.epsilon) | weights
        for name, value in weights.items():
            if getattr(new, name, None) is not None:
                _graph.assign(getattr(new, name), value)

    def _wrap_reason(self, call):
        """Why CBN cannot wrap the layer before a batch normalization."""
        if isinstance(call.source, WeightStandardization):
            return (
                f"its input comes from the {_graph.describe(call.source)}, "
                "and CBN compensates the statistics of a plain kernel, not "
                "of a standardized one"
            )
        if reason := self.pair_reason(call, _linear.SUPPORTED):
            return reason
        try:
            _linear.check_supported(call.source)
        except ValueError as error:
            return str(error)
        return None


def _example(to, layer_kwargs):
    """A `to` layer made with `layer_kwargs`: raises their errors."""
    if to is CrossIterationBatchNormalization:
        return to(layers.Dense(1, use_bias=False), **layer_kwargs)
    return to(**layer_kwargs)


def _config_for(to, config, layer_kwargs):
    """`to`'s arguments from a converted layer's `config` and `layer_kwargs`."""
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
    if to is BatchRenormalization:  # Keras's, which from_config maps
        accepted.update(("renorm", "renorm_clipping", "renorm_momentum"))
    return accepted

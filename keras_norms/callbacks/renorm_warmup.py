"""The warm-up of Batch Renormalization's clipping, as a `fit()` callback."""

import keras
from keras import ops
from keras.callbacks import Callback
from keras.saving import deserialize_keras_object
from keras.saving import register_keras_serializable
from keras.saving import serialize_keras_object

from keras_norms.layers.batch_renormalization import BatchRenormalization
from keras_norms.layers.batch_renormalization import check_dmax
from keras_norms.layers.batch_renormalization import check_rmax


@register_keras_serializable(package="keras_norms")
class LinearRamp:
    """`start` until step `begin`, then linearly to `end` at step `finish`.

    A schedule `step -> value` written with `keras.ops`, usable inside a
    compiled train step. `RenormWarmup` builds these from its arguments.

    Args:
        start: Value up to step `begin`.
        end: Value from step `finish` on.
        begin: First step of the ramp (an int >= 0).
        finish: Last step of the ramp (an int >= `begin`).
    """

    def __init__(self, start, end, begin, finish):
        self.start = float(start)
        self.end = float(end)
        self.begin, self.finish = _check_steps("steps", (begin, finish))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.finish == self.begin:  # a jump at `begin`
            fraction = ops.cast(step >= self.begin, "float32")
        else:
            span = float(self.finish - self.begin)
            fraction = ops.clip((step - self.begin) / span, 0.0, 1.0)
        return self.start + (self.end - self.start) * fraction

    def get_config(self):
        return {
            "start": self.start,
            "end": self.end,
            "begin": self.begin,
            "finish": self.finish,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@register_keras_serializable(package="keras_norms")
class RenormWarmup(Callback):
    """Warms up the clipping of `BatchRenormalization` layers during `fit()`.

    Ioffe (2017) trains with `rmax = 1`, `dmax = 0` at first (plain batch
    normalization) and then relaxes the clipping linearly: by default `rmax`
    goes 1 -> 3 between steps 5,000 and 40,000 and `dmax` 0 -> 5 between
    steps 5,000 and 25,000, the paper's schedule.

    The step is the optimizer's iteration count. The schedule is evaluated
    *inside* each layer's training call from the layer's own step variable,
    which this callback sets to `model.optimizer.iterations` when training
    begins; so every step of a compiled train function uses its own value,
    on every backend, with `jit_compile=True` and with
    `steps_per_execution > 1`, and a model saved mid-warm-up resumes the
    schedule where it stopped. At the end of each epoch the current `rmax`
    and `dmax` are written to the logs (so `History`, `CSVLogger` and
    `TensorBoard` record them; list `RenormWarmup` before `CSVLogger` and
    `TensorBoard`, which read the logs in list order). When training ends
    the layers keep the last values as constants.

    A layer's lower clip of `r` follows: `1 / rmax` at each step when the
    layer's `rmin` is `None` (the default), its own constant otherwise.

    The layer's step counts its training calls: a layer called several
    times per train step (shared, or inside `TimeDistributed`) moves along
    its schedule that many times per step.

    Args:
        rmax: Final `rmax` (>= 1), or a callable `step -> rmax` written with
            `keras.ops`, e.g. a
            `keras.optimizers.schedules.LearningRateSchedule`; then
            `rmax_steps` is ignored. Defaults to `3.0`.
        dmax: Final `dmax` (>= 0), or a callable `step -> dmax`. Defaults to
            `5.0`.
        rmax_steps: `(begin, end)`: `rmax` is 1 up to step `begin` and
            reaches its final value at step `end`. Defaults to
            `(5000, 40000)`.
        dmax_steps: `(begin, end)` for `dmax`, from 0. Defaults to
            `(5000, 25000)`.
        layers: `None` (every `BatchRenormalization` in the model, nested
            models and wrappers included) or a list of those layers or of
            their names.

    Example:

    >>> import keras_norms
    >>> warmup = keras_norms.callbacks.RenormWarmup(
    ...     rmax_steps=(500, 4000), dmax_steps=(500, 2500))
    >>> # model.fit(x, y, callbacks=[warmup])

    Reference:

    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275), section 4.
    """

    def __init__(
        self,
        rmax=3.0,
        dmax=5.0,
        rmax_steps=(5000, 40000),
        dmax_steps=(5000, 25000),
        layers=None,
    ):
        super().__init__()
        self.rmax = rmax if callable(rmax) else check_rmax("rmax", rmax)
        self.dmax = dmax if callable(dmax) else check_dmax("dmax", dmax)
        self.rmax_steps = _check_steps("rmax_steps", rmax_steps)
        self.dmax_steps = _check_steps("dmax_steps", dmax_steps)
        if layers is not None:
            if isinstance(layers, (str, BatchRenormalization)):
                layers = [layers]
            for layer in layers:
                if not isinstance(layer, (str, BatchRenormalization)):
                    raise TypeError(
                        "Argument `layers` must be None or a list of "
                        "BatchRenormalization layers or layer names. "
                        f"Received an element: {layer!r}"
                    )
            layers = list(layers)
        self.layers = layers

    def schedules(self):
        """The `(rmax, dmax)` schedules, each a callable `step -> value`."""
        rmax = self.rmax
        if not callable(rmax):
            rmax = LinearRamp(1.0, rmax, *self.rmax_steps)
        dmax = self.dmax
        if not callable(dmax):
            dmax = LinearRamp(0.0, dmax, *self.dmax_steps)
        return rmax, dmax

    def _renorm_layers(self):
        found = [
            layer
            for layer in _all_layers(self.model)
            if isinstance(layer, BatchRenormalization)
        ]
        if self.layers is None:
            if not found:
                raise ValueError(
                    "RenormWarmup found no BatchRenormalization layer in the "
                    "model. Add one, or remove the callback."
                )
            return found
        by_name = {layer.name: layer for layer in found}
        chosen = []
        for layer in self.layers:
            if isinstance(layer, str):
                if layer not in by_name:
                    raise ValueError(
                        f"Argument `layers` names {layer!r}, which is not a "
                        "BatchRenormalization layer of the model. Those are: "
                        f"{sorted(by_name)}"
                    )
                layer = by_name[layer]
            chosen.append(layer)
        return chosen

    def on_train_begin(self, logs=None):
        model = self.model
        iterations = ops.convert_to_numpy(model.optimizer.iterations)
        rmax, dmax = self.schedules()
        for layer in self._renorm_layers():
            if not layer.built:
                raise ValueError(
                    f"Layer {layer.name!r} is not built; RenormWarmup needs "
                    "a built model (call it on data or give it an Input)."
                )
            layer.step.assign(int(iterations))
            layer.set_clipping_schedule(rmax=rmax, dmax=dmax)
        # The train function may have been traced with another schedule.
        model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        for layer in self._renorm_layers():
            layer.set_clipping_schedule(None, None)
        self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        layer = self._renorm_layers()[0]
        logs["rmax"] = float(ops.convert_to_numpy(layer.rmax_value))
        logs["dmax"] = float(ops.convert_to_numpy(layer.dmax_value))

    def get_config(self):
        def serialize(value):
            if callable(value):
                return serialize_keras_object(value)
            return value

        layers = self.layers
        if layers is not None:
            layers = [
                layer if isinstance(layer, str) else layer.name
                for layer in layers
            ]
        return {
            "rmax": serialize(self.rmax),
            "dmax": serialize(self.dmax),
            "rmax_steps": list(self.rmax_steps),
            "dmax_steps": list(self.dmax_steps),
            "layers": layers,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("rmax", "dmax"):
            if isinstance(config[key], dict):
                config[key] = deserialize_keras_object(config[key])
        return cls(**config)


def _check_steps(name, steps):
    try:
        begin, end = steps
        if any(isinstance(s, bool) or int(s) != s for s in (begin, end)):
            raise TypeError  # 1.5 would silently become 1
        begin, end = int(begin), int(end)
    except (TypeError, ValueError):
        raise TypeError(
            f"Argument `{name}` must be a pair of ints (begin, end). "
            f"Received: {name}={steps!r}"
        ) from None
    if not 0 <= begin <= end:
        raise ValueError(
            f"Argument `{name}` must satisfy 0 <= begin <= end. "
            f"Received: {name}={steps!r}"
        )
    return begin, end


def _all_layers(model):
    """Every layer under `model`: nested models, wrappers, Bidirectional."""
    seen, stack, out = set(), [model], []
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        for value in vars(layer).values():
            values = value if isinstance(value, (list, tuple)) else [value]
            stack.extend(v for v in values if isinstance(v, keras.Layer))
    return out

"""The warm-up of Batch Renormalization's clipping, as a `fit()` callback."""

import warnings

import keras
from keras import ops
from keras.callbacks import Callback
from keras.saving import deserialize_keras_object
from keras.saving import register_keras_serializable
from keras.saving import serialize_keras_object

from keras_norms.layers.batch_renormalization import BatchRenormalization
from keras_norms.layers.batch_renormalization import ClippingLog
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

    Example:

    >>> import keras_norms
    >>> ramp = keras_norms.callbacks.LinearRamp(1.0, 3.0, 100, 300)
    >>> [float(ramp(step)) for step in (0, 100, 200, 300, 400)]
    [1.0, 1.0, 2.0, 3.0, 3.0]
    >>> # The CrossQ-style switch: plain BN until step 1000, then rmax = 3.
    >>> switch = keras_norms.callbacks.LinearRamp(1.0, 3.0, 1000, 1000)
    >>> [float(switch(step)) for step in (999, 1000)]
    [1.0, 3.0]
    >>> # As a layer's schedule, outside fit():
    >>> layer = keras_norms.BatchRenormalization()
    >>> layer.set_clipping_schedule(rmax=ramp)
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

    That default suits a run of tens of thousands of steps: a `fit()` that
    ends by step 5,000 trains as plain batch normalization throughout. When
    every step a `fit()` plans to take comes before the warm-up begins (the
    optimizer's iterations when it starts, plus its epochs times its steps
    per epoch; a resumed run counts from where it stopped), the callback
    warns: a `UserWarning`, once per `fit()`, naming the steps and a
    schedule that fits the run. It cannot tell, and stays silent, when the
    steps per epoch are unknown (a generator without `steps_per_epoch`) or
    a schedule is a callable.

    The step is the optimizer's iteration count. The schedule is evaluated
    *inside* each layer's training call from the layer's own step variable,
    which this callback sets to `model.optimizer.iterations` when training
    begins; so every step of a compiled train function uses its own value,
    on every backend, with `jit_compile=True` and with
    `steps_per_execution > 1`, and a model saved mid-warm-up resumes the
    schedule where it stopped. When training ends the layers keep the last
    values as constants.

    Logs: every epoch's logs get the `rmax` and `dmax` of the epoch's last
    step (those of the first of the callback's layers) under the keys
    `"rmax"` and `"dmax"`, or `f"{name}_rmax"` and `f"{name}_dmax"` for a
    callback with a `name`. Several `RenormWarmup` in one `fit()` (each
    with its own `layers` and schedule) need distinct names: keys that
    collide, or a layer claimed twice, raise a `ValueError` when training
    begins. The values reach the logs as the result of a metric of that
    layer (`BatchRenormalization.log_clipping`, no effect on training),
    which the train step returns with the loss: so `History`, `CSVLogger`,
    `TensorBoard` and every other callback receive them wherever they
    stand in the list. Each step's logs carry them too on TensorFlow and
    PyTorch; on JAX a step's logs carry NaN for them (a JAX train step
    computes its metrics from metric variables only) and the epoch logs
    the right values. Validation logs do not get them.

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
            `(5000, 40000)`, the paper's: pass steps that fit your run.
        dmax_steps: `(begin, end)` for `dmax`, from 0. Defaults to
            `(5000, 25000)`, the paper's.
        layers: `None` (every `BatchRenormalization` in the model, nested
            models and wrappers included) or a list of those layers or of
            their names.
        name: `None` (log keys `"rmax"` and `"dmax"`) or a non-empty
            string (log keys `f"{name}_rmax"` and `f"{name}_dmax"`).
            Defaults to `None`.

    Example:

    >>> import keras_norms
    >>> # Steps that fit a run of a few thousand: with the defaults (ramps
    >>> # from step 5,000), a fit() that ends by step 5,000 trains as plain
    >>> # batch normalization, and the callback warns.
    >>> warmup = keras_norms.callbacks.RenormWarmup(
    ...     rmax_steps=(500, 4000), dmax_steps=(500, 2500))
    >>> # model.fit(x, y, callbacks=[warmup])  # logs "rmax", "dmax"
    >>> # Two groups of layers on two schedules, logged apart:
    >>> body = keras_norms.callbacks.RenormWarmup(
    ...     layers=["brn_1", "brn_2"], name="body")  # "body_rmax", ...
    >>> head = keras_norms.callbacks.RenormWarmup(
    ...     rmax=2.0, layers=["brn_3"], name="head")  # "head_rmax", ...

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
        name=None,
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
        self.name = _check_name(name)
        self._chosen = []  # the layers it warms up in the current fit()
        self._fit = None  # the History of that fit()
        self._log = None  # its ClippingLog, while it reports
        self._paused = False  # during validation
        self._first_step = None  # until the fit()'s first epoch begins

    @property
    def log_keys(self):
        """The `(rmax, dmax)` keys of the logs."""
        if self.name is None:
            return "rmax", "dmax"
        return f"{self.name}_rmax", f"{self.name}_dmax"

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
        chosen = self._renorm_layers()
        for layer in chosen:
            if not layer.built:
                raise ValueError(
                    f"Layer {layer.name!r} is not built; RenormWarmup needs "
                    "a built model (call it on data or give it an Input)."
                )
        self._fit = getattr(model, "history", None)
        self._check_others(chosen)
        iterations = int(ops.convert_to_numpy(model.optimizer.iterations))
        rmax, dmax = self.schedules()
        for layer in chosen:
            layer.step.assign(iterations)
            layer.set_clipping_schedule(rmax=rmax, dmax=dmax)
        self._chosen = chosen
        self._first_step = iterations
        self._start_log()
        # The train function may have been traced with another schedule
        # or other metrics.
        model.make_train_function(force=True)

    def _check_others(self, chosen):
        """Drops the reports of a fit() that ended without on_train_end
        (interrupted); refuses the layers and the log keys of another
        RenormWarmup of this fit()."""
        others = []
        for metric in self.model.metrics:
            owner = getattr(metric, "owner", None)
            if not isinstance(metric, ClippingLog) or not isinstance(
                owner, RenormWarmup
            ):
                continue
            if owner is self or owner._fit is not self._fit:
                metric.layer.log_clipping(None)
            elif owner not in others:
                others.append(owner)
        mine = {id(layer) for layer in chosen}
        for other in others:
            both = [layer.name for layer in other._chosen if id(layer) in mine]
            if both:
                raise ValueError(
                    f"Layers {both} are warmed up by two RenormWarmup "
                    f"callbacks (name={other.name!r} and name={self.name!r}) "
                    "and would take the schedule of the last. Give each "
                    "callback its own `layers`."
                )
            if set(self.log_keys) & set(other.log_keys):
                raise ValueError(
                    "Two RenormWarmup callbacks of one fit() would log "
                    f"{list(self.log_keys)}. Give each a distinct `name` "
                    "(its keys are then f'{name}_rmax', f'{name}_dmax'). "
                    f"Received: name={self.name!r} twice"
                )

    def _start_log(self):
        self._log = self._chosen[0].log_clipping(self.log_keys, owner=self)

    def _stop_log(self):
        log, self._log = self._log, None
        if log is not None and any(m is log for m in log.layer.metrics):
            log.layer.log_clipping(None)
        return log is not None

    def on_test_begin(self, logs=None):
        # Validation inside fit(): no `val_rmax`, `val_dmax`.
        self._paused = self._stop_log()

    def on_test_end(self, logs=None):
        if self._paused:
            self._paused = False
            self._start_log()

    def on_epoch_begin(self, epoch, logs=None):
        # Checked at the first epoch, which knows fit()'s `initial_epoch`.
        first_step, self._first_step = self._first_step, None
        if first_step is not None:
            self._warn_if_no_warm_up(first_step, epoch)

    def _warn_if_no_warm_up(self, first_step, initial_epoch):
        """Warns when every step this fit() plans to take comes before the
        warm-up begins: the layers then train as plain batch normalization
        throughout. Silent where the plan or the warm-up is unknown (a
        dataset of unknown length, a callable schedule) or where there is
        nothing to warm up (rmax=1, dmax=0)."""
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        begin = self._warm_up_begins()
        if epochs is None or steps is None or begin is None:
            return
        planned = (int(epochs) - int(initial_epoch)) * int(steps)
        end = first_step + planned  # the optimizer's iterations after fit()
        if planned <= 0 or end > begin:
            return
        resumed = f" (it resumes at step {first_step})" if first_step else ""
        warnings.warn(
            f"RenormWarmup: this fit() ends at step {end}{resumed}, before "
            f"the warm-up begins at step {begin} "
            f"(rmax_steps={self.rmax_steps}, dmax_steps={self.dmax_steps}): "
            "every step trains as plain batch normalization (rmax=1, "
            "dmax=0). Pass rmax_steps/dmax_steps that fit the run, e.g. "
            f"rmax_steps=({end // 20}, {end // 2}), "
            f"dmax_steps=({end // 20}, {3 * end // 10}) (the ramps over "
            f"5-50% and 5-30% of {end} steps).",
            UserWarning,
            stacklevel=2,
        )

    def _warm_up_begins(self):
        """The step at which the first linear ramp leaves plain batch
        normalization; None for a callable schedule (unknown) or when both
        ramps stay there (rmax=1, dmax=0)."""
        if callable(self.rmax) or callable(self.dmax):
            return None
        begins = []
        if self.rmax != 1.0:
            begins.append(self.rmax_steps[0])
        if self.dmax != 0.0:
            begins.append(self.dmax_steps[0])
        return min(begins, default=None)

    def on_epoch_end(self, epoch, logs=None):
        # The logs already hold the values when the train step returns the
        # model's metrics (the usual case); written again, read after the
        # epoch, for a custom train step that does not.
        if logs is None or not self._chosen:
            return
        layer = self._chosen[0]
        rmax_key, dmax_key = self.log_keys
        logs[rmax_key] = float(ops.convert_to_numpy(layer.rmax_value))
        logs[dmax_key] = float(ops.convert_to_numpy(layer.dmax_value))

    def on_train_end(self, logs=None):
        self._first_step = None
        self._stop_log()
        for layer in self._chosen:
            layer.set_clipping_schedule(None, None)
        self._chosen = []
        self.model.make_train_function(force=True)

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
            "name": self.name,
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


def _check_name(name):
    message = (
        "Argument `name` must be None or a non-empty string (the log keys "
        "are then f'{name}_rmax' and f'{name}_dmax'). "
        f"Received: name={name!r}"
    )
    if name is not None and not isinstance(name, str):
        raise TypeError(message)
    if name is not None and not name.strip():
        raise ValueError(message)
    return name


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

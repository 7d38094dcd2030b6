"""Batch Renormalization (Ioffe, 2017)."""

from keras import initializers
from keras import ops
from keras.metrics import Metric
from keras.saving import register_keras_serializable
from keras.src.backend import get_stateless_scope

from keras_norms import _checks
from keras_norms import _moments
from keras_norms.layers.batch_normalization import BatchNormalization


@register_keras_serializable(package="keras_norms")
class BatchRenormalization(BatchNormalization):
    """Batch normalization that trains on the statistics it infers with.

    Batch Renormalization (Algorithm 1 of Ioffe, 2017) fixes what breaks
    batch normalization on small or non-i.i.d. batches: the network is
    trained on batch-normalized activations but evaluated on activations
    normalized with moving averages. Renormalization corrects the batch
    normalization by the affine map that turns it into a normalization by
    the running averages, clipped so that training stays stable.

    **During training**, with `mean_b` and `std_b = sqrt(var_b + epsilon)`
    the batch moments, and `mean_r`, `std_r` running averages of them kept
    with `renorm_momentum`:

    - `r = stop_gradient(clip(std_b / std_r, rmin, rmax))`
    - `d = stop_gradient(clip((mean_b - mean_r) / std_r, -dmax, dmax))`
    - `outputs = gamma * ((inputs - mean_b) / std_b * r + d) + beta`

    then `mean_r`, `std_r` are updated with `renorm_momentum` and the
    inference statistics (`moving_mean`, `moving_stddev` and
    `moving_variance = moving_stddev**2 - epsilon`) with `momentum`.

    **During inference**, exactly like `BatchNormalization`:
    `outputs = gamma * (inputs - moving_mean) / sqrt(moving_variance +
    epsilon) + beta`.

    With `rmax=1`, `dmax=0` (and the default `rmin = 1 / rmax`) the layer
    trains exactly like batch normalization. The paper starts training
    that way and relaxes the clipping over time;
    `keras_norms.callbacks.RenormWarmup` does this in `fit()`. `rmax` and
    `dmax` are stored as non-trainable variables (as is the layer's count
    of training steps), so they change during training without retracing,
    are saved with the model and resume after loading.

    At one value per feature (a `Dense` output at batch size 1: online
    learning) the batch variance is 0 and `x_hat` is 0, so the output is
    `gamma * d + beta`, with `d` the input normalized by the running
    statistics (clipped to `dmax`). There `d` keeps its gradient (else
    nothing before the layer would learn), and each running mean and
    stddev moves by one more value: `mean += (1 - m) * delta` and
    `variance = m * (variance + (1 - m) * delta**2)` with `delta = x -
    mean` (the batch's own variance, 0, estimates nothing). The layer
    warns once when this happens. With `dmax=0` (the start of a warm-up)
    the output is then `beta`.

    Args:
        axis: Integer or list of integers, the feature axis or axes.
            Defaults to `-1`.
        momentum: Momentum of the inference statistics, in [0, 1).
            Defaults to `0.99`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        center: If `True`, add the learned offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by the learned scale `gamma`. Defaults to
            `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        moving_mean_initializer: Initializer for the moving means (inference
            and renorm). Defaults to `"zeros"`.
        moving_variance_initializer: Initializer for the moving variance;
            the moving standard deviations start at its square root.
            Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        synchronized: If `True`, the batch statistics are over the global
            batch when training on several devices: the replicas of a
            `tf.distribute` strategy (TensorFlow backend; one all-reduce per
            layer and step), a `keras.distribution` (JAX backend, where
            they are always global) or a `torch.distributed` process group
            (PyTorch backend; one all-reduce per layer and step). Defaults
            to `False`.
        rmax: Initial upper clip of `r`, at least `rmin` (at least 1 when
            `rmin` is `None`); `float("inf")` for none. Defaults to `3.0`.
        dmax: Initial clip of `|d|`, at least 0; `float("inf")` for none.
            Defaults to `5.0`.
        renorm_momentum: Momentum of the running mean and standard deviation
            that `r` and `d` are computed from, in [0, 1). It affects
            training: too small adds noise, too large makes them stale.
            Defaults to `0.99`.
        rmin: Lower clip of `r`: `None` for `1 / rmax`, the paper's
            choice, which follows `rmax` as it warms up; or a constant in
            [0, rmax] (`0` for none). Defaults to `None`.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    A `keras.layers.BatchNormalization(renorm=True)` config loads with
    `BatchRenormalization.from_config`: its `renorm_clipping` keys become
    `rmax`, `rmin` and `dmax` (a missing key is no clip: `inf`, `0`,
    `inf`, as in Keras), and that layer's weights load with `set_weights`;
    the layer then trains and infers as Keras's.

    Call arguments:
        inputs: Input tensor of rank 2 or more.
        training: Python boolean or `None`. Training mode needs
            `layer.trainable` too; a frozen layer runs in inference mode.
        mask: Optional boolean tensor, as for `BatchNormalization` (Keras's
            convention: the shape of `inputs` without the last axis, or one
            that broadcasts to `inputs`); masked-out positions take no part
            in the statistics, and an all-masked batch changes no statistic.

    Reference:

    - [Ioffe, 2017](https://arxiv.org/abs/1702.03275).

    Example:

    >>> import keras
    >>> import keras_norms
    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(16, use_bias=False),
    ...     keras_norms.BatchRenormalization(),
    ...     keras.layers.ReLU(),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model.compile("adam", "mse")
    >>> warmup = keras_norms.callbacks.RenormWarmup(
    ...     rmax_steps=(100, 1000), dmax_steps=(100, 600))
    >>> # model.fit(x, y, batch_size=4, callbacks=[warmup])
    """

    # With TensorFlow's fused kernel (large inputs, features last, no mask),
    # r and d go into the scale and offset of an inference-mode kernel call
    # with the batch moments; the gradient is the training kernel's.
    _renormalizes = True
    ONE_VALUE_BEHAVIOUR = (
        "BatchRenormalization then normalizes such a batch with its running "
        "statistics, clipped to dmax (as at inference, with the gradient "
        "through them), and moves them by the value's deviation from the "
        "running mean."
    )

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        rmax=3.0,
        dmax=5.0,
        renorm_momentum=0.99,
        rmin=None,
        **kwargs,
    ):
        for key in ("renorm", "renorm_clipping"):
            if key in kwargs:  # BatchNormalization's, for Keras's configs
                raise TypeError(
                    f"Unrecognized keyword argument for BatchRenormalization:"
                    f" {key}={kwargs[key]!r}. Its clipping is `rmax`, `rmin` "
                    "and `dmax`; `BatchRenormalization.from_config` maps a "
                    "Keras BatchNormalization config's `renorm_clipping` "
                    "onto them."
                )
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            synchronized=synchronized,
            **kwargs,
        )
        for name, value in (("rmax", rmax), ("dmax", dmax)):
            if callable(value):
                raise TypeError(
                    f"Argument `{name}` of the layer is a constant. For a "
                    "schedule, use the keras_norms.callbacks.RenormWarmup "
                    "callback or `layer.set_clipping_schedule`. Received: "
                    f"{name}={value!r}"
                )
        self.rmax, self.rmin = check_clipping(rmax, rmin)
        self.dmax = check_dmax("dmax", dmax)
        self.renorm_momentum = _checks.check_unit_interval(
            "renorm_momentum", renorm_momentum
        )
        self._rmax_schedule = None
        self._dmax_schedule = None
        # Out of Keras's attribute tracking (locked once built) and saving.
        self._clipping_log = _Slot()

    def build_statistics(self, shape):
        def sqrt_of_variance_initializer(shape, dtype=None):
            return ops.sqrt(self.moving_variance_initializer(shape, dtype))

        self.moving_stddev = self.add_weight(
            shape=shape,
            name="moving_stddev",
            initializer=sqrt_of_variance_initializer,
            trainable=False,
            autocast=False,
        )
        self.renorm_mean = self.add_weight(
            shape=shape,
            name="renorm_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.renorm_stddev = self.add_weight(
            shape=shape,
            name="renorm_stddev",
            initializer=sqrt_of_variance_initializer,
            trainable=False,
            autocast=False,
        )
        self.rmax_value = self.add_weight(
            shape=(),
            name="rmax",
            initializer=initializers.Constant(self.rmax),
            trainable=False,
            autocast=False,
        )
        self.dmax_value = self.add_weight(
            shape=(),
            name="dmax",
            initializer=initializers.Constant(self.dmax),
            trainable=False,
            autocast=False,
        )
        self.step = self.add_weight(
            shape=(),
            name="step",
            dtype="int32",
            initializer="zeros",
            trainable=False,
            autocast=False,
        )

    def set_clipping_schedule(self, rmax=None, dmax=None):
        """Makes `rmax` and `dmax` functions of the training step.

        Each argument is `None` (keep the value of the `rmax`/`dmax`
        variable) or a callable `step -> value` written with `keras.ops`
        (e.g. a `keras.optimizers.schedules.LearningRateSchedule`). It is
        evaluated inside each training call at the layer's `step` variable
        (a float32 tensor), the result clamped to `rmax >= 1`, `dmax >= 0`,
        stored in the layer's `rmax`/`dmax` variables and used for that
        step's clipping. `RenormWarmup` calls this for you; a custom training
        loop can call it directly. A compiled train function must be
        re-created after the schedule changes.
        """
        for name, fn in (("rmax", rmax), ("dmax", dmax)):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"Argument `{name}` must be None or a callable "
                    f"step -> value. Received: {name}={fn!r}"
                )
        self._rmax_schedule = rmax
        self._dmax_schedule = dmax

    def log_clipping(self, keys=None, owner=None):
        """Reports the layer's `rmax` and `dmax` in the logs of `fit()`.

        With `keys=(rmax_key, dmax_key)`, the layer's `metrics` include a
        `ClippingLog`, a metric with no state and no effect on training
        whose result is `{rmax_key: rmax, dmax_key: dmax}`, the layer's
        current values. A model's train step returns the results of its
        metrics, and `fit()` builds the epoch logs, which every callback
        receives whatever its place in the list, from them: so the epoch
        logs carry the values of the epoch's last step. So do the logs of
        each step on TensorFlow and PyTorch; inside a JAX train step the
        metrics see only metric variables, so there the step's logs carry
        NaN (the epoch logs are read after the state sync and are right).

        `keys=None` stops the reports; new keys replace the old ones. A
        compiled train function must be re-created after a change.
        `owner` is any object, kept as the metric's `owner` attribute, so
        that whoever asked for the reports can find them among
        `model.metrics`. Returns the metric, or `None`.
        """
        if keys is None:
            self._clipping_log.metric = None
            return None
        keys = tuple(keys) if isinstance(keys, (list, tuple)) else (keys,)
        if len(keys) != 2 or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(
                "Argument `keys` must be None or a pair of non-empty "
                f"strings (rmax_key, dmax_key). Received: keys={keys!r}"
            )
        if keys[0] == keys[1]:
            raise ValueError(
                "Argument `keys` must name rmax and dmax differently. "
                f"Received: keys={keys!r}"
            )
        self._clipping_log.metric = ClippingLog(self, keys, owner)
        return self._clipping_log.metric

    @property
    def metrics(self):
        metrics = super().metrics
        slot = getattr(self, "_clipping_log", None)  # None during __init__
        if slot is None or slot.metric is None:
            return metrics
        return [*metrics, slot.metric]

    def _clipping(self):
        """The (rmax, rmin, dmax) of this training step; advances the step."""
        step = ops.cast(self.step, "float32")
        rmax, dmax = self.rmax_value, self.dmax_value
        # The bounds as float32 tensors, not Python floats: a schedule of
        # constants (`ops.where(step < n, 1.0, 3.0)`) gives a weakly typed
        # value on JAX, which `ops.cast` keeps; stored as is, it would give
        # the variable another type after the first step and a jitted step
        # would be traced again.
        if self._rmax_schedule is not None:
            # At least 1, and at least an explicit `rmin`.
            floor = ops.convert_to_tensor(max(1.0, self.rmin or 0.0), "float32")
            rmax = ops.maximum(
                ops.cast(self._rmax_schedule(step), "float32"), floor
            )
            self.rmax_value.assign(rmax)
        if self._dmax_schedule is not None:
            zero = ops.convert_to_tensor(0.0, "float32")
            dmax = ops.maximum(
                ops.cast(self._dmax_schedule(step), "float32"), zero
            )
            self.dmax_value.assign(dmax)
        self.step.assign_add(ops.cast(1, self.step.dtype))
        rmax = ops.convert_to_tensor(rmax)
        rmin = 1.0 / rmax if self.rmin is None else self.rmin
        return rmax, rmin, ops.convert_to_tensor(dmax)

    def update_statistics(self, mean, variance, count):
        dtype = mean.dtype
        rmax, rmin, dmax = (ops.cast(v, dtype) for v in self._clipping())
        stddev = ops.sqrt(variance + self.epsilon)
        renorm_mean = ops.cast(self.renorm_mean, dtype)
        renorm_stddev = ops.maximum(
            ops.cast(self.renorm_stddev, dtype), self.epsilon**0.5
        )
        r = ops.clip(stddev / renorm_stddev, rmin, rmax)
        d = ops.clip((mean - renorm_mean) / renorm_stddev, -dmax, dmax)

        update = _moments.updatable(mean, variance, count)
        single = _moments.one_value(count)
        # One value per feature (e.g. batch size 1 after a Dense): x - mean
        # is 0, so the output is gamma * d + beta; d then keeps its
        # gradient (the input normalized by the running statistics, as at
        # inference) and the running statistics follow the stream.
        # `single` is a Python bool where the size is known when traced (a
        # symbolic size under torch.compile included: a guard), else a
        # tensor.
        stream = None
        if not isinstance(single, bool):
            stream = ops.logical_and(single, ops.isfinite(mean))
        elif single:
            stream = ops.isfinite(mean)
        self._track(
            self.renorm_mean,
            self.renorm_stddev,
            (mean, stddev),
            self.renorm_momentum,
            update,
            stream,
        )
        moving_stddev = self._track(
            self.moving_mean,
            self.moving_stddev,
            (mean, stddev),
            self.momentum,
            update,
            stream,
        )
        # Keras's convention (the variance from the stddev), where the
        # statistics moved.
        moved = update if stream is None else ops.logical_or(update, stream)
        variance = ops.relu(ops.square(moving_stddev) - self.epsilon)
        old = ops.cast(self.moving_variance, dtype)
        self.moving_variance.assign(
            ops.cast(
                ops.where(moved, variance, old), self.moving_variance.dtype
            )
        )
        # The callers zero an empty batch's NaN r, d with its moments
        # (`_moments.zero_if_empty`): they would reach the weights' gradients.
        r, held = ops.stop_gradient(r), ops.stop_gradient(d)
        if stream is None:
            return r, held
        return r, d if isinstance(single, bool) else ops.where(single, d, held)

    def _track(
        self, mean_variable, stddev_variable, batch, momentum, update, stream
    ):
        """Moves a mean and stddev pair with `momentum`: towards the
        batch's `(mean, stddev)` where `update`; by one more value where
        `stream` (one value per feature: the batch's mean is the value, and
        the stddev moves by its deviation, `_moments.streaming_stddev`).
        Returns the new stddev."""
        mean, stddev = batch
        instead = None
        if stream is not None:
            # Before the mean moves (PyTorch assigns in place).
            streamed = _moments.streaming_stddev(
                ops.cast(mean_variable, mean.dtype),
                ops.cast(stddev_variable, mean.dtype),
                ops.stop_gradient(mean),
                momentum,
                self.epsilon,
            )
            instead = (stream, streamed)
        _moments.moving_average(
            mean_variable,
            mean,
            momentum,
            update if stream is None else ops.logical_or(update, stream),
        )
        return _moments.moving_average(
            stddev_variable, stddev, momentum, update, instead
        )

    def set_weights(self, weights):
        """Sets the layer's weights from a list of NumPy arrays.

        Also takes the weights of a `keras.layers.BatchNormalization` with
        `renorm=True` (this layer's without `rmax`, `dmax` and `step`,
        which keep their values).
        """
        weights = list(weights)
        if len(weights) == len(self.weights) - 3:
            weights += [
                ops.convert_to_numpy(v)
                for v in (self.rmax_value, self.dmax_value, self.step)
            ]
        super().set_weights(weights)

    def get_config(self):
        config = {
            "rmax": self.rmax,
            "dmax": self.dmax,
            "renorm_momentum": self.renorm_momentum,
            "rmin": self.rmin,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        """Also takes a `keras.layers.BatchNormalization` config.

        With `renorm=True`, its `renorm_clipping` becomes `rmax`, `rmin`
        and `dmax` (a missing key is no clip, as in Keras); with
        `renorm=False` the layer gets the default clipping.
        """
        config = dict(config)
        if "renorm" in config or "renorm_clipping" in config:
            config.update(_clipping_from_keras(config))
        return super().from_config(config)


class ClippingLog(Metric):
    """The current `rmax` and `dmax` of a `BatchRenormalization` layer.

    A metric without variables, made by `BatchRenormalization.log_clipping`:
    `update_state` does nothing and `result()` is `{rmax_key: rmax,
    dmax_key: dmax}`, read from the layer's variables; NaN where they
    cannot be read (the metrics of a JAX train step see only metric
    variables).
    """

    def __init__(self, layer, keys, owner=None):
        super().__init__(name=f"{layer.name}_clipping_log")
        # Neither is a Variable or a Metric: the metric's tracker ignores
        # them, so the layer's variables do not become metric variables.
        self.layer = layer
        self.keys = tuple(keys)
        self.owner = owner

    def update_state(self, *args, **kwargs):
        pass

    def result(self):
        rmax_key, dmax_key = self.keys
        return {
            rmax_key: _current(self.layer.rmax_value),
            dmax_key: _current(self.layer.dmax_value),
        }


def _current(variable):
    """A copy of the variable's value, or NaN where it cannot be read: in a
    stateless scope that does not map it (JAX's trainer computes a step's
    metrics in one that maps only metric variables, the model's own having
    been moved out of them). Keras has no public accessor of the scope."""
    scope = get_stateless_scope()
    if scope is not None and scope.get_current_value(variable) is None:
        return ops.convert_to_tensor(float("nan"), "float32")
    return ops.copy(variable)


class _Slot:
    """Holds a `ClippingLog` where Keras neither tracks nor saves it (a
    layer's tracker is locked once built; saving walks its attributes)."""

    def __init__(self):
        self.metric = None


def _clipping_from_keras(config):
    """Pops Keras's `renorm`, `renorm_clipping` from a BatchNormalization
    config; returns the `rmax`, `rmin`, `dmax` arguments they mean."""
    renorm = config.pop("renorm", True)
    clipping = config.pop("renorm_clipping", None)
    if not _checks.check_bool("renorm", renorm):
        return {}
    clipping = dict(clipping or {})
    keys = ("rmax", "rmin", "dmax")
    unknown = sorted(set(clipping) - set(keys))
    if unknown:
        raise ValueError(
            f"Received invalid keys for `renorm_clipping`: {unknown}. "
            f"Supported keys: {list(keys)}. Received: "
            f"renorm_clipping={clipping}"
        )
    twice = sorted(set(keys) & set(config))
    if twice:
        raise ValueError(
            f"The config gives {twice} both as arguments and in "
            f"`renorm_clipping`. Received: renorm_clipping={clipping}"
        )
    unbounded = {"rmax": float("inf"), "rmin": 0.0, "dmax": float("inf")}
    return {
        key: unbounded[key] if clipping.get(key) is None else clipping[key]
        for key in keys
    }


def check_rmax(name, value):
    """Coerces a constant `rmax` to float and checks that it is >= 1."""
    value = _checks.check_number(name, value, "at least 1")
    if not value >= 1.0:
        raise ValueError(
            f"Argument `{name}` must be at least 1 (r is clipped to "
            f"[1/{name}, {name}]). Received: {name}={value}"
        )
    return value


def check_clipping(rmax, rmin):
    """Coerces `rmax` and `rmin` (None: 1/rmax) to floats and checks that
    0 <= rmin <= rmax."""
    if rmin is None:
        return check_rmax("rmax", rmax), None
    rmax = _checks.check_number("rmax", rmax, "at least `rmin`")
    rmin = _checks.check_number("rmin", rmin, "in [0, rmax], or None")
    if not 0.0 <= rmin <= rmax:  # NaN fails too
        raise ValueError(
            "Arguments `rmin` and `rmax` must satisfy 0 <= rmin <= rmax (r "
            f"is clipped to [rmin, rmax]). Received: rmin={rmin}, "
            f"rmax={rmax}"
        )
    return rmax, rmin


def check_dmax(name, value):
    """Coerces a constant `dmax` to float and checks that it is >= 0."""
    value = _checks.check_number(name, value, "at least 0")
    if not value >= 0.0:
        raise ValueError(
            f"Argument `{name}` must be at least 0 (d is clipped to "
            f"[-{name}, {name}]). Received: {name}={value}"
        )
    return value

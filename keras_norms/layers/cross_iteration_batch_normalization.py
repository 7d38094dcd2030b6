"""Cross-Iteration Batch Normalization (Yao et al., 2020)."""

import numbers

from keras import ops
from keras.layers import Layer
from keras.layers import Wrapper
from keras.saving import register_keras_serializable

from keras_norms import _axes
from keras_norms import _backend
from keras_norms import _checks
from keras_norms import _linear
from keras_norms import _moments
from keras_norms import _reductions
from keras_norms.layers._parameters import NormalizationParameters


@register_keras_serializable(package="keras_norms")
class CrossIterationBatchNormalization(NormalizationParameters, Wrapper):
    """Normalizes a linear layer's output with statistics of recent steps.

    Cross-Iteration Batch Normalization (CBN, Yao et al., 2020) makes small
    batches behave like larger ones: it averages the batch statistics of the
    last `window_size` training steps. The statistics of an earlier step were
    computed with earlier weights, so each is first brought to the current
    weights by a first-order Taylor step. This needs the derivatives of the
    statistics with respect to the weights, which is why CBN wraps the layer
    that produces its input (a `Dense` or `ConvND` without activation),
    like `keras.layers.SpectralNormalization` does.

    **During training**, for each output channel of `y = layer(x)` with
    kernel `W_t`:

    - the current step gives `mu_t = E[y]`, `nu_t = E[y^2]` (with gradients)
      and their derivatives `dmu_t/dW`, `dnu_t/dW`;
    - a step `t - tau` (tau = 1 .. window_size - 1) contributes
      `mu_{t-tau} + dmu_{t-tau}/dW . (W_t - W_{t-tau})` and likewise for `nu`;
      with `compensation_gradient=True` (the default) the gradient flows
      through these terms, whose derivative with respect to `W_t` is the
      stored `dmu_{t-tau}/dW` (resp. `dnu`);
    - a compensated `nu` below `mu^2` (a negative variance: the first-order
      step drops a square) is raised to `mu^2`, as in the paper's Eq. 9
      (`negative_variance="clamp"`; the authors' code instead leaves that
      step out of the channel's average: `"exclude"`);
    - `y` is normalized by the average mean and by the average `nu` minus
      the squared average mean, then scaled by `gamma` and shifted by `beta`.

    The moving statistics for inference follow the statistics each step
    normalizes with (the window's average), and **inference** is exactly
    batch normalization with them. Batch size 1 works: a `Dense` output has
    one value per channel and step, whose variance is 0, but the window's
    means spread (online learning; see the guide). The moving statistics
    skip a step whose window holds a single value per channel (the first
    step at batch size 1): its variance estimates nothing. For the first
    `burnin_steps` training steps the layer is plain batch normalization;
    statistics enter the buffer from then on. `window_size=1` is batch
    normalization of the wrapped layer's output; `compensation=False`
    averages the stale statistics as they are (the paper's naive
    baseline).

    The buffer (earlier kernels, statistics and their derivatives, the
    number filled and the step count) is non-trainable layer state: it works
    inside compiled train steps on every backend and is saved with the
    model, so training resumes exactly. It holds
    `(window_size - 1) * (2 |W| + |W| / C + 2 C)` floats.

    A bias of the wrapped layer shifts each channel's mean and nothing
    else, so it cancels in training: each step normalizes the bias-free
    output `y - b` by its own statistics (the window holds bias-free
    statistics, exact whatever the bias does), and the bias gets a zero
    gradient. The moving mean is that of the output with its bias, so
    inference is batch normalization of the wrapped layer's output, as
    Keras's `BatchNormalization` after that layer computes it:
    `convert_normalization` wraps a `Conv2D(use_bias=True)` (ResNets) with
    its batch norm's statistics and predicts the same. A new layer needs
    no bias (`beta` takes its role). The wrapped layer must have no
    activation (apply it after this layer). Grouped, depthwise, separable
    and transposed convolutions are not supported. Inputs of any spatial
    size work (e.g. `keras.Input((None, 3))` before a `Conv1D`), except for
    a dilated convolution on TensorFlow, whose train step must see a fixed
    size. Masks are for `Dense` only: a convolution mixes neighbouring
    positions, so a mask there is refused rather than dropped.

    Args:
        layer: A `keras.layers.Dense`, `Conv1D`, `Conv2D` or `Conv3D`
            with no activation. `Dense` accepts inputs of rank 2 and more,
            e.g. `(batch, time, features)` with a `(batch, time)` mask.
        window_size: Number of steps averaged, the current one included
            (`k` in the paper). `1` is batch normalization. Defaults to `4`.
        burnin_steps: Training steps of plain batch normalization before
            earlier steps are used. Defaults to `0`.
        compensation: If `False`, earlier statistics are averaged without the
            Taylor compensation (and the kernel derivatives it needs are
            not computed; their buffers keep zeros). Defaults to `True`.
        compensation_gradient: If `True`, the loss's gradient with respect
            to the kernel includes how the compensated earlier statistics
            move with it (their Taylor terms are linear in the kernel). If
            `False`, they are constants in the backward pass, as in the
            authors' code: only the current step's `1 / window_size` share
            of the statistics then reacts to the kernel, which measurably
            hurts training from scratch (see the README's ablation). Costs
            one elementwise product per earlier step in the backward pass.
            Ignored without `compensation`. Defaults to `True`.
        negative_variance: What an earlier step whose compensated variance
            is negative contributes to a channel: `"clamp"` (the paper's
            Eq. 9: its mean, with variance 0) or `"exclude"` (nothing, as
            in the authors' code). At one value per channel (a `Dense` at
            batch size 1) every earlier step's compensated variance is
            negative, and `"exclude"` makes the layer batch normalization,
            which learns nothing there. Defaults to `"clamp"`.
        momentum: Momentum of the moving statistics, in [0, 1). Defaults to
            `0.99`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        center: If `True`, add the learned offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by the learned scale `gamma`. Defaults to
            `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        moving_mean_initializer: Defaults to `"zeros"`.
        moving_variance_initializer: Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        synchronized: If `True`, the batch statistics and the derivatives
            that compensate them are over the global batch when training on
            several devices: the replicas of a `tf.distribute` strategy
            (TensorFlow backend; one all-reduce per layer and step), a
            `keras.distribution` (JAX backend, where they are always
            global) or a `torch.distributed` process group (PyTorch backend;
            one all-reduce per layer and step). Defaults to `False`.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input of the wrapped layer.
        training: Python boolean or `None`. Training mode needs
            `layer.trainable` too; a frozen layer runs in inference mode.
        mask: `Dense` only: a boolean tensor with the shape of `inputs`
            without the last axis (Keras's convention), or of the output's
            rank with 1 on its last axis; masked-out positions take no part
            in any statistic or derivative.

    Reference:

    - [Yao et al., 2020](https://arxiv.org/abs/2002.05712).

    Example:

    >>> import keras
    >>> import keras_norms
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras_norms.CrossIterationBatchNormalization(
    ...         keras.layers.Conv2D(16, 3, use_bias=False), window_size=4),
    ...     keras.layers.ReLU(),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(10),
    ... ])
    """

    # What the one-value-per-feature warning (window_size=1 only) says.
    ONE_VALUE_BEHAVIOUR = (
        "With window_size=1 every output is then beta and nothing before "
        "this layer learns through it; such a batch leaves the moving "
        "statistics as they are. A window_size of 2 or more learns there."
    )

    def __init__(
        self,
        layer,
        window_size=4,
        burnin_steps=0,
        compensation=True,
        compensation_gradient=True,
        negative_variance="clamp",
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
        **kwargs,
    ):
        if not isinstance(layer, Layer):
            raise TypeError(
                "Argument `layer` must be a Keras layer (Dense, Conv1D, "
                f"Conv2D or Conv3D). Received: layer={layer!r}"
            )
        _linear.check_supported(layer)
        super().__init__(layer, **kwargs)
        self.window_size = _check_int("window_size", window_size, 1)
        self.burnin_steps = _check_int("burnin_steps", burnin_steps, 0)
        self.compensation = _checks.check_bool("compensation", compensation)
        self.compensation_gradient = _checks.check_bool(
            "compensation_gradient", compensation_gradient
        )
        self.negative_variance = _checks.check_choice(
            "negative_variance", negative_variance, ("clamp", "exclude")
        )
        self.init_parameters(
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
        )
        self.synchronized = _checks.check_bool("synchronized", synchronized)
        self.supports_masking = _linear.is_dense(layer)

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        output_shape = self.layer.compute_output_shape(input_shape)
        ndim = len(output_shape)
        channel_axis = ndim - 1 if _linear.channels_last(self.layer) else 1
        # The wrapped layer's spec (its input rank and features), so that an
        # input that does not fit is refused in Keras's words.
        self.input_spec = self.layer.input_spec
        self._channel_axis = channel_axis
        self._reduction_axes = _axes.reduction_axes((channel_axis,), ndim)
        self._broadcast_shape = _axes.broadcast_shape(
            output_shape, (channel_axis,)
        )
        channels = output_shape[channel_axis]
        self.build_parameters((channels,))
        if self.window_size == 1:  # (only a window of one step warns)
            _moments.prepare_one_value_warning(self)
        self.step = self._state((), "step", "zeros", dtype="int32")
        past = self.window_size - 1
        if past:
            kernel_shape = tuple(self.layer.kernel.shape)
            self.past_kernel = self._state(
                (past,) + kernel_shape, "past_kernel"
            )
            self.past_dmu = self._state(
                (past,) + kernel_shape[:-1] + (1,), "past_dmu"
            )
            self.past_dnu = self._state((past,) + kernel_shape, "past_dnu")
            self.past_mu = self._state((past, channels), "past_mu")
            self.past_nu = self._state((past, channels), "past_nu")
            self.filled = self._state((), "filled", "zeros", dtype="int32")
        self.built = True

    def _state(self, shape, name, initializer="zeros", dtype=None):
        return self.add_weight(
            shape=shape,
            name=name,
            initializer=initializer,
            dtype=dtype,
            trainable=False,
            autocast=False,
        )

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return mask if self.supports_masking else None

    def call(self, inputs, training=None, mask=None):
        dtype = _moments.compute_dtype_for(inputs)
        inputs = ops.cast(inputs, dtype)
        kernel = ops.cast(self.layer.kernel, dtype)
        linear = _linear.apply(self.layer, inputs, kernel)
        if mask is not None:
            if not self.supports_masking:
                raise ValueError(
                    "Argument `mask` is only supported when the wrapped "
                    "layer is a Dense layer."
                )
            mask = _axes.broadcast_mask(mask, linear)
            if mask.shape[self._channel_axis] != 1:
                # One window position holds one step for every channel.
                raise ValueError(
                    "CrossIterationBatchNormalization takes a mask over "
                    "positions only, the same for every channel: of shape "
                    f"{tuple(linear.shape[:-1])} (Keras's convention) or "
                    f"with 1 on the last axis. Received: "
                    f"mask.shape={tuple(mask.shape)}"
                )
        gamma = ops.cast(self.gamma, dtype) if self.scale else None
        beta = ops.cast(self.beta, dtype) if self.center else None
        bias = _linear.bias(self.layer, dtype)
        if not (training and self.trainable):
            if bias is not None:  # the output whose mean the moving one is
                linear = linear + ops.reshape(bias, self._broadcast_shape)
            outputs = _moments.normalize_with(
                linear,
                ops.cast(self.moving_mean, dtype),
                ops.cast(self.moving_variance, dtype),
                gamma,
                beta,
                self.epsilon,
                (self._channel_axis,),
            )
            return ops.cast(outputs, self.compute_dtype)
        if bias is not None:
            # The bias cancels (the output and its mean shift by it alike):
            # it enters with weight 0, for a gradient of 0 (not none, which
            # optimizers warn about).
            zero = 0.0 * bias
            beta = zero if beta is None else beta + zero
        if mask is None and _backend.can_fuse(
            linear, (self._channel_axis,), self.synchronized
        ):
            # TensorFlow's fused kernels (large inputs, not under XLA): the
            # batch moments from the training-mode kernel, the output from
            # the inference-mode one with the averaged statistics, and a
            # closed-form gradient (README, "Speed").
            outputs = _backend.fused_normalization(
                linear,
                lambda m, v: self._training_statistics(
                    inputs, linear, kernel, None, bias, moments=(m, v)
                ),
                gamma,
                beta,
                self.epsilon,
            )
            return ops.cast(outputs, self.compute_dtype)
        mean, variance = self._training_statistics(
            inputs, linear, kernel, mask, bias
        )
        outputs = _moments.normalize(
            linear,
            mean,
            variance,
            gamma,
            beta,
            self.epsilon,
            self._broadcast_shape,
        )
        return ops.cast(outputs, self.compute_dtype)

    def _training_statistics(
        self, inputs, outputs, kernel, mask, bias, moments=None
    ):
        """The cross-iteration mean and variance of the bias-free `outputs`;
        updates all state (the moving mean with the wrapped layer's `bias`,
        None without one).

        `moments`: this batch's `(mean, variance)` when a fused kernel has
        computed them (no mask, one replica), else None."""
        mean, variance, count, dmu, dnu = self._batch_statistics(
            inputs, outputs, mask, moments
        )
        # Before the increment (in place on PyTorch: a copy).
        step = ops.copy(_backend.snapshot([self.step])[0])
        self.step.assign_add(ops.cast(1, "int32"))
        if moments is not None:  # a kernel's: NaN for an empty batch
            mean, variance = _moments.zero_if_empty(outputs, mean, variance)
        if self.window_size == 1:
            if not self.synchronized:
                _moments.warn_if_one_value(self, count)
            update = _moments.updatable(mean, variance, count)
            self._update_moving(mean, variance, update, bias)
            return mean, variance

        # Earlier steps, brought to the current kernel: linear in it, and
        # constants in the backward pass without `compensation_gradient`.
        dtype = mean.dtype
        # The buffers as this step's backward pass must see them, after
        # `_push` has written new ones (`_backend.snapshot`).
        buffers = [self.past_mu, self.past_nu, self.filled]
        if self.compensation:
            buffers += [self.past_dmu, self.past_dnu, self.past_kernel]
        past_mu, past_nu, filled, *derivatives = _backend.snapshot(buffers)
        past_mu, past_nu = ops.cast(past_mu, dtype), ops.cast(past_nu, dtype)
        if self.compensation:
            past_dmu, past_dnu, past_kernel = derivatives
            past_dmu = ops.cast(past_dmu, dtype)
            past_dnu = ops.cast(past_dnu, dtype)
            if self.compensation_gradient:
                # The backward pass reads them after `_push` has written
                # the buffers (in place on PyTorch): take this step's copy.
                past_dmu, past_dnu = ops.copy(past_dmu), ops.copy(past_dnu)
            else:
                kernel = ops.stop_gradient(kernel)
            delta = kernel - ops.cast(past_kernel, dtype)
            kernel_axes = tuple(range(1, len(delta.shape) - 1))
            past_mu = past_mu + ops.sum(past_dmu * delta, axis=kernel_axes)
            past_nu = past_nu + ops.sum(past_dnu * delta, axis=kernel_axes)
        past_var = past_nu - ops.square(past_mu)
        filled = ops.arange(self.window_size - 1, dtype="int32") < filled
        use = ops.logical_and(filled[:, None], step >= self.burnin_steps)
        if self.negative_variance == "clamp":
            past_var = ops.maximum(past_var, 0.0)
        else:
            use = ops.logical_and(use, past_var >= 0)
        use = ops.cast(use, dtype)

        # Average of means; variance = mean of variances + variance of means
        # (= average nu - average mean ** 2, without its cancellation).
        n = 1.0 + ops.sum(use, axis=0)
        avg_mean = (mean + ops.sum(use * past_mu, axis=0)) / n
        spread = ops.square(mean - avg_mean) + ops.sum(
            use * ops.square(past_mu - avg_mean), axis=0
        )
        avg_var = (variance + ops.sum(use * past_var, axis=0) + spread) / n

        # The moving statistics follow the ones this step normalizes with
        # (the window's), which have values to spread even at one value
        # per feature and step; `count * n` counts them (the steps of the
        # window as large as this one).
        values = ops.cast(count, dtype) * n
        self._update_moving(
            avg_mean,
            avg_var,
            _moments.updatable(avg_mean, avg_var, values),
            bias,
        )
        # A step of one value per feature is stored: with the others it
        # makes a spread.
        valid = _moments.updatable(mean, variance, count, minimum=1)
        self._push(kernel, mean, variance, dmu, dnu, valid, step)
        return avg_mean, avg_var

    def _update_moving(self, mean, variance, update, bias):
        """Moves the moving statistics towards the bias-free `mean` shifted
        by `bias` (the wrapped layer's output's mean) and `variance`."""
        if bias is not None:
            mean = mean + bias
        mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
        _moments.moving_average(self.moving_mean, mean, self.momentum, update)
        _moments.moving_average(
            self.moving_variance, variance, self.momentum, update
        )

    def _batch_statistics(self, inputs, outputs, mask, moments=None):
        """This step's moments of `outputs` (or the given `moments`) and,
        with a window, their derivatives d mu / d W and d nu / d W
        (constants).

        Returns `(mean, variance, count, dmu, dnu)`: `count` the positions
        per channel (`_moments.moments`), `dmu`/`dnu` None when
        `window_size == 1` or without `compensation`. With `synchronized`,
        all are over the global batch, from one all-reduce of the replicas'
        sums.
        """
        sums = ()
        if self.window_size > 1 and self.compensation:
            # d mu / d W and d nu / d W are sums / count (not needed by
            # the uncompensated average).
            sums = _linear.statistic_gradients(
                self.layer,
                ops.stop_gradient(inputs),
                ops.stop_gradient(outputs),
                None if mask is None else ops.cast(mask, outputs.dtype),
                ops.ones((), outputs.dtype),
            )
        if moments is not None:
            mean, variance = moments
            count = _axes.position_count(outputs, self._reduction_axes)
        elif self.synchronized or _backend.global_batch_program():
            mean, variance, count, sums = _reductions.synchronized_moments(
                outputs,
                self._reduction_axes,
                mask,
                shift=ops.cast(self.moving_mean, outputs.dtype),
                sums=sums,
            )
            count = ops.reshape(count, ())  # the same for every channel
        else:
            mean, variance, count = _moments.moments(
                outputs, self._reduction_axes, mask
            )
            if mask is not None:  # the same for every channel
                count = ops.reshape(count, ())
        if not sums:
            return mean, variance, count, None, None
        total = ops.maximum(ops.cast(count, outputs.dtype), 1.0)
        dmu, dnu = (s / total for s in sums)
        return mean, variance, count, dmu, dnu

    def _push(self, kernel, mean, variance, dmu, dnu, update, step):
        """Stores this step's statistics and derivatives in the buffer: not
        during burn-in, and not when any channel's statistics are invalid
        (`update` false: an empty or all-masked batch, a NaN or inf; one
        value per feature is valid here): one window position holds one
        step for every channel, whose shared `dmu` is not finite whenever
        the input is not."""
        push = ops.logical_and(step >= self.burnin_steps, ops.all(update))
        values = [
            (self.past_kernel, ops.stop_gradient(kernel)),
            (self.past_mu, ops.stop_gradient(mean)),
            (self.past_nu, ops.stop_gradient(variance + ops.square(mean))),
        ]
        if dmu is not None:  # (without `compensation`, none are computed)
            push = ops.logical_and(
                push,
                ops.logical_and(
                    ops.all(ops.isfinite(dmu)), ops.all(ops.isfinite(dnu))
                ),
            )
            values += [(self.past_dmu, dmu), (self.past_dnu, dnu)]
        for buffer, value in values:
            old = buffer.value
            new = ops.concatenate(
                [ops.cast(value, buffer.dtype)[None], old[:-1]], axis=0
            )
            buffer.assign(ops.where(push, new, old))
        filled = ops.minimum(self.filled + 1, self.window_size - 1)
        self.filled.assign(ops.where(push, filled, self.filled.value))

    def get_config(self):
        config = {
            "window_size": self.window_size,
            "burnin_steps": self.burnin_steps,
            "compensation": self.compensation,
            "compensation_gradient": self.compensation_gradient,
            "negative_variance": self.negative_variance,
            **self.parameters_config(),
            "synchronized": self.synchronized,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # Wrapper.from_config pops "layer" from the dict it is given.
        return super().from_config(dict(config), custom_objects)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Argument `{name}` must be an int >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    if int(value) != value or value < minimum:
        raise ValueError(
            f"Argument `{name}` must be an int >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    return int(value)

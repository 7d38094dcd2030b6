"""Batch normalization with masks, any rank and any feature axes."""

from keras import ops
from keras.layers import InputSpec
from keras.layers import Layer
from keras.saving import register_keras_serializable

from keras_norms import _axes
from keras_norms import _backend
from keras_norms import _checks
from keras_norms import _moments
from keras_norms.layers._parameters import NormalizationParameters


@register_keras_serializable(package="keras_norms")
class BatchNormalization(NormalizationParameters, Layer):
    """Layer that normalizes its inputs with batch statistics.

    A drop-in for `keras.layers.BatchNormalization` (same arguments, same
    weights, same masks, same numbers) that also accepts several feature
    axes and masks that broadcast to the input, and leaves its moving
    statistics untouched on an empty, all-masked or non-finite batch.

    **During training** (`training=True` and `layer.trainable`), for each
    feature, with `mean` and `var` the mean and biased variance of the batch
    over all non-feature axes (and only the positions where `mask` is true):

    `outputs = gamma * (inputs - mean) / sqrt(var + epsilon) + beta`

    and the moving statistics are updated:

    - `moving_mean = moving_mean * momentum + mean * (1 - momentum)`
    - `moving_variance = moving_variance * momentum + var * (1 - momentum)`

    **During inference** (`training=False`, the default, or
    `layer.trainable == False`):

    `outputs = gamma * (inputs - moving_mean) / sqrt(moving_variance +
    epsilon) + beta`

    As in Keras, setting `trainable = False` freezes the layer *and* puts it
    in inference mode, which is what fine-tuning needs.

    A training batch with one value per feature (a `Dense` output at batch
    size 1: online learning) has variance 0, so every output is `beta` and
    nothing before the layer learns. The layer then warns, once, and such
    a batch leaves the moving statistics as they are (Keras's BN pulls the
    moving variance towards 0). `CrossIterationBatchNormalization` with a
    window, or `keras.layers.LayerNormalization`, learn there.

    float16 and bfloat16 inputs are normalized in float32 and the result is
    cast to the layer's compute dtype; the weights stay float32.

    Args:
        axis: Integer or list of integers, the feature axis or axes (each
            normalized feature has its own statistics). For a `Conv2D` with
            `data_format="channels_first"`, use `axis=1`. Defaults to `-1`.
        momentum: Momentum of the moving averages, in [0, 1). Defaults to
            `0.99`.
        epsilon: Positive float added to the variance to avoid dividing by
            zero. Defaults to `1e-3`.
        center: If `True`, add the learned offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by the learned scale `gamma`. Can be
            disabled when the next layer is linear. Defaults to `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        moving_mean_initializer: Initializer for the moving mean. Defaults
            to `"zeros"`.
        moving_variance_initializer: Initializer for the moving variance.
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
        renorm: Accepted so that a `keras.layers.BatchNormalization` config
            loads; must be `False`. For batch renormalization use
            `keras_norms.BatchRenormalization`.
        renorm_clipping: Accepted with `renorm=False` (Keras ignores it
            then too): `None` or a dict.
        renorm_momentum: Accepted with `renorm=False` (unused), in [0, 1).
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input tensor of rank 2 or more.
        training: Python boolean or `None`; see above.
        mask: Optional boolean tensor, read as Keras reads it: with the
            shape of `inputs` without the last axis (e.g. `(batch, time)` for
            `(batch, time, features)`, what `Masking` and
            `Embedding(mask_zero=True)` pass on) it is repeated along the
            last axis, whatever `axis` is; or of the rank of `inputs` and a
            shape that broadcasts to it (e.g. `(batch, 1, time)` for
            channels-first sequences with `axis=1`). Masked-out positions
            take no part in the batch statistics (their outputs are still
            computed, and are finite); a feature whose positions are all
            masked out keeps its moving statistics. Keras passes the mask of
            the previous layer for you.

    Reference:

    - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_norms
    >>> layer = keras_norms.BatchNormalization()
    >>> x = np.random.normal(3.0, 2.0, size=(64, 8)).astype("float32")
    >>> y = keras.ops.convert_to_numpy(layer(x, training=True))
    >>> bool(abs(float(y.mean())) < 1e-4)
    True
    """

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
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_keras_renorm_arguments(renorm, renorm_clipping, renorm_momentum)
        # Types are checked now, ranges against the input rank in build.
        _axes.canonicalize_axes(axis)
        # Python ints in the config (NumPy integers are accepted).
        if isinstance(axis, (list, tuple)):
            self.axis = [int(a) for a in axis]
        else:
            self.axis = int(axis)
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
        self.supports_masking = True

    # Whether `update_statistics` returns a correction (r, d).
    _renormalizes = False
    # What the one-value-per-feature warning says the layer does then.
    ONE_VALUE_BEHAVIOUR = (
        "Every output is then beta and nothing before this layer learns "
        "through it; such a batch leaves the moving statistics as they are."
    )

    def build(self, input_shape):
        ndim = len(input_shape)
        if ndim < 2:
            raise ValueError(
                f"{self.__class__.__name__} needs inputs of rank 2 or more. "
                f"Received: input_shape={input_shape}"
            )
        self._feature_axes = _axes.canonicalize_axes(self.axis, ndim)
        self._reduction_axes = _axes.reduction_axes(self._feature_axes, ndim)
        for a in self._feature_axes:
            if input_shape[a] is None:
                raise ValueError(
                    f"The feature axis {a} of the input must have a known "
                    f"size. Received: input_shape={input_shape}, "
                    f"axis={self.axis}"
                )
        self._broadcast_shape = _axes.broadcast_shape(
            input_shape, self._feature_axes
        )
        shape = tuple(input_shape[a] for a in self._feature_axes)
        self.build_parameters(shape)
        self.build_statistics(shape)
        _moments.prepare_one_value_warning(self)
        self.input_spec = InputSpec(
            ndim=ndim, axes={a: input_shape[a] for a in self._feature_axes}
        )

    def build_statistics(self, shape):
        """Hook for subclasses that keep more statistics than BN."""

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            mask = _axes.broadcast_mask(mask, inputs)
        inputs = ops.cast(inputs, _moments.compute_dtype_for(inputs))
        dtype = inputs.dtype
        gamma = ops.cast(self.gamma, dtype) if self.scale else None
        beta = ops.cast(self.beta, dtype) if self.center else None
        training = training and self.trainable
        if training and not self.synchronized:
            _moments.warn_if_one_value(
                self, _axes.position_count(inputs, self._reduction_axes)
            )
        if not training:
            outputs = _moments.normalize_with(
                inputs,
                ops.cast(self.moving_mean, dtype),
                ops.cast(self.moving_variance, dtype),
                gamma,
                beta,
                self.epsilon,
                self._feature_axes,
            )
        elif (
            mask is None
            and _backend.can_fuse(inputs, self._feature_axes, self.synchronized)
            and not (self._renormalizes and self._may_be_one_value(inputs))
        ):
            positions = _axes.position_count(inputs, self._reduction_axes)
            # TensorFlow's fused kernel (large inputs, not under XLA): one
            # kernel for the moments and the normalization, and a fused
            # gradient (a train step 0.72x Keras's BN on 32x32x32x64, 0.56x
            # with the input gradient; README, "Speed").
            if not self._renormalizes:
                outputs, mean, variance = _backend.fused_batch_norm(
                    inputs, gamma, beta, self.epsilon
                )
                self.update_statistics(mean, variance, positions)
            else:  # r and d need the moments: applied after the kernel
                outputs = _backend.fused_renormalization(
                    inputs,
                    lambda m, v: self.update_statistics(m, v, positions),
                    gamma,
                    beta,
                    self.epsilon,
                )
        else:
            outputs = self._batch_normalize(inputs, mask, gamma, beta)
        return ops.cast(outputs, self.compute_dtype)

    def _may_be_one_value(self, inputs):
        """Whether a batch may hold one value per feature: BRN then takes
        the general path, whose `d` can carry the gradient (see
        BatchRenormalization). Only a batch size unknown when traced (a
        TensorFlow graph) with no other reduced axis above 1 may."""
        positions = _axes.position_count(inputs, self._reduction_axes)
        if isinstance(positions, int):
            return positions == 1
        return all(
            inputs.shape[a] in (None, 1) for a in self._reduction_axes
        ) and any(inputs.shape[a] is None for a in self._reduction_axes)

    def _batch_normalize(self, inputs, mask, gamma, beta):
        """The general training path: any backend, axes and mask."""
        axes, shape = self._reduction_axes, self._broadcast_shape
        input_shape = None
        ndim = len(inputs.shape)
        if (
            ndim > 2
            and self._feature_axes == (ndim - 1,)
            and _backend.positions_layout_helps()
        ):
            input_shape = ops.shape(inputs)
            inputs, mask = _axes.as_positions(inputs, mask)
            axes, shape = (0,), (1, inputs.shape[-1])
        mean, variance, count = _moments.moments(
            inputs,
            axes,
            mask,
            self.synchronized,
            shift=ops.cast(self.moving_mean, inputs.dtype),
        )
        # (An empty batch's moments are 0, not NaN: see `_moments.moments`.)
        correction = self.update_statistics(mean, variance, count)
        if correction:
            gamma, beta = _moments.compose(*correction, gamma, beta)
        outputs = _moments.normalize(
            inputs, mean, variance, gamma, beta, self.epsilon, shape
        )
        if input_shape is not None:
            outputs = ops.reshape(outputs, input_shape)
        return outputs

    def update_statistics(self, mean, variance, count):
        """Updates the statistics from a training batch's moments.

        `count` is the number of (unmasked) positions per feature, as
        `_moments.moments` returns it.
        Returns `None` (the batch is normalized with its own moments) or a
        correction `(r, d)`: `x_hat * r + d` replaces `x_hat`
        (renormalization).
        """
        update = _moments.updatable(mean, variance, count)
        _moments.moving_average(self.moving_mean, mean, self.momentum, update)
        _moments.moving_average(
            self.moving_variance, variance, self.momentum, update
        )
        return None

    def get_config(self):
        config = {
            "axis": self.axis,
            **self.parameters_config(),
            "synchronized": self.synchronized,
        }
        return {**super().get_config(), **config}


def _check_keras_renorm_arguments(renorm, renorm_clipping, renorm_momentum):
    """Keras's renormalization arguments, accepted when they ask for none."""
    if _checks.check_bool("renorm", renorm):
        raise ValueError(
            "keras_norms.BatchNormalization does not renormalize. Received: "
            "renorm=True. Use keras_norms.BatchRenormalization (its `rmax`, "
            "`dmax` and `renorm_momentum` arguments) for batch "
            "renormalization."
        )
    if renorm_clipping is not None and not isinstance(renorm_clipping, dict):
        raise TypeError(
            "Argument `renorm_clipping` must be None or a dict. Received: "
            f"renorm_clipping={renorm_clipping!r}"
        )
    _checks.check_unit_interval("renorm_momentum", renorm_momentum)

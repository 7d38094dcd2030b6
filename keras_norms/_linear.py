"""The linear layers that CrossIterationBatchNormalization wraps.

Private module, `keras.ops` only. For a wrapped `Dense` or `ConvND` with
kernel W and output y = f(x; W), per output channel c over the reduction
positions (M of them, or the unmasked ones):

- mean:   mu_c = E[y_c],   d mu_c / d W[..., c] = E[patch]        (any c)
- second: nu_c = E[y_c^2], d nu_c / d W[..., c] = 2 E[patch * y_c]

where `patch` is the input window that meets W at an output position (the
input row for Dense). Both derivatives are kernel gradients of the linear
map: for convolutions, each backend's own kernel-gradient op where it has
one (`_backend.conv_statistic_gradients`: TensorFlow's
`conv*d_backprop_filter`, `torch.nn.grad.conv*d_weight`, XLA's through
`jax.linear_transpose`), else the generic path here, strided input windows
with one matmul per kernel offset, which is the work of one kernel
gradient.
"""

import itertools
import math

from keras import layers
from keras import ops

from keras_norms import _backend

SUPPORTED = (layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D)


def check_supported(layer):
    """Raises a ValueError saying why `layer` cannot be wrapped."""
    unsupported = (
        layers.Conv1DTranspose,
        layers.Conv2DTranspose,
        layers.Conv3DTranspose,
        layers.DepthwiseConv1D,
        layers.DepthwiseConv2D,
        layers.SeparableConv1D,
        layers.SeparableConv2D,
    )
    name = type(layer).__name__
    if isinstance(layer, unsupported) or not isinstance(layer, SUPPORTED):
        raise ValueError(
            "CrossIterationBatchNormalization wraps a Dense, Conv1D, Conv2D "
            f"or Conv3D layer. Received: layer={name}. For other layers, "
            "use keras_norms.BatchNormalization or BatchRenormalization "
            "after them."
        )
    activation = getattr(layer.activation, "__name__", "")
    if activation != "linear":
        raise ValueError(
            "The wrapped layer must have no activation (normalization comes "
            f"between the linear map and the non-linearity). Received: "
            f"{name} with activation={activation!r}. Pass activation=None "
            "and apply the activation after CrossIterationBatchNormalization."
        )
    if layer.activity_regularizer is not None:
        raise ValueError(
            "The wrapped layer's activity_regularizer would never be applied "
            "(CrossIterationBatchNormalization computes the wrapped layer's "
            f"output itself). Received: {name} with activity_regularizer="
            f"{layer.activity_regularizer!r}. Pass activity_regularizer="
            "None, and give it to the CrossIterationBatchNormalization "
            "layer instead to regularize the normalized output."
        )
    if getattr(layer, "groups", 1) != 1:
        raise ValueError(
            "Grouped convolutions are not supported. Received: "
            f"{name} with groups={layer.groups}. Use groups=1, or put "
            "keras_norms.BatchNormalization after the layer."
        )
    if getattr(layer, "lora_enabled", False) or getattr(
        layer, "quantization_mode", None
    ):
        raise ValueError(
            f"The wrapped {name} uses LoRA or quantization, whose kernel is "
            "not a plain variable. Wrap the layer before enabling them."
        )


def is_dense(layer):
    return isinstance(layer, layers.Dense)


def channels_last(layer):
    return is_dense(layer) or layer.data_format == "channels_last"


def bias(layer, dtype):
    """The wrapped layer's bias in `dtype`, or None without one.

    A bias only shifts the mean of each output channel: CBN keeps its
    statistics, window and derivatives of the bias-free output `apply`
    computes, and adds the bias where the output's own mean is meant (the
    moving mean, inference)."""
    if not layer.use_bias:
        return None
    return ops.cast(layer.bias, dtype)


def apply(layer, inputs, kernel):
    """The wrapped layer's linear map with `kernel` (no bias, no activation)."""
    if is_dense(layer):
        return ops.matmul(inputs, kernel)
    # TensorFlow's convolution of an empty batch returns the input's shape
    # (channels included); a reshape to the known shape costs nothing.
    shape = layer.compute_output_shape(inputs.shape)
    padding = layer.padding
    if padding == "causal":  # Conv1D: pad the past, as Conv1D.call does
        extent = (layer.kernel_size[0] - 1) * layer.dilation_rate[0]
        pads = [(0, 0), (extent, 0), (0, 0)]
        if not channels_last(layer):
            pads = [(0, 0), (0, 0), (extent, 0)]
        inputs = ops.pad(inputs, pads)
        padding = "valid"
    outputs = ops.conv(
        inputs,
        kernel,
        strides=layer.strides,
        padding=padding,
        data_format=layer.data_format,
        dilation_rate=layer.dilation_rate,
    )
    if None not in shape[1:]:
        outputs = ops.reshape(outputs, (-1,) + tuple(shape[1:]))
    return outputs


def statistic_gradients(layer, inputs, outputs, weights, count):
    """d mu / d W and d nu / d W of every output channel (see module doc).

    Args:
        layer: The wrapped layer.
        inputs, outputs: Its input and output (constants here).
        weights: None, or the mask (Dense only): a `broadcast_mask` of
            `outputs` with 1 on the channel axis, as float.
        count: Number of reduction positions (a scalar tensor).

    Returns:
        `(dmu, dnu)`: `dmu` of the kernel's shape with 1 output channel
        (it is the same for every channel), `dnu` of the kernel's shape.
    """
    if not channels_last(layer):
        inputs = ops.moveaxis(inputs, 1, -1)
        outputs = ops.moveaxis(outputs, 1, -1)
    if weights is not None:
        # `where`, not a product with the mask: padding may hold inf or NaN.
        keep = ops.cast(weights, "bool")
        outputs = ops.where(keep, outputs, 0.0)
        inputs = ops.where(keep, inputs, 0.0)
    grad_y = 2.0 * outputs / count
    if is_dense(layer):
        x = ops.reshape(inputs, (-1, inputs.shape[-1]))
        g = ops.reshape(grad_y, (-1, grad_y.shape[-1]))
        dmu = ops.sum(x, axis=0, keepdims=True) / count
        return ops.transpose(dmu), ops.matmul(ops.transpose(x), g)
    return _conv_statistic_gradients(layer, inputs, grad_y, count)


def _conv_statistic_gradients(layer, inputs, grad_y, count):
    """The backend's own convolution kernel gradient where it has one for
    this case (`_backend.conv_statistic_gradients`), else the generic
    path."""
    fast = _backend.conv_statistic_gradients(layer, inputs, grad_y, count)
    if fast is not None:
        return fast
    return _generic_conv_statistic_gradients(layer, inputs, grad_y, count)


def _generic_conv_statistic_gradients(layer, inputs, grad_y, count):
    """One matmul per kernel offset over strided input windows."""
    if None in inputs.shape[1:]:  # TensorFlow traced with unknown sizes
        raise ValueError(
            "CrossIterationBatchNormalization of a dilated convolution needs "
            "the spatial size of its input to be known when the train step "
            "is traced on TensorFlow (its windows are sliced from it). "
            f"Received: {type(layer).__name__} with dilation_rate="
            f"{layer.dilation_rate} and inputs of shape {inputs.shape}. Feed "
            "batches of a fixed size (e.g. pad the sequences), or use "
            "dilation_rate=1."
        )
    padded = pad_input(layer, inputs)
    out_shape = tuple(grad_y.shape[1:-1])
    cin = inputs.shape[-1]
    g = ops.reshape(grad_y, (-1, grad_y.shape[-1]))
    dnu = [
        ops.matmul(ops.transpose(ops.reshape(window, (-1, cin))), g)
        for window in _windows(layer, padded, out_shape)
    ]
    kshape = tuple(layer.kernel_size) + (cin,)
    dnu = ops.reshape(ops.stack(dnu), kshape + (grad_y.shape[-1],))
    # Summing the batch first makes d mu / d W cost 1/N of d nu / d W.
    padded_sum = ops.sum(padded, axis=0, keepdims=True)
    return window_sums(layer, padded_sum, out_shape) / count, dnu


def _windows(layer, padded, out_shape):
    """The strided input window that meets each kernel offset (in the
    kernel's order), from the padded channels-last input."""
    rank = len(layer.kernel_size)
    for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
        index = [slice(None)]
        for d in range(rank):
            start = offset[d] * layer.dilation_rate[d]
            stop = start + (out_shape[d] - 1) * layer.strides[d] + 1
            index.append(slice(start, stop, layer.strides[d]))
        index.append(slice(None))
        yield padded[tuple(index)]


def window_sums(layer, padded, out_shape):
    """Per kernel offset and input channel, the sum of its input window
    (of the kernel's shape with 1 output channel): the kernel gradient of
    a cotangent of ones."""
    cin = padded.shape[-1]
    sums = [
        ops.sum(ops.reshape(window, (-1, cin)), axis=0)
        for window in _windows(layer, padded, out_shape)
    ]
    return ops.reshape(ops.stack(sums), tuple(layer.kernel_size) + (cin, 1))


def pad_input(layer, inputs):
    """Pads channels-last `inputs` the way the convolution did."""
    if layer.padding == "valid":
        return inputs
    pads = [(0, 0), *spatial_padding(layer, inputs.shape[1:-1]), (0, 0)]
    return ops.pad(inputs, pads)


def spatial_padding(layer, spatial_shape):
    """The (before, after) padding of each spatial axis of an input of
    `spatial_shape`, as the convolution applies it."""
    pads = []
    for d, size in enumerate(spatial_shape):
        k, s = layer.kernel_size[d], layer.strides[d]
        extent = (k - 1) * layer.dilation_rate[d] + 1
        if layer.padding == "valid":
            pads.append((0, 0))
        elif layer.padding == "causal":
            pads.append((extent - 1, 0))
        else:
            out = math.ceil(size / s)
            total = max((out - 1) * s + extent - size, 0)
            pads.append((total // 2, total - total // 2))
    return pads

"""PyTorch's fast paths: `torch.nn.functional.batch_norm`'s kernel (its
moments, with a written-out gradient where a layer needs them apart), one
`addcmul` per affine map, `torch.distributed`'s all-reduce, and torch's
convolution kernel-gradient ops.

Private module, imported by `_backend` on the PyTorch backend (and by
tests, on any backend): torch is imported inside each function. Under
`torch.compile` (Keras's `jit_compile=True`), the paths through an
autograd Function take the general path instead (`compiling`).
"""

import functools
import math

from keras import backend

from keras_norms import _linear
from keras_norms import _moments


def positions_layout_helps():
    """Yes: one 2-D reduction over `(positions, features)`."""
    return True


def can_fuse(inputs):
    """More than one position per feature (the kernel refuses one), float32
    or float64 (`torch.nn.functional.batch_norm`)."""
    shape = tuple(inputs.shape)
    dtype = backend.standardize_dtype(inputs.dtype)
    return dtype in ("float32", "float64") and _positions_known(shape) > 1


def _positions_known(shape):
    """Positions per feature of a features-last shape (0 if unknown)."""
    return 0 if None in shape else math.prod(shape[:-1])


def compiling():
    """Whether `torch.compile` (Keras's `jit_compile=True`) is tracing."""
    import torch

    return torch.compiler.is_compiling()


def snapshot(values):
    """The values of state variables as this step's backward pass must
    see them.

    Eagerly, the variables' tensors (the callers copy those that a
    backward formula saves, which an assignment changes in place). Under
    `torch.compile`, copies that AOTAutograd must save: its partitioner
    otherwise re-reads a variable in the compiled backward, after the
    step's in-place assignment has changed it, and the backward sees other
    statistics than the forward (CBN's window: silently different
    gradients). Selective activation checkpointing's `MUST_SAVE` pins the
    copies. Smallest reproduction, without Keras (torch 2.13, `backend=
    "aot_eager"` or inductor): a step `y = x * w; avg = (y.mean(0) + buf)
    / 2; loss = ((y - avg) ** 3).sum()` followed by `buf.copy_(
    y.mean(0))` under `no_grad` gives other gradients of `w` compiled than
    eager, from the first step (pytorch/pytorch#197039 pins such reads).
    """
    values = [getattr(v, "value", v) for v in values]
    if not compiling():
        return values
    from torch.utils import checkpoint

    def must_save(ctx, op, *args, **kwargs):
        return checkpoint.CheckpointPolicy.MUST_SAVE

    def copy(*tensors):
        # A product: the partitioner drops a `torch.clone` (an alias).
        return tuple(t * 1 for t in tensors)

    return list(
        checkpoint.checkpoint(
            copy,
            *values,
            use_reentrant=False,
            context_fn=functools.partial(
                checkpoint.create_selective_checkpoint_contexts, must_save
            ),
        )
    )


def _rows(inputs):
    """A features-last torch tensor as `(positions, features)` (a view)."""
    return inputs.reshape(-1, inputs.shape[-1])


def fused_batch_norm(inputs, scale, offset, epsilon):
    """`torch.nn.functional.batch_norm` on `(positions, features)`: its
    kernel computes the moments (precisely: per feature, mean then centred
    squares) and normalizes, and its backward is one kernel too. The
    moments come out through running statistics at momentum 1 (the batch's
    own, the variance Bessel-corrected)."""
    import torch

    x = _rows(inputs)
    positions, channels = x.shape
    mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
    variance = torch.ones(channels, dtype=x.dtype, device=x.device)
    outputs = torch.nn.functional.batch_norm(
        x, mean, variance, scale, offset, True, 1.0, epsilon
    )
    variance = variance * ((positions - 1) / positions)
    return outputs.reshape(inputs.shape), mean, variance


def fused_renormalization(inputs, correct, scale, offset, epsilon):
    """Renormalization on torch's kernel, called twice: once without
    gradient for the batch moments (as in `fused_batch_norm`; 0.55
    ms on 32768 x 64, where `torch.var_mean` takes 7.9 ms), from which `r`
    and `d` follow as constants, then in training mode with the
    renormalized scale and offset, whose backward kernel differentiates
    through its own batch moments and gives the scale's and offset's
    gradients (an `addcmul` on `x_hat` instead made the step 1.46-1.66x
    BN's, its backward being a product and a sum over the batch)."""
    import torch

    with torch.no_grad():
        _, mean, variance = fused_batch_norm(inputs, None, None, epsilon)
    r, d = correct(mean, variance)
    scale, offset = _moments.compose(r, d, scale, offset)
    outputs = torch.nn.functional.batch_norm(
        _rows(inputs), None, None, scale, offset, True, 0.0, epsilon
    )
    return outputs.reshape(inputs.shape)


@functools.cache
def kernel_moments():
    """Differentiable batch moments of `(positions, features)` from torch's
    kernel (no gradient; `torch.var_mean` takes 14x as long on 32768 x
    64), with their gradient written out: `d_mean / N + (x - mean) * 2
    d_variance / N`, a subtraction and a multiply-add per element (with the
    subtraction folded into the multiply-add, float32 cancellation lost
    the gradient where |mean| * d_variance is large).

    With `keep` (one boolean per position), only the kept rows enter: they
    are gathered for the kernel (what padding holds, inf or NaN included,
    never reaches it) and the gradient is zero elsewhere. Fewer than two
    kept rows (the kernel refuses one) give their sum and a zero variance:
    the one row's own values, or zeros for an all-masked batch, as the
    general path. Returns `(mean, variance, count)`. Defined once
    (cached)."""
    import torch

    class Moments(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, keep):
            with torch.no_grad():
                rows = x if keep is None else x[keep]
                count = rows.shape[0]
                if count > 1:  # (1.0: the discarded output's epsilon)
                    _, mean, variance = fused_batch_norm(rows, None, None, 1.0)
                else:
                    mean = rows.sum(dim=0)
                    variance = torch.zeros_like(mean)
            ctx.save_for_backward(x, keep, mean)
            ctx.count = max(count, 1)
            count = torch.full((1,), count, dtype=x.dtype, device=x.device)
            ctx.mark_non_differentiable(count)
            return mean, variance, count

        @staticmethod
        def backward(ctx, d_mean, d_variance, _):
            x, keep, mean = ctx.saved_tensors
            b = 2.0 * d_variance / ctx.count
            d_x = torch.addcmul(d_mean / ctx.count, x - mean, b)
            if keep is not None:
                d_x = torch.where(keep[:, None], d_x, 0.0)
            return d_x, None

    return Moments.apply


def masked_moments(inputs, axes, mask):
    """`_moments.moments` with a mask on torch, from torch's kernel over
    the kept positions (`kernel_moments`): where the features are the last
    axis, every other axis is reduced and the mask does not vary along the
    features (Keras's masks), in float32 or float64, eagerly. `None`
    elsewhere, and under `torch.compile` (`jit_compile=True`), which would
    break its graph at the gather whose size depends on the mask. A masked
    32x100x256 layer call with its backward took 4.7 ms against 10.4 ms
    for the general path."""
    ndim = len(inputs.shape)
    if (
        compiling()
        or axes != tuple(range(ndim - 1))
        or mask.shape[-1] != 1
        or backend.standardize_dtype(inputs.dtype) not in ("float32", "float64")
    ):
        return None
    keep = mask.expand(*inputs.shape[:-1], 1).reshape(-1)
    return kernel_moments()(_rows(inputs), keep)


def fused_normalization(inputs, statistics, scale, offset, epsilon):
    """CBN's normalization on torch: the batch moments from torch's kernel
    (`kernel_moments`; under `torch.compile`, whose graph the autograd
    Function would break, `_moments.moments`), `statistics` maps them,
    `_moments.normalize` applies."""
    x = _rows(inputs)
    if compiling():
        mean, variance, _ = _moments.moments(x, (0,))
    else:
        mean, variance, _ = kernel_moments()(x, None)
    mean, variance = statistics(mean, variance)
    outputs = _moments.normalize(
        x, mean, variance, scale, offset, epsilon, (1, -1)
    )
    return outputs.reshape(inputs.shape)


def normalize_with(inputs, mean, variance, scale, offset, epsilon, axes):
    """`_moments.normalize_with` on torch's inference-mode kernel
    (`torch.nn.functional.batch_norm`: one pass, and one for each gradient
    that is needed) where there is one feature axis that is the last (of a
    rank other than 2) or axis 1; else None (the general path)."""
    ndim = len(inputs.shape)
    if ndim < 2 or len(axes) != 1:
        return None
    import torch

    if axes == (ndim - 1,) and ndim != 2:
        x = inputs.reshape(-1, inputs.shape[-1])
    elif axes == (1,):
        x = inputs
    else:
        return None
    outputs = torch.nn.functional.batch_norm(
        x, mean, variance, scale, offset, False, 0.0, epsilon
    )
    return outputs.reshape(inputs.shape)


def multiply_add(inputs, scale, offset):
    """`inputs * scale + offset` as one `addcmul` kernel, not two."""
    import torch

    return torch.addcmul(offset, inputs, scale)


def replica_sum():
    """In a `torch.distributed` process group of several processes, a
    differentiable all-reduce (sum) of a flat tensor; else None."""
    return _all_reduce() if _process_group() else None


def _process_group():
    """Whether a `torch.distributed` process group of several processes
    is initialized."""
    import torch.distributed as dist

    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


@functools.cache
def _all_reduce():
    """A differentiable `torch.distributed.all_reduce` (sum): the backward
    of a sum over processes is the sum over processes of the gradients, as
    in torch's own `SyncBatchNorm`. Defined once (cached)."""
    import torch
    import torch.distributed as dist

    class AllReduceSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, flat):
            flat = flat.clone()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            return flat

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            return grad

    return AllReduceSum.apply


def global_batch_program():
    """False: each process runs the step on its own batch."""
    return False


def conv_statistic_gradients(layer, inputs, grad_y, count):
    """`_linear.statistic_gradients` of a convolution (channels last) from
    torch's kernel-gradient op (`torch.nn.grad.convNd_weight`) on the
    explicitly padded input, viewed channels-first; None (the generic path)
    for an empty batch."""
    # torch's kernel-gradient op crashes the process (segmentation fault,
    # torch 2.13 on CPU) on an empty batch: that one takes the generic path.
    if 0 in inputs.shape:
        return None
    import torch

    rank = len(layer.kernel_size)
    weight_of = (
        torch.nn.grad.conv1d_weight,
        torch.nn.grad.conv2d_weight,
        torch.nn.grad.conv3d_weight,
    )[rank - 1]
    first = (0, rank + 1) + tuple(range(1, rank + 1))  # features to axis 1
    padded = _linear.pad_input(layer, inputs)
    cin = inputs.shape[-1]

    def kernel_gradient(x, g):
        gradient = weight_of(
            x.permute(first),
            (g.shape[-1], cin) + tuple(layer.kernel_size),
            g.permute(first),
            stride=tuple(layer.strides),
            dilation=tuple(layer.dilation_rate),
        )  # (out, in, *kernel) -> Keras's (*kernel, in, out)
        return gradient.permute(tuple(range(2, rank + 2)) + (1, 0))

    dnu = kernel_gradient(padded, grad_y)
    # Summing the batch first makes d mu / d W cost 1/N of d nu / d W.
    ones = torch.ones_like(grad_y[:1, ..., :1]) / count
    dmu = kernel_gradient(padded.sum(dim=0, keepdim=True), ones)
    return dmu, dnu


def no_grad():
    """A context that records no autograd graph (`torch.no_grad`): eager
    calls record one otherwise."""
    import torch

    return torch.no_grad()


def warning_flag():
    """No flag: `warn_when` needs none."""
    return None


def warn_when(condition, warn, flag=None):
    """Calls `warn()` if the scalar boolean `condition` is true; nothing
    under `torch.compile`, where reading it would break the graph (eager
    torch knows every size, so the layers rarely ask). `flag` is
    unused."""
    if not compiling() and bool(condition):
        warn()

"""The shared math of `keras_norms._moments` against NumPy."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_norms
from keras_norms import _axes
from keras_norms import _backend
from keras_norms import _moments
from keras_norms import _reductions
from keras_norms._backend import tensorflow as tf_backend
from keras_norms._backend import torch as torch_backend
from tests import references
from tests.helpers import BACKEND
from tests.helpers import assert_close
from tests.helpers import assert_close_to_reference
from tests.helpers import sgd_update
from tests.helpers import to_numpy
from tests.helpers import train_call


@pytest.mark.parametrize(
    "axis,ndim,expected",
    [(-1, 3, (2,)), (1, 4, (1,)), ([3, -3], 4, (1, 3)), ((0,), 2, (0,))],
)
def test_canonicalize_axes(axis, ndim, expected):
    assert _axes.canonicalize_axes(axis, ndim) == expected
    assert _axes.reduction_axes(expected, ndim) == tuple(
        a for a in range(ndim) if a not in expected
    )


@pytest.mark.parametrize(
    "axis,error", [(3, ValueError), ([1, -2], ValueError), ("x", TypeError)]
)
def test_canonicalize_axes_refuses(axis, error):
    with pytest.raises(error, match="axis"):
        _axes.canonicalize_axes(axis, 3)


MASKS = ["none", "keras", "broadcast", "full"]


def _mask(rng, shape, feature_axes, kind):
    """None, or a mask in one of the forms layers accept: Keras's (rank - 1,
    repeated along the last axis whatever the feature axes), one that
    broadcasts (1 at the feature axes), or one of the input's shape."""
    if kind == "none":
        return None
    if kind == "keras":
        mshape = shape[:-1]
    elif kind == "broadcast":
        mshape = [1 if a in feature_axes else d for a, d in enumerate(shape)]
    else:
        mshape = shape
    return rng.random(mshape) < 0.5


def _assert_counts(count, rcount, mask):
    if mask is None:
        assert count is None or float(to_numpy(count)) == rcount.flat[0]
        return
    count = np.broadcast_to(to_numpy(count), rcount.shape)
    np.testing.assert_array_equal(count, rcount)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize(
    "shape,feature_axes",
    [((5, 7, 3), (2,)), ((4, 3, 5, 2), (1,)), ((3, 4, 5, 6), (1, 3))],
)
def test_moments_match_numpy(shape, feature_axes, kind):
    rng = np.random.default_rng(0)
    # A mean far larger than the spread: the two-pass variance keeps it to
    # 1e-6 (3e-7 on each backend); E[x^2] - E[x]^2 is off by 0.4 to 0.7.
    x = rng.normal(1000.0, 0.5, size=shape).astype("float32")
    mask = _mask(rng, shape, feature_axes, kind)
    axes = _axes.reduction_axes(feature_axes, len(shape))
    x = ops.convert_to_tensor(x)
    keep = None
    if mask is not None:
        keep = _axes.broadcast_mask(ops.convert_to_tensor(mask), x)
    mean, var, count = _moments.moments(x, axes, keep)
    rmean, rvar, rcount = references.batch_moments(x, mask, feature_axes)
    np.testing.assert_allclose(to_numpy(mean), rmean, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(var), rvar, rtol=1e-6)
    _assert_counts(count, rcount, mask)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize(
    "shape,feature_axes", [((5, 7, 3), (2,)), ((3, 4, 5, 6), (1, 3))]
)
def test_synchronized_moments_match_numpy(shape, feature_axes, kind):
    """The one-pass sums of the synchronized path (on one replica), with
    the shift near the mean that keeps float32 cancellation small."""
    rng = np.random.default_rng(0)
    x = rng.normal(1000.0, 0.5, size=shape).astype("float32")
    mask = _mask(rng, shape, feature_axes, kind)
    axes = _axes.reduction_axes(feature_axes, len(shape))
    rmean, rvar, rcount = references.batch_moments(x, mask, feature_axes)
    shift = (rmean + rng.normal(0.0, 0.1, size=rmean.shape)).astype("float32")
    extra = rng.normal(size=(2, 3)).astype("float32")
    x = ops.convert_to_tensor(x)
    keep = None
    if mask is not None:
        keep = _axes.broadcast_mask(ops.convert_to_tensor(mask), x)
    mean, var, count, sums = _reductions.synchronized_moments(
        x,
        axes,
        keep,
        shift=ops.convert_to_tensor(shift),
        sums=[ops.convert_to_tensor(extra)],
    )
    np.testing.assert_allclose(to_numpy(mean), rmean, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(var), rvar, rtol=1e-4)
    _assert_counts(count, rcount, mask)
    np.testing.assert_array_equal(to_numpy(sums[0]), extra)


def test_moments_of_an_all_masked_batch_are_zero():
    x = ops.ones((2, 3, 4))
    keep = _axes.broadcast_mask(ops.zeros((2, 3), "bool"), x)
    mean, var, count = _moments.moments(x, (0, 1), keep)
    np.testing.assert_array_equal(to_numpy(mean), np.zeros(4))
    np.testing.assert_array_equal(to_numpy(var), np.zeros(4))
    np.testing.assert_array_equal(to_numpy(count), [0.0])


@pytest.mark.parametrize(
    "input_shape,mask_shape,expected",
    [
        ((5, 2, 3), (5, 2), (5, 2, 1)),  # Keras's: rank - 1, any axis
        ((2, 3, 4, 5), (2, 3, 1), None),  # rank - 1 that broadcasts
        ((2, 3, 4), (2, 1, 4), (2, 1, 4)),  # channels-first sequences
        ((2, 3, 4), (2, 3, 4), (2, 3, 4)),
        ((2, 3), (2,), (2, 1)),
    ],
)
def test_broadcast_mask_reads_masks_as_keras(input_shape, mask_shape, expected):
    x = ops.ones(input_shape)
    keep = _axes.broadcast_mask(ops.ones(mask_shape, "bool"), x)
    assert tuple(keep.shape) == (expected or mask_shape + (1,))
    assert keras.backend.standardize_dtype(keep.dtype) == "bool"


@pytest.mark.parametrize(
    "input_shape,mask_shape",
    [
        ((2, 3, 4), (2,)),
        ((2, 3, 4), (2, 4)),
        ((2, 3, 4), (2, 3, 5)),
        ((2, 3, 4), (2, 3, 4, 1)),
        ((2, 3, 4, 5), (2, 4, 1)),
    ],
)
def test_broadcast_mask_refuses_other_shapes(input_shape, mask_shape):
    with pytest.raises(ValueError, match="without the last axis") as info:
        _axes.broadcast_mask(
            ops.ones(mask_shape, "bool"), ops.ones(input_shape)
        )
    assert f"mask.shape={mask_shape}" in str(info.value)


def test_normalize_is_the_affine_batch_norm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5)).astype("float32")
    mean, var = rng.normal(size=5), rng.random(5) + 0.5
    gamma, beta = rng.normal(size=5), rng.normal(size=5)
    got = _moments.normalize(
        ops.convert_to_tensor(x),
        *(ops.convert_to_tensor(v.astype("float32")) for v in (mean, var)),
        *(ops.convert_to_tensor(v.astype("float32")) for v in (gamma, beta)),
        1e-3,
        (1, 1, 5),
    )
    expected = references.normalize_inference(
        x, (2,), mean, var, gamma, beta, 1e-3
    )
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((6, 4), -1),
        ((3, 5, 4), -1),
        ((3, 4, 5), 1),
        ((2, 3, 4, 5), -1),
        ((2, 5, 3, 4), 1),
        ((2, 3, 4, 5), 2),
        ((2, 3, 4, 5), [1, 3]),
    ],
)
@pytest.mark.parametrize("affine", [True, False])
def test_inference_against_reference(shape, axis, affine):
    """At inference (PyTorch: its kernel for one feature axis, last or 1;
    elsewhere and otherwise `normalize`) outputs and the gradients of the
    input, gamma and beta (a frozen layer in a trained model) equal the
    float64 reference."""
    rng = np.random.default_rng(0)
    layer = keras_norms.BatchNormalization(
        axis=axis, center=affine, scale=affine
    )
    layer.build(shape)
    features = layer.moving_mean.shape
    mean = rng.normal(3.0, 1.0, features)
    variance = rng.uniform(0.5, 2.0, features)
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(variance)
    gamma, beta = np.ones(features), np.zeros(features)
    if affine:
        gamma, beta = rng.uniform(0.5, 1.5, features), rng.normal(size=features)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    x = rng.normal(3.0, 1.5, size=shape).astype("float32")
    dy = rng.normal(size=shape)
    y, dx, grads = train_call(layer, x, dy, training=False)
    axes = layer._feature_axes
    expected = references.normalize_inference(
        x, axes, mean, variance, gamma, beta, layer.epsilon
    )
    unit = references.normalize_inference(
        x, axes, mean, variance, 1.0, 0.0, layer.epsilon
    )
    reduce = tuple(a for a in range(len(shape)) if a not in axes)
    bshape = [shape[a] if a in axes else 1 for a in range(len(shape))]
    inv = gamma.reshape(bshape) / np.sqrt(variance.reshape(bshape) + 1e-3)
    assert_close_to_reference(y, expected, "outputs")
    assert_close_to_reference(dx, dy * inv, "input gradient")
    if affine:
        d_gamma = np.sum(dy * unit, axis=reduce).reshape(features)
        d_beta = np.sum(dy, axis=reduce).reshape(features)
        assert_close_to_reference(grads["gamma"], d_gamma, "gamma gradient")
        assert_close_to_reference(grads["beta"], d_beta, "beta gradient")


def _train_both_ways(fast, general, batch, fast_path, general_path, step):
    """One training call of `fast` after `fast_path()` and of `general`
    after `general_path()` on `batch` = `(x, dy, mask)`, then an SGD step
    each. The paths sum in different orders, so outputs, gradients and
    every statistic agree to 1e-5 of each array's largest entry."""
    fast_path()
    y1, dx1, g1 = train_call(fast, *batch)
    general_path()
    y2, dx2, g2 = train_call(general, *batch)
    assert_close_to_reference(y1, y2, f"outputs, step {step}")
    assert_close_to_reference(dx1, dx2, f"input gradient, step {step}")
    for name in g1:
        assert_close_to_reference(g1[name], g2[name], f"{name}, {step}")
    for w1, w2 in zip(
        fast.non_trainable_weights, general.non_trainable_weights
    ):
        assert_close_to_reference(
            to_numpy(w1), to_numpy(w2), f"{w1.name}, {step}"
        )
    sgd_update(fast, g1)
    sgd_update(general, g2)


@pytest.mark.parametrize(
    "shape", [(6, 4), (3, 5, 4), (4, 5, 6, 3), (2, 3, 4, 5, 3)]
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_norms.BatchNormalization(momentum=0.8),
        lambda: keras_norms.BatchNormalization(center=False, scale=False),
        lambda: keras_norms.BatchRenormalization(
            rmax=1.5, dmax=0.5, renorm_momentum=0.5, momentum=0.8
        ),
    ],
    ids=["bn", "bn_plain", "brn"],
)
def test_fused_path_equals_general_path(make, shape, monkeypatch):
    """On TensorFlow and PyTorch, float32 inputs with the features last and
    no mask take the backend's kernel; elsewhere (and here, with it
    switched off) the general path runs. The two sum in different orders,
    so results agree to 1e-5 of each array's largest entry."""
    monkeypatch.setattr(tf_backend, "FUSE_ABOVE_SIZE", 0)  # fused at any size
    fast, general = make(), make()
    fast.build(shape)
    general.build(shape)
    fused_calls = []
    real_can_fuse = _backend.can_fuse

    def spy(*args, **kwargs):
        fused_calls.append(real_can_fuse(*args, **kwargs))
        return fused_calls[-1]

    rng = np.random.default_rng(0)
    for step in range(4):
        x = rng.normal(step - 1.0, 0.5 + step % 2, size=shape)
        x = x.astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        _train_both_ways(
            fast,
            general,
            (x, dy, None),
            lambda: monkeypatch.setattr(_backend, "can_fuse", spy),
            lambda: monkeypatch.setattr(
                _backend, "can_fuse", lambda *a, **k: False
            ),
            step,
        )
    assert fused_calls and all(fused_calls) == (BACKEND != "jax")


def _kept(shape, kept):
    """A Keras mask over `shape` without its last axis: "padded" keeps a
    prefix of every sequence (at least one position each), "one" a single
    position of the batch, "none" nothing."""
    mask = np.zeros(shape[:-1], bool)
    if kept == "padded":
        lengths = np.random.default_rng(1).integers(1, shape[1] + 1, shape[0])
        for row, length in enumerate(lengths):
            mask[row, :length] = True
    elif kept == "one":
        mask[(1,) * mask.ndim] = True
    return mask


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's kernel")
@pytest.mark.parametrize("kept", ["padded", "one", "none"])
@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: keras_norms.BatchNormalization(momentum=0.8), (4, 6, 5)),
        (lambda: keras_norms.BatchNormalization(momentum=0.8), (3, 4, 5, 2)),
        (
            lambda: keras_norms.BatchRenormalization(
                rmax=1.5, dmax=0.5, renorm_momentum=0.5, momentum=0.8
            ),
            (4, 6, 5),
        ),
        (
            lambda: keras_norms.CrossIterationBatchNormalization(
                keras.layers.Dense(3, use_bias=False), window_size=3
            ),
            (4, 6, 5),
        ),
    ],
    ids=["bn", "bn_4d", "brn", "cbn"],
)
def test_masked_kernel_moments_equal_general_path(
    make, shape, kept, monkeypatch
):
    """On PyTorch, masked moments come from torch's kernel over the kept
    positions (`_torch_masked_moments`); with it switched off, the general
    path runs. Padding holds values far from the rest, which would move
    the statistics if it entered them; with one position or none kept the
    kernel cannot run and the moments are written out. Outputs, gradients
    and every statistic agree over 3 steps."""
    keras.utils.set_random_seed(0)
    fast = make()
    keras.utils.set_random_seed(0)
    general = make()
    fast.build(shape)
    general.build(shape)
    mask = _kept(shape, kept)
    kernel_calls = []
    real = torch_backend.masked_moments

    def spy(*args):
        kernel_calls.append(real(*args))
        return kernel_calls[-1]

    rng = np.random.default_rng(0)
    for step in range(3):
        x = rng.normal(step - 1.0, 0.5 + step % 2, size=shape)
        x[~mask] = 1e3
        x = x.astype("float32")
        out_shape = fast.compute_output_shape(shape)
        dy = rng.normal(size=out_shape)
        _train_both_ways(
            fast,
            general,
            (x, dy, mask),
            lambda: monkeypatch.setattr(torch_backend, "masked_moments", spy),
            lambda: monkeypatch.setattr(
                torch_backend, "masked_moments", lambda *a: None
            ),
            step,
        )
    assert kernel_calls and all(c is not None for c in kernel_calls)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's kernel")
def test_masked_kernel_moments_have_second_derivatives(monkeypatch):
    """A gradient penalty (the input gradient's norm, differentiated again)
    through the kernel's masked moments equals the general path's: their
    written-out gradient is itself differentiable."""
    import torch

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(1.0, 2.0, size=(4, 6, 5)), dtype=torch.float32)
    dy = torch.tensor(rng.normal(size=(4, 6, 5)), dtype=torch.float32)
    mask = torch.tensor(_kept((4, 6, 5), "padded"))

    def penalty_gradients(masked_moments):
        monkeypatch.setattr(torch_backend, "masked_moments", masked_moments)
        layer = keras_norms.BatchNormalization(gamma_initializer="ones")
        layer.build(x.shape)
        inputs = x.clone().requires_grad_()
        y = layer(inputs, training=True, mask=mask)
        (dx,) = torch.autograd.grad((y * dy).sum(), inputs, create_graph=True)
        (dx.square() * torch.linspace(0.0, 1.0, 5)).sum().backward()
        return inputs.grad.numpy(), layer.gamma.value.grad.numpy()

    fast = penalty_gradients(torch_backend.masked_moments)
    general = penalty_gradients(lambda *a: None)
    assert_close_to_reference(fast[0], general[0], "input, second order")
    assert_close_to_reference(fast[1], general[1], "gamma, second order")


def _masked_model(make_layers):
    inputs = keras.Input((6, 5))
    x = keras.layers.Masking()(inputs)
    for layer in make_layers():
        x = layer(x)
    return keras.Model(inputs, x)


def _torch_compile_layers():
    return [
        keras.layers.Dense(4, use_bias=False),
        keras_norms.BatchNormalization(momentum=0.5),
        keras_norms.BatchRenormalization(rmax=1.5, dmax=0.5, momentum=0.5),
        keras_norms.CrossIterationBatchNormalization(
            keras.layers.Dense(3, use_bias=False), window_size=2
        ),
    ]


def _sequences():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(8, 6, 5)).astype("float32")
    x[:4, 4:] = 0.0  # padding, masked by `Masking`
    return x, rng.normal(size=(8, 6, 3)).astype("float32")


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's torch.compile")
@pytest.mark.parametrize("masked", [True, False])
def test_torch_compile_takes_the_general_path(masked, monkeypatch):
    """Under `torch.compile` the moments that an autograd Function takes
    from torch's kernel (masked: BN, BRN, CBN; unmasked: CBN) come from the
    general path, whose graph does not break; the numbers are the same."""
    x, y = _sequences()
    if not masked:
        x[:4, 4:] = 1.0  # nothing is masked
    trained = []
    real = torch_backend.kernel_moments
    for compiling in (False, True):
        monkeypatch.setattr(torch_backend, "compiling", lambda: compiling)
        calls = []
        monkeypatch.setattr(
            torch_backend, "kernel_moments", lambda: calls.append(1) or real()
        )
        keras.utils.set_random_seed(0)
        model = _masked_model(_torch_compile_layers)
        model.compile("sgd", "mse")
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        assert bool(calls) != compiling, (compiling, len(calls))
        trained.append([to_numpy(w) for w in model.weights])
    for eager, compiled in zip(*trained):
        assert_close(compiled, eager, "weights")


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's torch.compile")
def test_fit_with_jit_compile_on_torch():
    """`jit_compile=True` on PyTorch (`torch.compile`): BN and BRN on
    masked sequences train to the same weights as eagerly, and dynamo warns
    about none of this package's code (the graph broke at the masked
    moments' autograd Function before). CBN: the test below."""
    import warnings

    x, _ = _sequences()
    y = np.random.default_rng(1).normal(size=(8, 6, 4)).astype("float32")
    trained = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = _masked_model(lambda: _torch_compile_layers()[:3])
        model.compile("sgd", "mse", jit_compile=jit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        ours = [
            str(w.message) for w in caught if "keras_norms" in str(w.message)
        ]
        assert not ours, ours
        trained.append([to_numpy(w) for w in model.weights])
    for eager, compiled in zip(*trained):  # (inductor sums in its own order)
        assert_close(compiled, eager, "weights", rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize(
    "shape,fused",
    [
        ((256, 1024), False),  # 2**18 elements: the general path
        ((257, 1024), True),
        ((4, 16, 16, 512), True),
        ((64, 64, 64), False),
    ],
)
def test_fused_kernel_only_above_a_size(shape, fused):
    """TensorFlow's fused kernel is chosen for inputs of more than
    `FUSE_ABOVE_SIZE` elements; smaller ones train faster on the general
    path. PyTorch's kernel applies at any size, JAX has none."""
    x = ops.zeros(shape, "float32")
    expected = (fused and BACKEND == "tensorflow") or BACKEND == "torch"
    assert _backend.can_fuse(x, (len(shape) - 1,), False) == expected
    assert not _backend.can_fuse(x, (len(shape) - 1,), True)  # synchronized


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's kernels")
@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 4, 5, 3)])
@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_norms.BatchNormalization(momentum=0.5),
        lambda: keras_norms.BatchRenormalization(
            rmax=1.2, dmax=0.3, renorm_momentum=0.5, momentum=0.5
        ),
    ],
    ids=["bn", "brn"],
)
def test_fused_path_with_unknown_dimensions(make, shape, monkeypatch):
    """Traced with every dimension but the features unknown (variable
    batch size and sequence length), the fused kernel views the input from
    its runtime shape and equals the general path."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.5, size=shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    fast, general = make(), make()
    for layer in (fast, general):
        layer.build((None,) * (len(shape) - 1) + shape[-1:])
    fused_calls = []
    real_can_fuse = _backend.can_fuse

    def spy(*args, **kwargs):
        fused_calls.append(real_can_fuse(*args, **kwargs))
        return fused_calls[-1]

    monkeypatch.setattr(_backend, "can_fuse", spy)
    spec = tf.TensorSpec((None,) * (len(shape) - 1) + shape[-1:], "float32")

    @tf.function(input_signature=[spec])
    def traced(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fast(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return [y] + tape.gradient(loss, [x] + fast.trainable_variables)

    y1, dx1, *g1 = [o.numpy() for o in traced(tf.constant(x))]
    assert fused_calls == [True]
    monkeypatch.setattr(_backend, "can_fuse", lambda *a, **k: False)
    y2, dx2, g2 = train_call(general, x, dy)
    assert_close_to_reference(y1, y2, "outputs")
    assert_close_to_reference(dx1, dx2, "input gradient")
    for w, g in zip(fast.trainable_weights, g1):
        assert_close_to_reference(g, g2[w.name], w.name)
    for w1, w2 in zip(
        fast.non_trainable_weights, general.non_trainable_weights
    ):
        assert_close_to_reference(to_numpy(w1), to_numpy(w2), w1.name)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's kernels")
@pytest.mark.parametrize(
    "make",
    [
        lambda: keras_norms.BatchNormalization(momentum=0.5),
        lambda: keras_norms.BatchRenormalization(
            rmax=1.2, dmax=0.3, renorm_momentum=0.5, momentum=0.5
        ),
    ],
    ids=["bn", "brn"],
)
def test_xla_compiled_training_equals_eager_general_path(make, monkeypatch):
    """Under XLA (`jit_compile=True`) the layers take the general path on
    `(positions, features)`, never the fused kernel (XLA would rewrite it
    with a one-pass variance); compiled equals eager."""
    import tensorflow as tf

    shape = (8, 6, 6, 5)
    rng = np.random.default_rng(0)
    # |mean| >> std: a one-pass variance would be off by ~1e-3 here.
    x = rng.normal(100.0, 1.0, size=shape).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    fast, general = make(), make()
    for layer in (fast, general):
        layer.build(shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5))
        if isinstance(layer, keras_norms.BatchRenormalization):
            layer.renorm_mean.assign(np.full(5, 0.8))  # r and d clip
            layer.renorm_stddev.assign(np.full(5, 1.5))

    fused_calls = []
    real_can_fuse = _backend.can_fuse

    def spy(*args, **kwargs):
        fused_calls.append(real_can_fuse(*args, **kwargs))
        return fused_calls[-1]

    monkeypatch.setattr(_backend, "can_fuse", spy)

    @tf.function(jit_compile=True)
    def compiled(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fast(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return [y] + tape.gradient(loss, [x] + fast.trainable_variables)

    y1, dx1, *g1 = [o.numpy() for o in compiled(tf.constant(x))]
    assert fused_calls == [False]
    monkeypatch.setattr(_backend, "can_fuse", lambda *a, **k: False)
    y2, dx2, g2 = train_call(general, x, dy)
    # The statistics and outputs to 1e-5 (a one-pass variance would miss).
    assert_close_to_reference(y1, y2, "outputs")
    for w1, w2 in zip(
        fast.non_trainable_weights, general.non_trainable_weights
    ):
        assert_close_to_reference(to_numpy(w1), to_numpy(w2), w1.name)
    # Gradients sum terms of size |mean| / std = 100 that cancel: float32
    # in two summation orders agrees to ~1e-4 there.
    assert_close_to_reference(dx1, dx2, "input gradient", rtol=1e-3)
    for w, g in zip(fast.trainable_weights, g1):
        assert_close_to_reference(g, g2[w.name], w.name, rtol=1e-3)


def _cbn_windows(masked):
    """Two CBNs; over both cases, windows 2-4 and both gradient
    conventions (two layers a model: compiling takes a minute)."""
    windows = ((2, True), (4, False)) if masked else ((3, False), (4, True))
    return lambda: [
        keras_norms.CrossIterationBatchNormalization(
            keras.layers.Dense(units, use_bias=False),
            window_size=window,
            compensation_gradient=exact,
        )
        for units, (window, exact) in zip((4, 3), windows)
    ]


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's torch.compile")
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_cbn_fit_with_jit_compile_on_torch_equals_eager(masked):
    """`jit_compile=True` on PyTorch: CBNs (windows 2-4, both gradient
    conventions) train to the weights and window buffers of eager
    training. They drifted by 1e-3 in 4 steps: torch's partitioner
    re-read the window buffers in the compiled backward after the step had
    assigned them (`_backend.torch.snapshot`)."""
    x, y = _sequences()
    if not masked:
        x[:4, 4:] = 1.0  # nothing is masked
    trained = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = _masked_model(_cbn_windows(masked))
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=jit)
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
        trained.append([to_numpy(w) for w in model.weights])
    for eager, compiled in zip(*trained):
        assert_close(compiled, eager, "weights", rtol=1e-5, atol=1e-6)

"""WeightStandardization against the float64 reference of the paper's
equation, with Keras's own (unwrapped) layer as the reference for the
linear map: the wrapped layer must compute exactly the plain layer given
the standardized kernel, and the kernel gradient must be the plain layer's
kernel gradient taken through the standardization."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_norms
from tests import references
from tests.helpers import BACKEND
from tests.helpers import assert_close
from tests.helpers import assert_close_to_reference
from tests.helpers import assert_config_round_trip
from tests.helpers import assert_docstring_examples_pass
from tests.helpers import skip_unless_channels_first_conv_runs
from tests.helpers import to_numpy
from tests.helpers import train_call

EPS = 1e-5

# name: (wrapped layer, input shape, kernel axes standardized over)
CASES = {
    "dense": (lambda: layers.Dense(4), (6, 5), (0,)),
    "dense_seq_tanh": (
        lambda: layers.Dense(3, activation="tanh"),
        (2, 5, 4),
        (0,),
    ),
    "einsum": (
        lambda: layers.EinsumDense("ab,bc->ac", 4, bias_axes="c"),
        (6, 5),
        (0,),
    ),
    "einsum_heads": (
        lambda: layers.EinsumDense("abc,cde->abde", (None, 2, 3)),
        (2, 4, 5),
        (0,),
    ),
    "conv1d_causal_d2": (
        lambda: layers.Conv1D(3, 3, padding="causal", dilation_rate=2),
        (2, 9, 2),
        (0, 1),
    ),
    "conv2d_strided_groups": (
        lambda: layers.Conv2D(4, 3, strides=2, groups=2, activation="relu"),
        (2, 7, 7, 4),
        (0, 1, 2),
    ),
    "conv3d": (
        lambda: layers.Conv3D(3, 2, use_bias=False),
        (2, 4, 4, 4, 2),
        (0, 1, 2, 3),
    ),
    "conv1d_transpose": (
        lambda: layers.Conv1DTranspose(3, 3, strides=2),
        (2, 5, 2),
        (0, 2),
    ),
    "conv2d_transpose_padding": (
        lambda: layers.Conv2DTranspose(
            3, 3, strides=2, padding="same", output_padding=1
        ),
        (2, 4, 4, 2),
        (0, 1, 3),
    ),
    "conv3d_transpose": (
        lambda: layers.Conv3DTranspose(2, 2),
        (1, 3, 3, 3, 2),
        (0, 1, 2, 4),
    ),
    "depthwise1d": (
        lambda: layers.DepthwiseConv1D(3, depth_multiplier=2),
        (2, 8, 3),
        (0,),
    ),
    "depthwise2d_same": (
        lambda: layers.DepthwiseConv2D(3, padding="same"),
        (2, 5, 5, 3),
        (0, 1),
    ),
    "conv2d_channels_first": (
        lambda: layers.Conv2D(3, 3, data_format="channels_first"),
        (2, 2, 5, 5),
        (0, 1, 2),
    ),
}


def _randomized(layer, shape, seed):
    """`layer` built for `shape`, every weight drawn at random (a bias far
    from 0, kernels with a non-zero mean per channel)."""
    if not layer.built:
        layer.build(shape)
    rng = np.random.default_rng(seed)
    for w in layer.weights:
        w.assign(rng.normal(0.3, 1.0, w.shape).astype(w.dtype))
    return layer


def _plain_twin(wrapped, shape, kernel):
    """The wrapped layer unwrapped, with `kernel` in place of its own."""
    plain = type(wrapped).from_config(wrapped.get_config())
    plain.build(shape)
    for mine, theirs in zip(plain.weights, wrapped.weights):
        mine.assign(to_numpy(theirs))
    plain.kernel.assign(kernel.astype("float32"))
    return plain


@pytest.mark.parametrize("scaled", [False, True], ids=["ws", "scaled"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, scaled):
    make, shape, axes = CASES[case]
    if "channels_first" in case:
        skip_unless_channels_first_conv_runs()
    ws = keras_norms.WeightStandardization(make(), epsilon=EPS, scaled=scaled)
    ws.build(shape)
    _randomized(ws.layer, shape, seed=1)
    assert ws.reduction_axes == axes
    gain = None
    if scaled:
        gain = np.random.default_rng(2).uniform(0.5, 2.0, ws.gain.shape)
        ws.gain.assign(gain.astype("float32"))
        kernel_rank = len(ws.layer.kernel.shape)
        broadcast = [1] * kernel_rank
        for axis, size in zip(ws.output_axes, ws.gain.shape):
            broadcast[axis] = size
        gain = gain.reshape(broadcast)
    kernel = to_numpy(ws.layer.kernel)
    w_hat, backward = references.standardize_kernel(kernel, axes, EPS, gain)
    assert_close_to_reference(
        to_numpy(ws.standardized_kernel()), w_hat, "standardized kernel"
    )

    rng = np.random.default_rng(3)
    x = rng.normal(size=shape).astype("float32")
    plain = _plain_twin(ws.layer, shape, w_hat)
    dy = rng.normal(size=to_numpy(plain(x)).shape).astype("float32")
    y_ref, dx_ref, plain_grads = train_call(plain, x, dy)
    y, dx, grads = train_call(ws, x, dy)

    assert_close(y, y_ref, "output", rtol=1e-5, atol=1e-5)
    assert_close(dx, dx_ref, "input gradient", rtol=1e-5, atol=1e-5)
    dw_ref, dgain_ref = backward(plain_grads["kernel"])
    assert_close_to_reference(grads["kernel"], dw_ref, "kernel gradient", 1e-4)
    if "bias" in plain_grads:
        assert_close(grads["bias"], plain_grads["bias"], "bias gradient")
    if scaled:
        assert_close_to_reference(
            grads["gain"], dgain_ref.reshape(ws.gain.shape), "gain gradient"
        )
    # The kernel variable is only read.
    np.testing.assert_array_equal(to_numpy(ws.layer.kernel), kernel)


def test_the_kernel_gradient_goes_through_the_standardization():
    """The plain layer's kernel gradient (what a wrapper that skips the
    standardization in the backward pass would give) is far from the
    gradient through it: the reference test above can tell them apart."""
    ws = keras_norms.WeightStandardization(layers.Dense(4))
    ws.build((6, 5))
    _randomized(ws.layer, (6, 5), seed=1)
    kernel = to_numpy(ws.layer.kernel)
    w_hat, backward = references.standardize_kernel(kernel, (0,), 1e-5)
    x = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    dy = np.random.default_rng(1).normal(size=(6, 4)).astype("float32")
    _, _, grads = train_call(ws, x, dy)
    _, _, plain = train_call(_plain_twin(ws.layer, (6, 5), w_hat), x, dy)
    skipped = plain["kernel"]
    through, _ = backward(skipped)
    assert np.abs(skipped - through).max() > 0.1 * np.abs(through).max()
    assert_close_to_reference(grads["kernel"], through, "kernel gradient")
    # The gradient through the standardization is orthogonal to what it
    # removes: it sums to 0 over each output channel's fan-in.
    np.testing.assert_allclose(grads["kernel"].sum(axis=0), 0.0, atol=1e-5)


@pytest.mark.parametrize("scaled", [False, True], ids=["ws", "scaled"])
def test_constant_output_channel_stays_finite(scaled):
    conv = layers.Conv2D(3, 2)
    ws = keras_norms.WeightStandardization(conv, scaled=scaled)
    ws.build((2, 4, 4, 2))
    kernel = np.random.default_rng(0).normal(size=(2, 2, 2, 3))
    kernel[..., 1] = 0.7  # variance 0 in output channel 1
    conv.kernel.assign(kernel.astype("float32"))
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 2)).astype("float32")
    dy = np.ones((2, 3, 3, 3), "float32")
    y, dx, grads = train_call(ws, x, dy)
    for value in (y, dx, *grads.values()):
        assert np.isfinite(value).all()
    w_hat = to_numpy(ws.standardized_kernel())
    # 0 up to the rounding of the mean (1 ulp of 0.7, over sqrt(epsilon)).
    np.testing.assert_allclose(w_hat[..., 1], 0.0, atol=1e-4)
    # Channel 1 outputs its bias alone.
    np.testing.assert_allclose(y[..., 1], to_numpy(conv.bias)[1], atol=1e-3)


@pytest.mark.parametrize(
    "layer, message",
    [
        (layers.SeparableConv2D(2, 3), "layer=SeparableConv2D"),
        (layers.Embedding(5, 2), "layer=Embedding"),
        (layers.LayerNormalization(), "layer=LayerNormalization"),
        (
            layers.EinsumDense("ab,cd->ad", 3),
            "a kernel axis is in neither the inputs nor the output",
        ),
        (layers.EinsumDense("ab,b->a", ()), "both an axis in the output"),
        (layers.EinsumDense("...b,...bc->...c", 3), "ellipsis"),
    ],
    ids=[
        "separable",
        "embedding",
        "layernorm",
        "einsum_lost",
        "einsum_1d",
        "e",
    ],
)
def test_refuses_other_layers(layer, message):
    with pytest.raises(ValueError, match=message):
        keras_norms.WeightStandardization(layer)


def test_refuses_lora_and_bad_arguments():
    dense = layers.Dense(3)
    dense.build((None, 4))
    dense.enable_lora(2)
    with pytest.raises(ValueError, match="LoRA or quantization"):
        keras_norms.WeightStandardization(dense)
    with pytest.raises(ValueError, match="Layer 3 supplied to Wrapper"):
        keras_norms.WeightStandardization(3)
    for epsilon, error in ((0.0, ValueError), ("1e-5", TypeError)):
        with pytest.raises(error, match="epsilon"):
            keras_norms.WeightStandardization(layers.Dense(3), epsilon=epsilon)
    with pytest.raises(TypeError, match="scaled"):
        keras_norms.WeightStandardization(layers.Dense(3), scaled=1)
    # LoRA enabled after wrapping is refused at the next call.
    ws = keras_norms.WeightStandardization(layers.Dense(3))
    ws(np.ones((1, 4), "float32"))
    ws.layer.enable_lora(2)
    with pytest.raises(ValueError, match="LoRA or quantization"):
        ws(np.ones((1, 4), "float32"))


@pytest.mark.parametrize("scaled", [False, True], ids=["ws", "scaled"])
def test_config_and_keras_file_round_trip(tmp_path, scaled):
    ws = keras_norms.WeightStandardization(
        layers.Conv2D(4, 3, name="conv"), epsilon=1e-3, scaled=scaled
    )
    assert_config_round_trip(ws)
    model = keras.Sequential([keras.Input((6, 6, 2)), ws, layers.ReLU()])
    _randomized(ws.layer, (None, 6, 6, 2), seed=0)
    if scaled:
        ws.gain.assign(np.linspace(0.5, 2.0, 4).astype("float32"))
    path = tmp_path / "ws.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    revived = loaded.layers[0]
    assert type(revived) is keras_norms.WeightStandardization
    assert (revived.epsilon, revived.scaled) == (1e-3, scaled)
    assert [w.name for w in revived.weights] == [w.name for w in ws.weights]
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype("float32")
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_standardizes_in_float32(policy):
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype("float32")
    ws32 = keras_norms.WeightStandardization(layers.Conv2D(4, 3))
    expected = to_numpy(ws32(x))
    ws = keras_norms.WeightStandardization(
        layers.Conv2D(4, 3, dtype=policy), dtype=policy
    )
    ws.build(x.shape)
    for mine, theirs in zip(ws.weights, ws32.weights):
        mine.assign(to_numpy(theirs))
    assert ws.layer.kernel.dtype == "float32"
    kernel = ws.standardized_kernel()
    assert keras.backend.standardize_dtype(kernel.dtype) == "float32"
    assert_close(to_numpy(kernel), to_numpy(ws32.standardized_kernel()), "W")
    y = ws(x)
    half = policy.split("_")[1]
    assert keras.backend.standardize_dtype(y.dtype) == half
    # Rounded to `half` on the way in (inputs, kernel) and out: a few units
    # in the last place.
    tolerance = {"float16": 4e-3, "bfloat16": 3e-2}[half]
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(y, "float32")),
        expected,
        rtol=tolerance,
        atol=tolerance * np.abs(expected).max(),
    )


def _twin_models(activity_regularizer=None):
    """A WS model and the plain model with the standardized kernels."""
    ws = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras_norms.WeightStandardization(
                layers.Conv2D(4, 3, activity_regularizer=activity_regularizer)
            ),
            layers.GroupNormalization(2),
            layers.Flatten(),
            keras_norms.WeightStandardization(layers.Dense(3)),
        ]
    )
    plain = keras.Sequential(
        [keras.Input((6, 6, 2))]
        + [
            type(layer).from_config(layer.get_config())
            for layer in [
                ws.layers[0].layer,
                *ws.layers[1:3],
                ws.layers[3].layer,
            ]
        ]
    )
    for layer in (ws.layers[0].layer, ws.layers[3].layer):
        _randomized(layer, None, seed=len(layer.name))
    for mine, theirs in zip(plain.layers, ws.layers):
        values = [to_numpy(w) for w in theirs.weights]
        if isinstance(theirs, keras_norms.WeightStandardization):
            values[0] = to_numpy(theirs.standardized_kernel())
        mine.set_weights(values)
    return ws, plain


def test_activity_regularization_of_the_wrapped_layer_counts():
    ws, plain = _twin_models(activity_regularizer="l2")
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    y = np.zeros((4, 3), "float32")
    ws(x)
    plain(x)
    assert len(ws.losses) == len(plain.losses) == 1
    assert_close(to_numpy(ws.losses[0]), to_numpy(plain.losses[0]), "loss")
    for model in (ws, plain):
        model.compile("sgd", "mse")
    # `evaluate` runs the compiled step (`stateless_call` on JAX).
    assert_close(
        ws.evaluate(x, y, verbose=0), plain.evaluate(x, y, verbose=0), "loss"
    )


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "jit"])
def test_fit_matches_the_standardization_by_hand(jit_compile):
    """Training through the wrapper: after `fit`, the wrapper's kernel is
    what SGD on the reference gradients gives (one step, so the plain
    twin's kernel stays the standardized kernel of the start)."""
    ws, _ = _twin_models()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    y = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    before = [to_numpy(ws.layers[i].layer.kernel) for i in (0, 3)]
    ws.compile(
        keras.optimizers.SGD(0.1),
        "mse",
        jit_compile=jit_compile,
        run_eagerly=not jit_compile and BACKEND != "jax",
    )
    eager, _ = _twin_models()
    eager.set_weights(ws.get_weights())
    grads = _loss_gradients(eager, x, y)
    ws.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for index, kernel in zip((0, 3), before):
        after = to_numpy(ws.layers[index].layer.kernel)
        expected = kernel - 0.1 * grads[index]
        assert_close(after, expected, "kernel after a step", 1e-4, 1e-5)


def _loss_gradients(model, x, y):
    """Kernel gradients of the mean squared error, by `train_call` on each
    wrapped layer with the gradient flowing in from above (chain rule)."""
    upper = keras.Sequential(model.layers[1:3])
    h = to_numpy(model.layers[0](x))
    z = to_numpy(upper(h))
    out = to_numpy(model.layers[3](z))
    dout = 2.0 * (out - y) / y.size
    _, dz, top = train_call(model.layers[3], z, dout)
    _, dh, _ = train_call(upper, h, dz)
    _, _, bottom = train_call(model.layers[0], x, dh)
    return {0: bottom["kernel"], 3: top["kernel"]}


def test_mask_passes_through_as_for_the_wrapped_layer():
    inputs = keras.Input((5, 3))
    masked = layers.Masking(0.0)(inputs)
    dense = layers.Dense(4)
    outputs = layers.GRU(2)(keras_norms.WeightStandardization(dense)(masked))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32")
    x[0, 3:] = 0.0  # padding
    plain_inputs = keras.Input((5, 3))
    plain_dense = layers.Dense(4)
    plain_gru = layers.GRU(2)
    plain = keras.Model(
        plain_inputs,
        plain_gru(plain_dense(layers.Masking(0.0)(plain_inputs))),
    )
    plain_dense.set_weights(
        [to_numpy(model.layers[2].standardized_kernel()), to_numpy(dense.bias)]
    )
    plain_gru.set_weights(model.layers[3].get_weights())
    y = to_numpy(model(x))
    assert_close(y, to_numpy(plain(x)), "masked output")
    # Without the mask, the padded row would differ.
    unmasked = to_numpy(plain_gru(plain_dense(x)))
    assert np.abs(unmasked[0] - y[0]).max() > 1e-3


def test_docstring_example():
    assert_docstring_examples_pass(keras_norms.WeightStandardization)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_reads_the_float32_kernel_inside_the_call(policy):
    """A kernel far from 0 relative to its spread (50 + N(0, 0.01)) keeps
    its spread only in float32: float16 spaces values by 0.03 at 50. The
    standardization inside the call must read the float32 kernel, not the
    half-precision copy the wrapped layer computes with."""
    keras.config.set_dtype_policy(policy)
    dense = layers.Dense(4, use_bias=False)
    ws = keras_norms.WeightStandardization(dense)
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    ws.build(x.shape)
    kernel = 50.0 + 0.01 * np.random.default_rng(1).normal(size=(16, 4))
    dense.kernel.assign(kernel.astype("float32"))
    w_hat, _ = references.standardize_kernel(kernel, (0,), 1e-5)
    expected = x.astype(np.float64) @ w_hat
    y = to_numpy(keras.ops.cast(ws(x), "float32"))
    error = np.abs(y - expected).max() / np.abs(expected).max()
    assert error < {"mixed_float16": 2e-3, "mixed_bfloat16": 2e-2}[policy]

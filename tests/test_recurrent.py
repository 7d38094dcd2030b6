"""Vertical normalization in recurrent stacks: masks, padding, saving.

The normalization layers sit *between* stacked recurrent layers (on the
input-to-hidden path), never inside the recurrence.
"""

import keras
import numpy as np
import pytest

import keras_norms
from keras_norms.callbacks import RenormWarmup
from tests.helpers import assert_close
from tests.helpers import assert_close_to_reference
from tests.helpers import sgd_update
from tests.helpers import to_numpy
from tests.helpers import train_call

FEATURES = 6


def _norm(kind):
    if kind == "bn":
        return keras_norms.BatchNormalization(momentum=0.8)
    if kind == "brn":
        return keras_norms.BatchRenormalization(
            momentum=0.8, rmax=2.0, dmax=1.0, renorm_momentum=0.7
        )
    return keras_norms.CBN(
        keras.layers.Dense(FEATURES, use_bias=False),
        window_size=3,
        momentum=0.8,
    )


def _padded_batch(rng, batch=5, time=7):
    lengths = rng.integers(0, time + 1, size=batch)
    lengths[0], lengths[1] = 1, time  # a length-1 and a full sequence
    lengths[2] = 0  # a fully padded row
    mask = np.arange(time)[None, :] < lengths[:, None]
    x = rng.normal(1.0, 2.0, size=(batch, time, FEATURES)).astype("float32")
    x[~mask] = 0.0
    return x, mask


@pytest.mark.parametrize("kind", ["bn", "brn", "cbn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padding_changes_nothing(kind, seed):
    """Padded + masked equals the real positions alone, over 3 steps."""
    rng = np.random.default_rng(seed)
    padded, alone = _norm(kind), _norm(kind)
    padded.build((None, None, FEATURES))
    alone.build((None, None, FEATURES))
    alone.set_weights(padded.get_weights())
    for step in range(3):
        x, mask = _padded_batch(rng)
        dy = rng.normal(size=x.shape[:2] + (FEATURES,)).astype("float32")
        dy[~mask] = 0.0  # downstream layers ignore padded steps
        y1, dx1, g1 = train_call(padded, x, dy, mask)
        y2, dx2, g2 = train_call(alone, x[mask][None], dy[mask][None])
        what = f"{kind}, step {step}"
        assert_close(y1[mask], y2[0], f"outputs, {what}")
        assert_close_to_reference(dx1[mask], dx2[0], f"input grads, {what}")
        np.testing.assert_array_equal(dx1[~mask], 0.0)
        # Sums over the same positions in another order (padding
        # interleaved): compared to 1e-5 of each array's largest entry.
        for name in g1:
            assert_close_to_reference(g1[name], g2[name], f"{name}, {what}")
        for w1, w2 in zip(
            padded.non_trainable_weights, alone.non_trainable_weights
        ):
            assert_close_to_reference(
                to_numpy(w1), to_numpy(w2), f"{w1.name}, {what}"
            )
        for value in (y1, dx1, *g1.values()):
            assert np.all(np.isfinite(value))
        sgd_update(padded, g1)
        sgd_update(alone, g2)


@pytest.mark.parametrize("kind", ["bn", "brn", "cbn"])
def test_garbage_in_padding_stays_out_of_the_statistics(kind):
    rng = np.random.default_rng(0)
    layer = _norm(kind)
    x, mask = _padded_batch(rng)
    x[~mask] = np.nan
    y = to_numpy(layer(x, training=True, mask=mask))
    assert np.all(np.isfinite(y[mask]))
    for w in layer.non_trainable_weights:
        assert np.all(np.isfinite(to_numpy(w))), w.name


def _sequences(n=48, time=7, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, time + 1, size=n)
    x = rng.normal(size=(n, time, 3)).astype("float32")
    x[np.arange(time)[None, :] >= lengths[:, None]] = 0.0
    # The label depends on the real steps only.
    y = (x.sum(axis=(1, 2)) > 0).astype("int32")
    return x, y


def _stack(kind, config):
    """Masking -> RNN -> norm -> RNN -> norm -> RNN -> Dense."""
    rnn, bidirectional, api = config

    def recurrent(units, sequences=True):
        layer = rnn(units, return_sequences=sequences)
        return keras.layers.Bidirectional(layer) if bidirectional else layer

    width = FEATURES // 2 if bidirectional else FEATURES
    layers = [
        keras.layers.Masking(0.0),
        recurrent(width),
        _norm(kind),
        recurrent(width),
        _norm(kind),
        recurrent(4, sequences=False),
        keras.layers.Dense(2),
    ]
    if api == "sequential":
        return keras.Sequential([keras.Input((None, 3)), *layers])
    inputs = keras.Input((None, 3))
    h = inputs
    for layer in layers:
        h = layer(h)
    return keras.Model(inputs, h)


CONFIGS = {
    "lstm_seq": (keras.layers.LSTM, False, "sequential"),
    "gru_bidir_func": (keras.layers.GRU, True, "functional"),
    "simplernn_func": (keras.layers.SimpleRNN, False, "functional"),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", ["bn", "brn", "cbn"])
def test_stack_trains_saves_and_ignores_padding(kind, config, tmp_path):
    x, y = _sequences()
    model = _stack(kind, CONFIGS[config])
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = [RenormWarmup(rmax_steps=(2, 8), dmax_steps=(2, 6))]
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=callbacks if kind == "brn" else [],
    )
    assert np.all(np.isfinite(history.history["loss"]))
    model.save(tmp_path / "stack.keras")
    restored = keras.saving.load_model(tmp_path / "stack.keras")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6
    )
    # The mask flows through every norm: more padding changes nothing, and
    # each sequence alone (batch of 1, its own length) predicts the same.
    longer = np.concatenate([x, np.zeros((len(x), 4, 3), "float32")], 1)
    assert_close(to_numpy(restored(longer)), expected, "extra padding")
    lengths = (np.abs(x).sum(-1) > 0).sum(1)
    for i in range(4):
        alone = to_numpy(restored(x[i : i + 1, : lengths[i]]))
        assert_close(alone[0], expected[i], f"sequence {i} alone")

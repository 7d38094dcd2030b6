"""`.keras` round trips: a new process needs only `import keras_norms`."""

import ast

import keras
import numpy as np
import pytest

import keras_norms
from keras_norms.callbacks import RenormWarmup
from tests.helpers import run_python
from tests.helpers import to_numpy


def _sequential():
    return keras.Sequential(
        [
            keras.Input((6, 5)),
            keras.layers.Dense(8, use_bias=False),
            keras_norms.BatchRenormalization(rmax=2.0, dmax=1.0),
            keras.layers.ReLU(),
            keras_norms.CBN(
                keras.layers.Conv1D(8, 3, padding="same", use_bias=False),
                window_size=3,
            ),
            keras.layers.ReLU(),
            keras.layers.Dense(8, use_bias=False),
            keras_norms.BatchNormalization(axis=[1, 2]),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )


def _functional():
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 5, mask_zero=True)(tokens)
    h = keras.layers.LSTM(8, return_sequences=True)(h)
    h = keras_norms.BatchRenormalization(renorm_momentum=0.9)(h)
    h = keras_norms.CBN(keras.layers.Dense(8, use_bias=False))(h)
    h = keras.layers.LSTM(8)(h)
    h = keras_norms.BatchNormalization(momentum=0.9)(h)
    return keras.Model(tokens, keras.layers.Dense(3)(h))


def _data(kind, n=32):
    rng = np.random.default_rng(0)
    if kind == "functional":
        x = rng.integers(1, 20, size=(n, 6))
        lengths = rng.integers(1, 7, size=n)
        x[np.arange(6)[None, :] >= lengths[:, None]] = 0
    else:
        x = rng.normal(2.0, 3.0, size=(n, 6, 5)).astype("float32")
    y = rng.integers(0, 3, size=n)
    return x, y


def _compiled(kind):
    model = _sequential() if kind == "sequential" else _functional()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _warmup():
    return RenormWarmup(rmax_steps=(1, 6), dmax_steps=(2, 5))


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_loads_in_a_new_process_and_predicts_the_same(kind, tmp_path):
    x, y = _data(kind)
    model = _compiled(kind)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[_warmup()])
    path = tmp_path / "m.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", model.predict(x, verbose=0))
    out = run_python(
        "import keras, numpy as np\n"
        "import keras_norms\n"
        "m = keras.saving.load_model('m.keras')\n"
        "np.save('got.npy', m.predict(np.load('x.npy'), verbose=0))\n"
        "print(sorted(type(l).__name__ for l in m._flatten_layers()))\n",
        cwd=tmp_path,
    )
    loaded = set(ast.literal_eval(out.strip().splitlines()[-1]))
    assert {
        "BatchNormalization",
        "BatchRenormalization",
        "CrossIterationBatchNormalization",
    } <= loaded
    np.testing.assert_allclose(
        np.load(tmp_path / "got.npy"),
        np.load(tmp_path / "expected.npy"),
        rtol=1e-6,
        atol=1e-6,
    )


def test_without_the_import_loading_fails_clearly(tmp_path):
    model = _sequential()
    model.save(tmp_path / "m.keras")
    code = (
        "import keras\n"
        "try:\n"
        "    keras.saving.load_model('m.keras')\n"
        "except Exception as e:\n"
        "    print('refused:', type(e).__name__, e)\n"
    )
    assert "keras_norms>BatchRenormalization" in run_python(code, tmp_path)


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_resumed_training_ends_where_uninterrupted_training_does(
    kind, tmp_path
):
    x, y = _data(kind)
    straight = _compiled(kind)
    initial = straight.get_weights()
    straight.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[_warmup()],
    )
    first = _compiled(kind)
    first.set_weights(initial)
    first.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[_warmup()],
    )
    first.save(tmp_path / "half.keras")
    resumed = keras.saving.load_model(tmp_path / "half.keras")
    resumed.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[_warmup()],
    )
    names = [w.name for w in straight.weights]
    assert names == [w.name for w in resumed.weights]
    for name, a, b in zip(names, straight.weights, resumed.weights):
        np.testing.assert_allclose(
            to_numpy(b), to_numpy(a), rtol=1e-5, atol=1e-6, err_msg=name
        )
    # The warm-up state itself went through the file.
    brn = [
        layer
        for layer in resumed.layers
        if isinstance(layer, keras_norms.BatchRenormalization)
    ][0]
    assert int(to_numpy(brn.step)) == 8
    assert int(to_numpy(resumed.optimizer.iterations)) == 8

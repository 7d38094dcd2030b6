"""Online learning: batches of varying size, down to 1 (issue 31).

`fit()` on a Python generator and on a `keras.utils.PyDataset` whose
batches have sizes 1 to 8 (each epoch a new shuffled order), and on arrays
whose last batch has one sample (33 samples at batch 8), trains each layer
(keras_norms BN, BRN, CBN of a Dense, and Keras's own BN as the baseline)
with finite weights and moving statistics.

How often the train step is traced or compiled (counted as the Python
calls of `model.train_step`, which TensorFlow and JAX make only while
tracing; Keras 3.15, measured 2026-12-07):

- TensorFlow: twice per model, whatever the batch sizes, and the same for
  all four layers. `fit()` feeds the `tf.function`s of
  `model.train_function` (`multi_step_on_iterator`, traced once, and
  `one_step_on_data`, traced twice: `tf.function` traces a function that
  may create variables once more on its first call) from a `tf.data`
  iterator whose batch dimension is `None`, so a batch of a new size never
  retraces, with or without `reduce_retracing`. `train_on_batch` passes
  the batch itself: three traces (twice at the first shape, once more
  relaxed to a `None` batch dimension by `reduce_retracing=True`), one per
  new batch size without `reduce_retracing`. With `jit_compile=True` the
  trace count is the same, but XLA compiles one program per distinct
  shape when it first runs it (1 to 2.5 s each here, in the first epoch
  only); `tf.function` does not count those.
- JAX: one trace and XLA compilation per distinct batch shape (8 for sizes
  1 to 8, whatever the number of steps): Keras's trainer `jax.jit`s the
  train step, and `jax.jit` specializes on shapes. Nothing retraces per
  step; a stream of many distinct sizes pays one compilation per size.
- PyTorch, eager (Keras's default there): nothing is traced; the train
  step runs in Python at every step.
- PyTorch with `jit_compile=True` (`torch.compile` of the train step):
  dynamo traces the batch dimension of the outer `one_step_on_data` as a
  symbol after the second size (and compiles batch 1 apart, 0/1
  specialization), but compiles Keras's `train_step` frame, which breaks
  its graph at `loss.backward()`, once per distinct batch size ("size
  mismatch at index 0"), also under `torch.compile(dynamic=True)`; seen
  with Keras's BN and BN on sizes 1 to 8, where that frame reaches
  dynamo's `recompile_limit` (8) and runs eagerly from then on, and with
  CBN on 6 sizes (Keras's trainer, not the layer). 10 to 40 s per size on
  2 busy cores, so only BRN is tested there (below).
"""

import keras
import numpy as np
import pytest

import keras_norms
from tests.helpers import BACKEND
from tests.helpers import to_numpy

KINDS = ["keras_bn", "bn", "brn", "cbn"]
FEATURES = 8
UNITS = 16
CLASSES = 3
SIZES = list(range(1, 9))  # batch sizes of the streams
EPOCHS = 3


def make_model(kind):
    """`Input(8) -> Dense(16, no bias) -> norm -> ReLU -> Dense(3)`, Adam,
    sparse categorical crossentropy; CBN wraps the Dense."""
    dense = keras.layers.Dense(UNITS, use_bias=False)
    if kind == "keras_bn":
        layers = [dense, keras.layers.BatchNormalization()]
    elif kind == "bn":
        layers = [dense, keras_norms.BatchNormalization()]
    elif kind == "brn":
        layers = [dense, keras_norms.BatchRenormalization()]
    else:
        layers = [
            keras_norms.CrossIterationBatchNormalization(dense, window_size=8)
        ]
    model = keras.Sequential(
        [keras.Input((FEATURES,))]
        + layers
        + [keras.layers.ReLU(), keras.layers.Dense(CLASSES)]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def batch(size, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(size, FEATURES)).astype("float32")
    return x, rng.integers(0, CLASSES, size)


def schedule(seed=0):
    """`EPOCHS` shuffled orders of the sizes, one per epoch."""
    rng = np.random.default_rng(seed)
    return [[int(n) for n in rng.permutation(SIZES)] for _ in range(EPOCHS)]


def stream(sizes):
    """A Python generator of one batch of each size in `sizes`."""
    for step, size in enumerate(sizes):
        yield batch(size, step)


class Batches(keras.utils.PyDataset):
    """Batches of sizes 1 to 8, in a new shuffled order each epoch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.orders = schedule(seed=1)
        self.epoch = 0

    def __len__(self):
        return len(SIZES)

    def __getitem__(self, index):
        order = self.orders[self.epoch % len(self.orders)]
        return batch(order[index], 100 * self.epoch + index)

    def on_epoch_end(self):
        self.epoch += 1


class StepCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def count_traces(model):
    """Replaces `model.train_step` (before its first `fit`) by a wrapper
    that appends the batch shape each Python call sees, and returns that
    list. TensorFlow and JAX call `train_step` in Python only while tracing
    it (a `None` batch dimension: traced for any batch size); PyTorch
    without `jit_compile` calls it at every step."""
    calls = []
    real = model.train_step

    def counting(*args):
        data = args[-1]  # JAX: train_step(state, data)
        x = data[0] if isinstance(data, (tuple, list)) else data
        calls.append(tuple(x.shape))
        return real(*args)

    model.train_step = counting
    return calls


def assert_traced_at_most(calls, bound):
    assert len(calls) <= bound, (
        f"the train step was traced {len(calls)} times (at most {bound} "
        f"expected); the batch shapes seen: {calls}"
    )


def fit_all_streams(model):
    """Fits `model` on the generator, the PyDataset and arrays whose last
    batch has one sample; returns the number of steps run."""
    steps = StepCounter()
    orders = schedule()
    model.fit(
        stream([n for order in orders for n in order]),
        epochs=EPOCHS,
        steps_per_epoch=len(SIZES),
        shuffle=False,
        callbacks=[steps],
        verbose=0,
    )
    model.fit(Batches(), epochs=EPOCHS, callbacks=[steps], verbose=0)
    x, y = batch(33, 7)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[steps], verbose=0)
    return steps.steps


def normalization_layer(model):
    for layer in model.layers:
        if "normalization" in type(layer).__name__.lower():
            return layer
    raise AssertionError([type(layer).__name__ for layer in model.layers])


@pytest.mark.parametrize("kind", KINDS)
def test_fit_on_batches_of_varying_size_down_to_one(kind):
    """Every layer trains on streams of batch sizes 1 to 8 and on arrays
    whose last batch has one sample, to finite weights and statistics. The
    train step is traced at most twice on TensorFlow (never per batch size),
    once per distinct batch size on JAX (never per step), and not at all
    on PyTorch (eager: one Python call per step)."""
    model = make_model(kind)
    norm = normalization_layer(model)
    initial = {
        name: to_numpy(getattr(norm, name))
        for name in ("moving_mean", "moving_variance")
    }
    calls = count_traces(model)
    steps = fit_all_streams(model)
    assert steps == 2 * EPOCHS * len(SIZES) + 2 * 5  # 33 samples: 5 batches
    for w in model.weights:
        assert np.all(np.isfinite(to_numpy(w))), w.path
    for name, before in initial.items():
        after = to_numpy(getattr(norm, name))
        assert not np.allclose(after, before), name
    assert np.all(to_numpy(norm.moving_variance) >= 0)
    if BACKEND == "tensorflow":
        assert_traced_at_most(calls, 2)
        assert all(shape[0] is None for shape in calls), calls
    elif BACKEND == "jax":
        # One jit trace per distinct batch shape, not per step.
        assert_traced_at_most(calls, len(SIZES))
        assert sorted(shape[0] for shape in calls) == SIZES
    else:
        assert len(calls) == steps  # eager: no tracing


def tf_function_tracing_counts(model):
    """{name: tracing count} of the `tf.function`s behind
    `model.train_function`, found through the closures of the Python
    function Keras's TensorFlow trainer returns (Keras 3.15:
    `multi_step_on_iterator` and `one_step_on_data`, each a `tf.function`
    with `reduce_retracing=True`)."""
    found = {}
    seen = set()

    def visit(fn):
        if id(fn) in seen:
            return
        seen.add(id(fn))
        if hasattr(fn, "experimental_get_tracing_count"):
            found[fn.python_function.__name__] = (
                fn.experimental_get_tracing_count()
            )
            fn = fn.python_function
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value):
                visit(value)

    visit(model.train_function)
    return found


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's tf.function")
@pytest.mark.parametrize("kind", KINDS)
def test_tf_functions_are_traced_at_most_twice(kind):
    """The `tf.function`s' own tracing counts agree: after fits on 8 batch
    sizes (generator, PyDataset, arrays), `one_step_on_data` has been
    traced twice (`tf.function` traces a first call that may create
    variables twice) and `multi_step_on_iterator` once."""
    model = make_model(kind)
    fit_all_streams(model)
    counts = tf_function_tracing_counts(model)
    assert set(counts) == {"one_step_on_data", "multi_step_on_iterator"}
    assert counts["one_step_on_data"] <= 2, counts
    assert counts["multi_step_on_iterator"] <= 1, counts


class _NoReduceRetracing:
    """TensorFlow, but `tf.function` without `reduce_retracing`: a broken
    copy of what Keras's TensorFlow trainer uses."""

    def __init__(self, tf):
        self._tf = tf

    def __getattr__(self, name):
        return getattr(self._tf, name)

    def function(self, func=None, **kwargs):
        kwargs["reduce_retracing"] = False
        return self._tf.function(func, **kwargs)


def train_on_batches(model, sizes):
    calls = count_traces(model)
    for step, size in enumerate(sizes):
        model.train_on_batch(*batch(size, step))
    return calls


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's tf.function")
@pytest.mark.parametrize("kind", ["bn", "cbn"])
def test_train_on_batch_retraces_once_for_a_new_batch_size(kind):
    """`train_on_batch` passes each batch itself to the `tf.function`:
    with Keras's `reduce_retracing=True` a second batch size relaxes the
    batch dimension to `None` once (three traces for 8 sizes, two of them
    at the first call)."""
    calls = train_on_batches(make_model(kind), schedule()[0] * 2)
    assert_traced_at_most(calls, 3)
    assert calls[-1][0] is None


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's tf.function")
def test_the_trace_count_catches_retracing_per_batch_size(monkeypatch):
    """With `reduce_retracing` off (a broken copy of the trainer's `tf`),
    each new batch size traces the train step again, and the bound the
    tests above assert fails."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    monkeypatch.setattr(trainer, "tf", _NoReduceRetracing(tf))
    calls = train_on_batches(make_model("bn"), [3, 5, 1, 8, 5])
    assert [shape[0] for shape in calls] == [3, 3, 5, 1, 8]
    with pytest.raises(AssertionError, match="traced 5 times"):
        assert_traced_at_most(calls, 3)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's torch.compile")
def test_brn_fits_with_torch_compile_on_batches_of_varying_size():
    """`jit_compile=True` (`torch.compile`): a second batch size makes
    dynamo trace the batch dimension as a symbol, where BRN's "one value
    per feature" test is a symbolic bool (it failed there: `ops.logical_and`
    cannot take one); batch 1 is compiled apart. BRN trains through sizes
    3, 5 and 1 to finite weights. (BN and CBN do too: 99 s and 120 s for
    these sizes on 2 busy cores, too long to test here.)"""
    model = make_model("brn")
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
    model.fit(stream([3, 5, 1]), shuffle=False, verbose=0)
    for w in model.weights:
        assert np.all(np.isfinite(to_numpy(w))), w.path

"""Shared pieces of the digits examples: data, model, training loop."""

import time

import keras
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_norms


def load_data(seed):
    """scikit-learn's 8x8 digits (bundled), 75% train / 25% test."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def make_model(normalized):
    """A small CNN. `normalized(linear)` returns the layers that replace
    each bias-free linear layer, e.g. `[linear, BatchNormalization()]`."""

    def block(linear):
        return [*normalized(linear), keras.layers.ReLU()]

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            *block(keras.layers.Conv2D(16, 3, padding="same", use_bias=False)),
            *block(keras.layers.Conv2D(32, 3, padding="same", use_bias=False)),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            *block(keras.layers.Dense(64, use_bias=False)),
            keras.layers.Dense(10),
        ]
    )


def train(normalized, data, args, callbacks=()):
    """Trains, evaluates; returns (model, test accuracy, seconds, history)."""
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(args.seed)
    model = make_model(normalized)
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=list(callbacks),
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return model, accuracy, seconds, history


def steps_of(data, args):
    return args.epochs * -(-len(data[0]) // args.batch_size)


def scaled_warmup(steps):
    """RenormWarmup with the paper's shape scaled to a run of `steps`:
    rmax 1 -> 3 over [5%, 50%] of the steps, dmax 0 -> 5 over [5%, 30%]."""
    return keras_norms.callbacks.RenormWarmup(
        rmax=3.0,
        dmax=5.0,
        rmax_steps=(steps // 20, steps // 2),
        dmax_steps=(steps // 20, (3 * steps) // 10),
    )

"""`model.export()` of models with keras_norms layers, folded or not.

Each format's runtime (TensorFlow for a SavedModel, onnxruntime for ONNX,
LiteRT's interpreter for a `.tflite` file) must give the outputs of the
trained model's `predict` to 1e-5 relative, for the model as trained and
for it after `fold_normalization`. TensorFlow backend: SavedModel, ONNX (via
tf2onnx) and LiteRT; PyTorch backend: ONNX (via torch.onnx). The runtimes
come with the `export` extra, which the `test` extra includes.
"""

import os

import keras
import numpy as np
import pytest

import keras_norms
from keras_norms.utils import fold_normalization
from tests.helpers import BACKEND

FORMATS = {
    "tensorflow": ["tf_saved_model", "onnx", "litert"],
    "torch": ["onnx"],
}.get(BACKEND, [])
NORMS = (
    keras_norms.BatchNormalization,
    keras_norms.BatchRenormalization,
    keras_norms.CrossIterationBatchNormalization,
    keras_norms.WeightStandardization,
)


def _trained_model(kind, linear):
    """Input -> linear -> normalization -> ReLU -> Dense, trained a few
    steps so that every statistic is away from its initial value. CBN's
    Conv2D has a bias (which its training leaves as it is); "ws" is a
    weight-standardized linear layer (a scaled Dense) before BN."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if linear == "dense":
        shape = (5,)
        layer = keras.layers.Dense(4, use_bias=False)
    else:
        shape = (6, 6, 3)
        layer = keras.layers.Conv2D(4, 3, use_bias=kind == "cbn")
    inputs = keras.Input(shape)
    if kind == "cbn":
        h = keras_norms.CBN(layer, window_size=2)(inputs)
    elif kind == "ws":
        ws = keras_norms.WeightStandardization(layer, scaled=linear == "dense")
        h = keras_norms.BatchNormalization(momentum=0.5)(ws(inputs))
    elif kind == "brn":
        h = keras_norms.BatchRenormalization(momentum=0.5)(layer(inputs))
    else:
        h = keras_norms.BatchNormalization(momentum=0.5)(layer(inputs))
    h = keras.layers.ReLU()(h)
    if linear != "dense":
        h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    if layer.use_bias:
        layer.bias.assign(rng.normal(size=4).astype("float32"))
    model.compile("adam", "mse")
    x = rng.normal(1.0, 2.0, size=(24,) + shape).astype("float32")
    y = rng.normal(size=(24, 2)).astype("float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    return model, x


def _run_export(path, fmt, x):
    if fmt == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        return loaded.serve(x).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path)
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    given = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(given["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.skipif(not FORMATS, reason=f"no export tested on {BACKEND}")
@pytest.mark.parametrize("fmt", FORMATS or ["none"])
@pytest.mark.parametrize("folded", [False, True], ids=["as_trained", "folded"])
@pytest.mark.parametrize("linear", ["dense", "conv2d"])
@pytest.mark.parametrize("kind", ["bn", "brn", "cbn", "ws"])
def test_exported_model_predicts_like_the_model(
    kind, linear, folded, fmt, tmp_path
):
    model, x = _trained_model(kind, linear)
    expected = model.predict(x, verbose=0)
    if folded:  # the folded model must export the original's predictions
        model = fold_normalization(model)
        assert not any(isinstance(layer, NORMS) for layer in model.layers)
        # Keras's ONNX export refuses a model that was never called (as
        # one just folded, or just loaded, is): predict once first.
        model.predict(x[:1], verbose=0)
    suffix = {"tf_saved_model": "", "onnx": ".onnx", "litert": ".tflite"}
    path = os.path.join(tmp_path, f"model{suffix[fmt]}")
    model.export(path, format=fmt, verbose=False)
    actual = _run_export(path, fmt, x)
    error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert actual.shape == expected.shape
    assert error <= 1e-5, error

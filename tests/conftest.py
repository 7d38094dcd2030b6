import keras
import pytest


@pytest.fixture(autouse=True)
def _reset_keras():
    """Fresh global state (names, policy, seeds) for each test. Python's
    own collector frees memory as it goes: a full `gc.collect()` before
    every test would cost more than the tests that need it."""
    keras.utils.clear_session(free_memory=False)
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


_KERNEL_PATHS = (
    ["fused", "general"]
    if keras.backend.backend() == "tensorflow"
    else ["general"]
)


@pytest.fixture(params=_KERNEL_PATHS)
def kernel_path(request, monkeypatch):
    """Runs a test on each training path that unmasked inputs with the
    features last can take: on TensorFlow the fused kernel (whatever the
    input's size) and the general path; elsewhere only the general path
    exists. Tests use small inputs, which TensorFlow otherwise trains on the
    general path (`_backend.tensorflow.FUSE_ABOVE_SIZE`)."""
    from keras_norms._backend import tensorflow as tensorflow_backend

    size = 0 if request.param == "fused" else float("inf")
    monkeypatch.setattr(tensorflow_backend, "FUSE_ABOVE_SIZE", size)
    return request.param

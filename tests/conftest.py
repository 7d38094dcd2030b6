import keras
import pytest


@pytest.fixture(autouse=True)
def _reset_keras():
    """Fresh global state (names, policy, seeds) for each test."""
    keras.utils.clear_session()
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")

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

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


# The backends with a batch-norm kernel of their own (`_backend.can_fuse`).
_KERNEL_PATHS = (
    ["fused", "general"]
    if keras.backend.backend() in ("tensorflow", "torch")
    else ["general"]
)
_FUSED = ("fused_batch_norm", "fused_renormalization", "fused_normalization")


@pytest.fixture(params=_KERNEL_PATHS)
def kernel_path(request, monkeypatch):
    """Runs a test on each training path that unmasked inputs with the
    features last can take, and checks that it took it: "fused" (on
    TensorFlow and PyTorch: the backend's kernel, whatever the input's
    size) calls one of `_backend`'s fused functions, "general" none. Tests
    use small inputs, which TensorFlow otherwise trains on the general path
    (`_backend.tensorflow.FUSE_ABOVE_SIZE`). Masked inputs always take the
    general path: a test's "fused" case with a true `masked` parameter is
    not collected (`pytest_collection_modifyitems`)."""
    from keras_norms import _backend
    from keras_norms._backend import tensorflow as tensorflow_backend

    if request.param == "fused":
        monkeypatch.setattr(tensorflow_backend, "FUSE_ABOVE_SIZE", 0)
    else:
        monkeypatch.setattr(_backend, "can_fuse", lambda *a, **k: False)
    calls = []
    for name in _FUSED:

        def spy(*args, _real=getattr(_backend, name), **kwargs):
            calls.append(_real)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_backend, name, spy)
    yield request.param
    fused = bool(calls)
    assert fused == (request.param == "fused"), (
        f"the {request.param} case called the fused functions "
        f"{len(calls)} times"
    )


def pytest_collection_modifyitems(config, items):
    """Drops the "fused" cases that cannot fuse (masked inputs): they
    would run the general case again under the name "fused"."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("kernel_path") == "fused" and params.get("masked"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

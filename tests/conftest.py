import configparser
import os
import re

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    general path, and one value per channel does on PyTorch: such "fused"
    cases are not collected (`pytest_collection_modifyitems`)."""
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


def _cannot_fuse(item, params):
    """Masked inputs never take a fused kernel; one value per channel
    (marked `one_value_per_channel`) does not on PyTorch, whose kernel
    refuses it in training."""
    if params.get("masked"):
        return True
    return keras.backend.backend() == "torch" and bool(
        item.get_closest_marker("one_value_per_channel")
    )


def pytest_collection_modifyitems(config, items):
    """Drops the "fused" cases that cannot fuse (`_cannot_fuse`): they
    would run the general case again under the name "fused"."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("kernel_path") == "fused" and _cannot_fuse(item, params):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# CI sets KERAS_NORMS_NO_SKIP=1 (.ci/run): there, a skip for a missing
# package of the `test` extra, or of the multi-worker tests (no private
# network namespace), fails the test: CI installs the extra and runs on a
# machine where `unshare -rnu` works, so such a skip means a broken setup,
# not a backend without the feature. Other skips (tests for another
# backend) stay skips.
NO_SKIP = os.environ.get("KERAS_NORMS_NO_SKIP") == "1"
_IMPORT_NAMES = {"tensorflow-cpu": "tensorflow", "scikit-learn": "sklearn"}


def _test_extra_modules():
    """The top-level modules of setup.cfg's `test` extra."""
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    names = set()
    for line in config["options.extras_require"]["test"].split():
        name = re.split(r"[<>=!~;\[ ]", line.strip())[0].lower()
        names.add(_IMPORT_NAMES.get(name, name.replace("-", "_")))
    return names


def must_not_skip(reason):
    """Whether a skip with this `reason` is one CI must not see (see
    NO_SKIP): `pytest.importorskip` of a `test` extra package, or the
    multi-worker tests without a private network namespace."""
    missing = re.search(r"could not import '([\w.]+)'", reason)
    if missing:
        return missing.group(1).split(".")[0] in _test_extra_modules()
    return "private network namespace" in reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (NO_SKIP and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = (
        report.longrepr[2]
        if isinstance(report.longrepr, tuple)
        else str(report.longrepr)
    )
    if must_not_skip(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"KERAS_NORMS_NO_SKIP=1: this skip means a broken test setup "
            f"in CI: {reason}"
        )

"""Keras's own BatchNormalization tests, run against keras_norms's.

The installed Keras ships its test module for the layer. Every test in it
that does not ask for `renorm=True` (which keras_norms.BatchNormalization
refuses, pointing to BatchRenormalization) must pass with
`keras_norms.BatchNormalization` in place of Keras's: arguments, weights,
masks (Keras's convention), mixed precision, training and inference.
"""

import os
import re
import subprocess
import sys

import keras
import pytest

from tests.helpers import BACKEND
from tests.helpers import ROOT

KERAS_TESTS = os.path.join(
    os.path.dirname(keras.src.__file__),
    "layers",
    "normalization",
    "batch_normalization_test.py",
)
# Tests that build `BatchNormalization(renorm=True)`.
RENORM = "renorm or test_serialization"


@pytest.mark.skipif(
    not os.path.exists(KERAS_TESTS),
    reason="this Keras install has no test modules",
)
def test_keras_batch_normalization_tests_pass(tmp_path):
    with open(KERAS_TESTS) as f:
        source = f.read()
    renorm_tests = set(re.findall(r"def (test_\w*renorm\w*)", source))
    source = re.sub(
        r"\blayers\.BatchNormalization\b",
        "keras_norms.BatchNormalization",
        source,
    )
    source = "import keras_norms\n" + source
    path = tmp_path / "test_keras_batch_normalization.py"
    path.write_text(source)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-k",
            f"not ({RENORM})",
            str(path),
        ],
        cwd=tmp_path,
        env=dict(os.environ, KERAS_BACKEND=BACKEND, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary)[1])
    deselected = int(re.search(r"(\d+) deselected", summary)[1])
    # Only the renorm tests (and the renorm config round trip) are left out.
    assert deselected == len(renorm_tests) + 1, summary
    assert passed >= 20, summary

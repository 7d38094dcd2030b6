"""README's snippets run as written.

Every ```python block that follows a `<!-- readme-test: BACKEND -->` line
runs in a new process with `KERAS_BACKEND=BACKEND` (in a temporary working
directory) when the suite runs on that backend, and must succeed.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import BACKEND
from tests.helpers import ROOT

MARKED_BLOCK = re.compile(
    r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", re.DOTALL
)


def snippets():
    """`(backend, code, line)` of every marked block."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return [
        (match[1], match[2], text[: match.start()].count("\n") + 1)
        for match in MARKED_BLOCK.finditer(text)
    ]


def test_readme_has_tested_snippets():
    backends = {backend for backend, _, _ in snippets()}
    assert {"tensorflow", "jax"} <= backends


@pytest.mark.parametrize(
    "backend,code",
    [
        pytest.param(backend, code, id=f"line{line}")
        for backend, code, line in snippets()
        if backend == BACKEND  # each snippet runs in its backend's suite
    ],
)
def test_readme_snippet_runs(backend, code, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=dict(os.environ, KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]

"""README's snippets run as written.

Every ```python block that follows a `<!-- readme-test: BACKEND -->` line
runs in a new process with `KERAS_BACKEND=BACKEND` (in a temporary working
directory), and must succeed.
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
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    out = []
    for match in MARKED_BLOCK.finditer(text):
        line = text[: match.start()].count("\n") + 1
        out.append(pytest.param(match[1], match[2], id=f"line{line}"))
    return out


def test_readme_has_tested_snippets():
    backends = [s.values[0] for s in snippets()]
    assert "tensorflow" in backends and "jax" in backends


@pytest.mark.parametrize("backend,code", snippets())
def test_readme_snippet_runs(backend, code, tmp_path):
    if backend != BACKEND:
        pytest.skip(f"a {backend} snippet; this run is {BACKEND}")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=dict(os.environ, KERAS_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]

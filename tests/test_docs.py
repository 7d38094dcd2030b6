"""The README's and the documentation's code runs exactly as copied.

Every ```python block of README.md and of the pages under docs/ runs, as a
reader would run it: each block in a new Python process, the blocks of one
page in the order they appear and in one temporary working directory (so a
block may load what an earlier block of its page saved), with nothing added
before or after it. A block runs with `KERAS_BACKEND=tensorflow` unless the
line before its fence says otherwise, e.g. `<!-- test: jax -->`; each block
runs in the suite of its backend. Code that is not meant to run is not
fenced as python (`bash`, `text`).

The relative links of README.md lead to files of the repository (the docs
build checks its own pages' links in strict mode).
"""

import doctest
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import BACKEND
from tests.helpers import ROOT

FENCE = re.compile(
    r"(?:<!-- test: (?P<backend>\w+) -->\n)?^```python\n(?P<code>.*?)^```",
    re.DOTALL | re.MULTILINE,
)
BACKENDS = ("tensorflow", "jax", "torch")


def pages():
    """README.md and every Markdown page under docs/, relative to ROOT."""
    found = ["README.md"]
    for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
        found += [
            os.path.relpath(os.path.join(folder, name), ROOT)
            for name in sorted(files)
            if name.endswith(".md")
        ]
    return sorted(found)


def blocks(page):
    """`(backend, code, line)` of every python block of `page`."""
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    return [
        (
            match["backend"] or "tensorflow",
            match["code"],
            text[: match.start("code")].count("\n"),
        )
        for match in FENCE.finditer(text)
    ]


def test_every_block_names_a_known_backend():
    unknown = [
        (page, line, backend)
        for page in pages()
        for backend, _, line in blocks(page)
        if backend not in BACKENDS
    ]
    assert not unknown


def test_pages_have_code_on_each_backend():
    found = {backend for page in pages() for backend, _, _ in blocks(page)}
    assert found == set(BACKENDS)


@pytest.mark.parametrize(
    "page",
    [
        page
        for page in pages()
        if any(backend == BACKEND for backend, _, _ in blocks(page))
    ],
)
def test_code_blocks_run_as_copied(page, tmp_path):
    for backend, code, line in blocks(page):
        if backend != BACKEND:
            continue
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=dict(os.environ, KERAS_BACKEND=backend),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (
            f"{page}, the block at line {line}:\n{result.stderr[-4000:]}"
        )


LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)")


def test_readme_links_lead_to_files():
    with open(os.path.join(ROOT, "README.md")) as f:
        targets = LINK.findall(f.read())
    assert targets
    missing = [t for t in targets if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing


def public_names():
    """`(qualified name, object)` of every public name of the package."""
    import keras_norms

    found = []
    for module in (keras_norms, keras_norms.callbacks, keras_norms.utils):
        for name in module.__all__:
            obj = getattr(module, name)
            seen = any(obj is other for _, other in found)
            if callable(obj) and not seen:  # CBN is an alias
                found.append((f"{module.__name__}.{name}", obj))
    return found


@pytest.mark.parametrize(
    "name,obj", public_names(), ids=[name for name, _ in public_names()]
)
def test_docstring_examples_run(name, obj, tmp_path, monkeypatch):
    """The API reference's examples (its `>>>` lines) run and print what
    they show."""
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(obj, name, globs={}) if t.examples]
    assert tests, f"{name} has no example"
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0

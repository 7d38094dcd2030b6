"""Sphinx configuration of keras_norms's documentation site.

Build it with `python -m sphinx -W --keep-going -n -b html docs site`
(`-W`: any warning fails the build, so broken links between pages and
references that do not resolve are errors; `-n`: every reference checked).
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras_norms  # noqa: E402

project = "keras_norms"
author = "The keras_norms authors"
copyright = "2026, The keras_norms authors"
release = keras_norms.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "*.json"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Docstrings are Keras's Google style, with `name` for code.
default_role = "code"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [
    ("Call arguments", "params_style"),
    ("Reference", "notes_style"),
    ("References", "notes_style"),
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"

# Names of other libraries in signatures: no inventory is fetched (the
# build runs offline), so they are not links; everything of ours must be.
nitpick_ignore_regex = [
    ("py:.*", r"(keras|tf|tensorflow|torch|jax|numpy|np)\..*"),
    ("py:.*", r"(optional|callable|int|float|bool|str|dict|list|tuple)"),
]

html_theme = "furo"
html_title = f"keras_norms {release}"
html_static_path = []

#!/usr/bin/env bash
# The release as it would be published: builds the sdist and the wheel,
# `twine check`s them, checks what the sdist carries, then installs the
# wheel with its core dependencies and the TensorFlow extra (no test extras)
# into a fresh virtualenv and runs .ci/wheel_smoke.py there from a directory
# outside the repository. Run by .ci/run; about 2-3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 ||
  { cat "$work/build.log"; exit 1; }
"$PY" -m twine check --strict "$work"/dist/*
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)

# The wheel's version, from its file name (name-version-py3-none-any.whl).
version=$(basename "$wheel" | cut -d- -f2)
source_version=$("$PY" -c \
  'import ast, sys
tree = ast.parse(open("keras_norms/__init__.py").read())
print(next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
           and n.targets[0].id == "__version__"))')
changelog_version=$(grep -m1 -oP '^## \[\K[0-9][^]]*' CHANGELOG.md)
if [[ $version != "$source_version" || $version != "$changelog_version" ]]; then
  echo "versions differ: wheel $version, keras_norms.__version__" \
    "$source_version, CHANGELOG.md's latest release $changelog_version" >&2
  exit 1
fi

# What the sdist carries: the documents, and none of the repository's
# tests, benchmarks, CI or build leftovers.
listing=$(tar -tzf "$sdist" | cut -d/ -f2-)
for required in LICENSE README.md CHANGELOG.md pyproject.toml setup.cfg \
  keras_norms/__init__.py; do
  grep -qxF "$required" <<<"$listing" ||
    { echo "sdist lacks $required" >&2; exit 1; }
done
if unwanted=$(grep -E '^(tests|benchmarks|\.ci|build|dist)/|__pycache__|\.pyc$|\.keras$' \
  <<<"$listing"); then
  echo "sdist carries files it should not:" >&2
  echo "$unwanted" >&2
  exit 1
fi
# Not `grep -q`: it exits at the first match, and under pipefail the
# SIGPIPE that `unzip` may then get fails the check.
unzip -l "$wheel" | grep 'dist-info/.*LICENSE' >/dev/null ||
  { echo "wheel lacks LICENSE" >&2; exit 1; }

echo "release check: sdist and wheel $version built and checked" \
  "(${SECONDS}s)"
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --no-compile "$wheel[tensorflow]" >"$work/pip.log" 2>&1 ||
  { cat "$work/pip.log"; exit 1; }
echo "release check: wheel installed in a fresh venv (${SECONDS}s)"
mkdir "$work/outside"
cp .ci/wheel_smoke.py "$work/outside/"
(cd "$work/outside" && TF_CPP_MIN_LOG_LEVEL=3 "$work/venv/bin/python" \
  wheel_smoke.py "$version" "$work/outside")
echo "release check: the installed wheel imports, fits, saves and loads" \
  "(${SECONDS}s)"

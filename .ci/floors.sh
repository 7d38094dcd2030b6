#!/usr/bin/env bash
# The oldest versions setup.cfg declares: keras (install_requires),
# tensorflow-cpu (the `tensorflow` extra) and jax (the `jax` extra), read
# from setup.cfg, installed exactly into a fresh virtualenv with the package
# and pytest; then the layer, callback, serialization and utils tests (the
# utils read Keras's private graph and data-adapter modules) on TensorFlow,
# and the layer and serialization tests on JAX.
# Run by .ci/run. PyTorch's floor (the `torch` extra, torch>=2.13) is the
# version the backend tests in .ci/run install: torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The floors venv has only what these tests need, not the whole `test`
# extra: its skips (TensorBoard, the export converters) are expected here.
unset KERAS_NORMS_NO_SKIP

floor() { # floor NAME: the X of "NAME>=X" in setup.cfg, which must be there
  local version
  version=$(grep -m1 -oP "^\s+$1>=\K[0-9][0-9.]*" setup.cfg) ||
    { echo "setup.cfg declares no $1>= floor" >&2; exit 1; }
  echo "$version"
}
keras=$(floor keras)
tensorflow=$(floor tensorflow-cpu)
jax=$(floor jax)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --no-compile ".[tensorflow,jax]" \
  "keras==$keras" "tensorflow-cpu==$tensorflow" "jax==$jax" \
  pytest pytest-xdist scikit-learn >"$work/pip.log" 2>&1 ||
  { cat "$work/pip.log"; exit 1; }
"$work/venv/bin/python" -m pip list 2>/dev/null |
  grep -iE '^(keras|tensorflow-cpu|jax|jaxlib|numpy) '
echo "floors: installed (${SECONDS}s)"

echo "== floors, KERAS_BACKEND=tensorflow"
# Deselected: the conversion of whole Keras applications and the training
# of a converted ResNet (minutes; the smaller graphs of the same test module
# cover the rewrite, the fold and the round trip on the floor).
KERAS_BACKEND=tensorflow "$work/venv/bin/python" -m pytest -q \
  -p no:cacheprovider tests/layers tests/callbacks tests/test_serialization.py \
  tests/utils \
  --deselect tests/utils/test_convert_normalization.py::test_converts_keras_applications \
  --deselect tests/utils/test_convert_normalization.py::test_converted_resnet_trains_saves_and_folds
echo "floors: TensorFlow tests done (${SECONDS}s)"
echo "== floors, KERAS_BACKEND=jax"
# Deselected: CBN's float64 central-difference test enters float64 with
# jax.enable_x64, which JAX has only from 0.8 on (a test helper; the layer's
# own code runs on the floor).
KERAS_BACKEND=jax "$work/venv/bin/python" -m pytest -q \
  -p no:cacheprovider tests/layers tests/test_serialization.py \
  -k "not test_kernel_gradient_is_the_derivative_of_the_loss"
echo "floors: JAX tests done (${SECONDS}s)"

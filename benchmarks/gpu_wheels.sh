#!/usr/bin/env bash
# Downloads, here, the wheels that benchmarks/gpu_check.sh installs offline
# on a lent GPU machine (docs/benchmarks.md, "On a lent GPU"): Keras and
# what it and the tests need beyond the machine's image (PyTorch and JAX with
# CUDA, Python 3.12, x86-64, no network). The image already holds most of
# them (absl-py, h5py, ml-dtypes, rich, pytest, pytest-xdist); they travel
# too, as fallbacks that pip uses only where the image lacks one. numpy is
# left out: JAX and PyTorch bring it.
#
#     bash benchmarks/gpu_wheels.sh              # into gpu_wheels/ (ignored)
#     GPU_WHEELS_PYTHON=3.11 bash benchmarks/gpu_wheels.sh /tmp/w311
#
# Then check that what travels fits the device tool's 64 MiB (the working
# tree plus the carried folder): this script prints both sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-gpu_wheels}
PYTHON_VERSION=${GPU_WHEELS_PYTHON:-3.12}
# The top-level requirements gpu_check.sh installs (pinned Keras: the
# version of the CPU figures; the others only where the image lacks them).
REQUIREMENTS=(keras==3.15.1 pytest pytest-xdist)

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 \
  manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp "${platforms[@]}" \
  -d "$DEST" "${REQUIREMENTS[@]}"
# setuptools: the build backend of keras_norms's editable install there.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
  setuptools
rm -f "$DEST"/numpy-*.whl
printf '%s\n' "${REQUIREMENTS[@]}" >"$DEST/requirements.txt"
ls "$DEST"

limit=$((64 * 1024 * 1024))
wheels=$(du -sb "$DEST" | cut -f1)
# What travels besides: tracked and untracked-not-ignored files.
tree=$({ git ls-files -z --cached --others --exclude-standard 2>/dev/null ||
  true; } | xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}')
echo "wheels: $((wheels / 1024)) KiB; working tree: $((tree / 1024)) KiB;" \
  "together $(((wheels + tree) / 1024)) KiB of $((limit / 1024)) KiB"
if ((wheels + tree > limit)); then
  echo "too large to travel with the device tool (64 MiB)" >&2
  exit 1
fi

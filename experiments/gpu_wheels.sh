#!/usr/bin/env bash
# Unpacks what the GPU machine lacks into .gpu_site/, for experiments/gpu_check.py.
#
# The GPU machine (Python 3.12, JAX with the CUDA plugin, flax, optax, orbax, chex, tensorstore,
# tokenizers, scipy, pytest) cannot reach a package registry, and zojax is not installed there.
# Run this beforehand on a machine that can reach PyPI, then copy .gpu_site/ (about 1 MB) along
# with the repository; gpu_check.py puts it on the path after the machine's own packages.
#   gguf            the model registry imports the SmolLM2 GGUF loader (only pyyaml and numpy
#                   at import time; both come with flax)
#   ml_collections  configs/ (not needed by gpu_check itself; for running configs there)
# rdata (zojax.data.corpus, for the text corpora) is left out: it pulls pandas and xarray,
# tens of MB, and nothing gpu_check measures imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TARGET=${TARGET:-.gpu_site}
rm -rf "$TARGET"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
  --target "$TARGET" gguf==0.19.0 ml_collections==1.1.0
du -sh "$TARGET"

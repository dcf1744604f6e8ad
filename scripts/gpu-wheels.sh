#!/usr/bin/env bash
# Wheels the lent GPU machine lacks beside its own image (which has torch, transformers,
# huggingface-hub, torchmetrics, numpy, Pillow and the rest diffusers imports): diffusers and
# cache-dit at the versions the CPU results were measured with, Python 3.12, x86_64, into the
# git-ignored wheels/ for `run --carry wheels`. About 7 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
for p in diffusers==0.42.1 cache-dit==1.5.3 importlib_metadata; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels "$p"
done
du -sh wheels

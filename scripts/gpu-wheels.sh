#!/usr/bin/env bash
# Wheels the GPU machine needs beside its own torch, for `run --carry wheels` (≤ 64 MiB):
# diffusers, cache-dit and what they import, torchmetrics for the harness. Python 3.12, x86_64.
# Pinned to the versions the CPU results were measured with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
pkgs=(
  diffusers==0.42.1 huggingface-hub==2.4.0 hf-xet httpx2 httpcore2 h11 anyio idna certifi click tqdm
  pyyaml packaging filelock fsspec typing-extensions importlib_metadata zipp regex requests
  charset_normalizer urllib3 safetensors==0.8.0 pillow numpy
  cache-dit==1.5.3 transformers==5.24.0 tokenizers
  torchmetrics==1.9.0 lightning-utilities
)
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels "$p"
done
du -sh wheels

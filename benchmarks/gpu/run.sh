#!/usr/bin/env bash
# On the GPU machine, with wheels/ carried (bash scripts/gpu-wheels.sh here first): install the
# wheels beside the machine's torch, then time each given architecture at full size, bf16, eager
# and compiled. Results go to $OUT (the device tool brings them back) or benchmarks/results/gpu/.
# Usage: bash benchmarks/gpu/run.sh flux dit sd3 pixart unet wan
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q --no-index --find-links wheels diffusers cache-dit torchmetrics
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for arch in "$@"; do
  PYTHONPATH=src python benchmarks/gpu/perf.py --arch "$arch" --size full --steps 10 --repeats 5 \
    --compile --out "$out/perf-$arch-full.json"
done

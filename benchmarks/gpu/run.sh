#!/usr/bin/env bash
# On the lent GPU machine, with wheels/ carried (bash scripts/gpu-wheels.sh here first): put the
# wheels beside the machine's own torch, then time each architecture at full size in bf16.
# Each argument is ARCH[:SECONDS[:EXTRA perf.py FLAGS]]; an architecture that outruns its seconds
# is stopped and the next one starts (its eager rows are already written if only compiling was cut).
# Results go to $OUT (the device tool brings them back) or benchmarks/results/gpu/.
# Usage: bash benchmarks/gpu/run.sh flux:210:--repeats=3 pixart:90 dit:60:--compile sd3 wan unet
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu}
size=${SIZE:-full}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers, cache_dit; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cache-dit', cache_dit.__version__)"
for spec in "$@"; do
  IFS=: read -r arch seconds extra <<<"$spec"
  echo "== $arch (${seconds:-600} s) $(date -u +%T)"
  # shellcheck disable=SC2086  # extra holds flags
  timeout "${seconds:-600}" python3 benchmarks/gpu/perf.py --arch "$arch" --size "$size" --steps 10 \
    --repeats 5 ${extra//,/ } --out "$out/perf-$arch-$size.json" || echo "== $arch stopped: rc $?"
done

cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
for m in fmnist-dit emoji-dit; do
  .venv/bin/python benchmarks/hyca/masks.py $m
  .venv/bin/stepcache bench $m --repeats 1 --out runs/hyca/mbench-$m $(ls runs/hyca/mpol-$m-*.json | sed 's/^/--policy /') > runs/hyca/mbench-$m.log 2>&1
done
echo done > runs/hyca/masks.done

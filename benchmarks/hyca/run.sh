#!/bin/bash
# HyCa vs every single solver of its pool at the same schedule (equal compute), held-out seeds
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
S=.venv/bin/stepcache
for m in ${MODELS:-fmnist-dit emoji-dit}; do
  for i in 2 3 4; do
    f=runs/hyca/$m-cal-i$i.json
    [ -f $f ] || $S calibrate hyca --model $m -p interval=$i --out $f > /dev/null
  done
  .venv/bin/python benchmarks/hyca/policies.py $m
  $S bench $m --repeats 1 --out runs/hyca/bench-$m $(ls runs/hyca/pol-$m-*.json | sed 's/^/--policy /') > runs/hyca/bench-$m.log 2>&1
done
echo done > runs/hyca/done

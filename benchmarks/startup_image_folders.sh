#!/usr/bin/env bash
# Start-up: train.py for one step on image folders of 1,000 and 20,000 files, alternated, 3 each.
cd "$(dirname "$0")/.."
for round in 1 2 3; do
  for n in 1000 20000; do
    rm -rf /tmp/su_run
    /usr/bin/time -f "n=$n round=$round wall_s=%e max_rss_kb=%M" python train.py --data "${IMAGES:-/tmp/imgs}$n" --workdir /tmp/su_run \
      --steps 1 --batch-size 8 --log-every 1 --warmup-steps 1 --num-samples 1 --sampling-steps 1 --image-size 16 \
      --data-workers 0 > /tmp/su_${n}_${round}.out 2>> /tmp/su_time.log
    tail -1 /tmp/su_time.log
  done
done

#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached. Two calls
# install the wheels (one call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its
# friends, copied from .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this
# script (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`, PYTHONPATH naming /tmp/site-pt,
# /tmp/site-sim and /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches
# /tmp/site-ray/.done. Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a
# lent machine is given back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and
# its exit status and seconds to OUTDIR/steps.txt; a failed step does not stop the next. Steps, in the order they
# run, after /tmp/site-ray/.done (what ran before is in BENCHMARKS.md and benchmarks/h200-session-2026-12-0{3c,3d,3e,3f,3g,4}/):
#   evalC     benchmarks/scripts/device/eval_contention.py: the DT's evaluation beside three training processes,
#             one group and two, with the rollout's host-side window (since 2026-12-04: three device operations
#             a step instead of ~15); against benchmarks/h200-session-2026-12-04/eval-contention-before.json
#             (two groups: 5.6-9.1 s after start-up contended, 0.8-1.4 s idle; one group 4.8 s / 0.9 s)
#   rlR       bench rl under graphs (10 environments): the rollouts' DT / scripted ratio with the host-side
#             window, against 2026-12-03d's rl-ro.json (0.888; per step policy / wait / other 1.07 / 0.28 / 1.27 ms)
#   shareG    bench share, one trial and four at once, under CUDA graphs (compile_mode reduce-overhead) at 2,000
#             timed updates: the independent yardstick, four long trials' steady rate, for bench scale's
#             aggregate (its own yardstick is read from trials that trained beside three others 26-47% of the
#             time in 2026-12-04's routed runs: steady_overlap_share)
#   scaleF    bench scale under graphs, routed, trials started together (the defaults), fresh cache /tmp/hcS:
#             fills the cache
#   scaleW    the same on the cache scaleF filled: against 2026-12-04's scaleA2 (107.54 updates/s, eval_s 200 s
#             summed over 32 trials, aggregate / steady 0.742); its records must equal scaleF's
#   scaleW1   the same with rollout_groups 1 (one policy forward a step for both episodes, half the device calls;
#             faster beside three training processes in eval-contention-before.json): against scaleW; its
#             records must equal scaleW's but for the setting
set -u
out=$(realpath -m "${1:?usage: runbook.sh OUTDIR}")
mkdir -p "$out"
# run from a copy: each device call copies the working tree afresh into the repository root, and a step that
# started during that copy once failed to import the harness (2026-12-03g's scaleD)
src=$(realpath "$(dirname "$0")/../../..")
rm -rf /tmp/rb-tree && mkdir -p /tmp/rb-tree && (cd "$src" && tar cf - --exclude='./.whl-*' --exclude=./.git .) | (cd /tmp/rb-tree && tar xf -)
cd /tmp/rb-tree
export PYTHONUNBUFFERED=1 HARNESS_CACHE=${HARNESS_CACHE:-/tmp/hcache} RAY_DEDUP_LOGS=0 PYTHONPATH=.:${PYTHONPATH:-}
step() { local name=$1; shift; echo "$(date +%T) start $name" >> "$out/steps.txt"; local t0=$(date +%s)
  "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "$(date +%T) end $name rc=$rc $(( $(date +%s) - t0 ))s" >> "$out/steps.txt"; }
records() { (cd /tmp && tar czf "$out/$1-records.tgz" $(find "${@:2}" -name '*records.jsonl' 2>/dev/null)) 2>/dev/null; }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$out/gpu-util.csv" 2>/dev/null &
while [ ! -f /tmp/site-ray/.done ]; do sleep 2; done
SCALE_GRAPHS='settings={"compile_mode": "reduce-overhead"}'
step evalC python benchmarks/scripts/device/eval_contention.py "$out/eval-contention-after.json" 3 3
step rlR python -m harness bench rl --set compile_mode=reduce-overhead --set bench_steps=200 --set bench_envs=10 \
  --out "$out/rl-ro.json"
step shareG env HARNESS_CACHE=/tmp/hcS python -m harness bench share --set 'trials=[4]' --set steps=2000 \
  --set compile_mode=reduce-overhead --out "$out/share-graphs.json"
step scaleF env HARNESS_CACHE=/tmp/hcS python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scF \
  --set "$SCALE_GRAPHS" --out "$out/scale-graphs-routed-fill.json"
records scaleF scF
step scaleW env HARNESS_CACHE=/tmp/hcS python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scW \
  --set "$SCALE_GRAPHS" --out "$out/scale-graphs-routed-warm.json"
records scaleW scW
step scaleW1 env HARNESS_CACHE=/tmp/hcS python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scW1 \
  --set 'settings={"compile_mode": "reduce-overhead", "rollout_groups": 1}' --out "$out/scale-graphs-routed-warm-1group.json"
records scaleW1 scW1
echo ALL-DONE >> "$out/steps.txt"

#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached. Two calls
# install the wheels (one call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its
# friends, copied from .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this
# script (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`, PYTHONPATH naming /tmp/site-pt,
# /tmp/site-sim and /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches
# /tmp/site-ray/.done. Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a
# lent machine is given back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and
# its exit status and seconds to OUTDIR/steps.txt; a failed step does not stop the next. Steps, most wanted
# first (what ran before is in BENCHMARKS.md and benchmarks/h200-session-2026-12-03{c,d,e,f}/; the first-updates
# probe's 40-trial and default-mode runs are there too):
#   probeB    first_updates_probe.py: 20 DT trainers sharing the loss under graphs with the bound as shipped
#             (GRAPH_TREE_TRIALS 8): trials 8 and 16 should find fresh trees, compile again (~2 s) and start
#             with the memory of the kept recordings handed back; the reset had not run on a GPU
#   (the steps below wait for /tmp/site-ray/.done)
#   scaleS    bench scale under graphs (shared) with a fresh HARNESS_CACHE and HARNESS_TRIAL_AFFINITY=0 (Tune's
#             FIFO order, as before harness/trial_routing.py): 2026-12-03f's scaleRS ran on a cache that
#             earlier steps had filled, so its fresh processes' first updates read low; its memory columns
#             should no longer grow with process_trials_before (extra.memory_left_by_earlier_trials_mb)
#   scaleA    the same with the trials routed by structure (the default since 2026-12-03g), on a fresh cache
#             of its own: time_breakdown.reused_trials_that_compiled against scaleS's (12 in scaleRS)
#   vtS       benchmarks/device-files/vtab-mode.yaml under graphs with the shared compiled loss (the VTAB main
#             study's mode since 2026-12-03f), fresh HARNESS_CACHE: against 2026-12-03f's vtA (default mode,
#             shared) and vtR (graphs, own)
#   scaleD    bench scale in torch's default mode, whose records' peak grew 100-170 MiB per earlier trial
#             (2026-12-03f scale0; not the trainer: first-updates-default-8.json)
set -u
out=$(realpath -m "${1:?usage: runbook.sh OUTDIR}")
mkdir -p "$out"
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 HARNESS_CACHE=${HARNESS_CACHE:-/tmp/hcache} RAY_DEDUP_LOGS=0 PYTHONPATH=.:${PYTHONPATH:-}
step() { local name=$1; shift; echo "$(date +%T) start $name" >> "$out/steps.txt"; local t0=$(date +%s)
  "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "$(date +%T) end $name rc=$rc $(( $(date +%s) - t0 ))s" >> "$out/steps.txt"; }
records() { (cd /tmp && tar czf "$out/$1-records.tgz" $(find "${@:2}" -name '*records.jsonl' 2>/dev/null)) 2>/dev/null; }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$out/gpu-util.csv" 2>/dev/null &
step probeB python benchmarks/scripts/device/first_updates_probe.py "$out/first-updates-share-20.json" \
  reduce-overhead 20 share
while [ ! -f /tmp/site-ray/.done ]; do sleep 2; done
SCALE_GRAPHS='settings={"compile_mode": "reduce-overhead"}'
step scaleS env HARNESS_CACHE=/tmp/hcS HARNESS_TRIAL_AFFINITY=0 python -m harness bench scale --set 'counts=[1]' \
  --set workdir=/tmp/scS --set "$SCALE_GRAPHS" --out "$out/scale-graphs-fifo.json"
records scaleS scS
step scaleA env HARNESS_CACHE=/tmp/hcA python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scA \
  --set "$SCALE_GRAPHS" --out "$out/scale-graphs-routed.json"
records scaleA scA
VT=benchmarks/device-files/vtab-mode.yaml
step vtS env HARNESS_CACHE=/tmp/hcVS python -m harness sweep $VT --results /tmp/resVS --leaderboard /tmp/lbVS \
  --no-dashboard --set settings.compile_mode=reduce-overhead
records vt resVS
step scaleD env HARNESS_CACHE=/tmp/hcD python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scD \
  --out "$out/scale-default.json"
records scaleD scD
echo ALL-DONE >> "$out/steps.txt"

#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached. Two calls
# install the wheels (one call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its
# friends, copied from .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this
# script (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`, PYTHONPATH naming /tmp/site-pt,
# /tmp/site-sim and /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches
# /tmp/site-ray/.done. Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a
# lent machine is given back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and
# its exit status and seconds to OUTDIR/steps.txt; a failed step does not stop the next. Steps, most wanted
# first (what ran before is in BENCHMARKS.md and benchmarks/h200-session-2026-12-03{c,d,e,f}/):
#   probeS    first_updates_probe.py: 40 DT trainers in one process under CUDA graphs sharing the compiled
#             loss, the graph trees never reset (GRAPH_TREE_TRIALS 1000): what each recording kept costs the
#             step and the memory, to set GRAPH_TREE_TRIALS (16, a guess) from a measurement
#   probeD    the same, 10 trainers in torch's default mode: the memory still allocated when each begins (in
#             2026-12-03f's bench scale a default-mode trial's peak grew ~100-170 MiB per trial its process
#             ran before; under graphs it did not): whether the trainer leaves it or the trial's evaluation
#   (the steps below wait for /tmp/site-ray/.done)
#   vtS       benchmarks/device-files/vtab-mode.yaml under graphs with the shared compiled loss (the VTAB main
#             study's mode since 2026-12-03f), fresh HARNESS_CACHE: against 2026-12-03f's vtA (default mode,
#             shared) and vtR (graphs, own)
#   scaleS    bench scale under graphs (shared) with a fresh HARNESS_CACHE: 2026-12-03f's scaleRS ran on a cache
#             that earlier steps had filled, so its fresh processes' first updates read low
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
P=benchmarks/scripts/device/first_updates_probe.py
step probeS python $P "$out/first-updates-share-40.json" reduce-overhead 40 share 1000
step probeD python $P "$out/first-updates-default-10.json" default 10
while [ ! -f /tmp/site-ray/.done ]; do sleep 2; done
VT=benchmarks/device-files/vtab-mode.yaml
step vtS env HARNESS_CACHE=/tmp/hcVS python -m harness sweep $VT --results /tmp/resVS --leaderboard /tmp/lbVS \
  --no-dashboard --set settings.compile_mode=reduce-overhead
records vt resVS
step scaleS env HARNESS_CACHE=/tmp/hcS python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scS \
  --set 'settings={"compile_mode": "reduce-overhead"}' --out "$out/scale-graphs-shared.json"
records scaleS scS
echo ALL-DONE >> "$out/steps.txt"

#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached. Two calls
# install the wheels (one call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its
# friends, copied from .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this
# script (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`, PYTHONPATH naming /tmp/site-pt,
# /tmp/site-sim and /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches
# /tmp/site-ray/.done. Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a
# lent machine is given back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and
# its exit status and seconds to OUTDIR/steps.txt; a failed step does not stop the next. Steps, most wanted
# first (what ran before is in BENCHMARKS.md and benchmarks/h200-session-2026-12-03{c,d,e}/):
#   probeR/probe0  first_updates_probe.py: a reused process's first updates split (build, first update,
#             updates 2-20, dynamo's compile times), three DT trainers under CUDA graphs, then three in the
#             default mode (issue 20 item 4: 3.6-6.8 s per reused trial under graphs in 2026-12-03e's bench scale)
#   (the steps below wait for /tmp/site-ray/.done)
#   vtA/vtR   benchmarks/device-files/vtab-mode.yaml (eight LoRA seeds of VTAB main-study shape on a built-in
#             task, two waves) in torch's default mode, then under graphs, each with a fresh HARNESS_CACHE:
#             which mode the VTAB main study should run in, now that an epoch's short batch no longer
#             recompiles (2026-12-03e)
#   scale0    bench scale in torch's default mode (a shared compiled loss per structure); scaleR, the same
#             under graphs, ran in 2026-12-03e (GPU busy 75.7%)
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
step probeR python $P "$out/first-updates-graphs.json" reduce-overhead 3
step probe0 python $P "$out/first-updates-default.json" default 3
while [ ! -f /tmp/site-ray/.done ]; do sleep 2; done
VT=benchmarks/device-files/vtab-mode.yaml
step vtA env HARNESS_CACHE=/tmp/hcVA python -m harness sweep $VT --results /tmp/resVA --leaderboard /tmp/lbVA \
  --no-dashboard
step vtR env HARNESS_CACHE=/tmp/hcVR python -m harness sweep $VT --results /tmp/resVR --leaderboard /tmp/lbVR \
  --no-dashboard --set settings.compile_mode=reduce-overhead
records vt resVA resVR
step scale0 python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/sc0 --out "$out/scale-default.json"
records scale0 sc0
echo ALL-DONE >> "$out/steps.txt"

#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached. Two calls
# install the wheels (one call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its
# friends, copied from .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this
# script (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`, PYTHONPATH naming /tmp/site-pt,
# /tmp/site-sim and /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches
# /tmp/site-ray/.done. Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a
# lent machine is given back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and
# its exit status and seconds to OUTDIR/steps.txt; a failed step does not stop the next. Steps, most wanted
# first (what ran before is in BENCHMARKS.md and benchmarks/h200-session-2026-12-03{c,d}/):
#   dtC       bench methods on the paper DT in torch's default compiled mode, all 14 methods at 200 timed steps
#             (issue 21 item 3: that table's only run, h200-methods-dt-compiled.json, timed 20 steps)
#   (the steps below wait for /tmp/site-ray/.done)
#   scaleR    bench scale's defaults on one GPU under CUDA graphs (as sweeps/cw10.yaml runs now; reused
#             processes): issue 20 item 4's GPU busy (target 80%) and aggregate updates/s
#   vtA/vtR   benchmarks/device-files/vtab-mode.yaml (VTAB main-study-shaped ViT-B trials on the built-in
#             tasks) in torch's default mode, then under graphs: which mode the VTAB main study should run in
#   scale0    bench scale in torch's default mode (a shared compiled loss per structure)
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
step dtC python -m harness bench methods --set model=dt --set compile=true --out "$out/dt-default.json"
while [ ! -f /tmp/site-ray/.done ]; do sleep 2; done
step scaleR python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scR \
  --set 'settings={"compile_mode": "reduce-overhead"}' --out "$out/scale-graphs.json"
records scaleR scR
VT=benchmarks/device-files/vtab-mode.yaml
step vtA python -m harness sweep $VT --results /tmp/resVA --leaderboard /tmp/lbVA --no-dashboard
step vtR python -m harness sweep $VT --results /tmp/resVR --leaderboard /tmp/lbVR --no-dashboard \
  --set settings.compile_mode=reduce-overhead
records vt resVA resVR
step scale0 python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/sc0 --out "$out/scale-default.json"
records scale0 sc0
echo ALL-DONE >> "$out/steps.txt"

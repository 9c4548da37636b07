#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached. Two calls
# install the wheels (one call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its
# friends, copied from .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this
# script (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`, PYTHONPATH naming /tmp/site-pt,
# /tmp/site-sim and /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches
# /tmp/site-ray/.done. Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a
# lent machine is given back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and
# its exit status and seconds to OUTDIR/steps.txt; a failed step does not stop the next. Steps, in the order they
# run, after /tmp/site-ray/.done (what ran before is in BENCHMARKS.md and benchmarks/h200-session-2026-12-03{c,d,e,f,g}/):
#   scaleS    bench scale under graphs, HARNESS_TRIAL_AFFINITY=0 (Tune's FIFO order), trials started together
#             (start_stagger_s=0, as before 2026-12-04), fresh cache /tmp/hcS
#   scaleT    routed by structure with the first trials on the GPU started 8 s apart (the defaults since
#             2026-12-04), on the cache scaleS filled (the same pretrained base and compiled kernels): its records
#             must equal scaleS's to the bit (2026-12-03g's pair ran on separate fresh caches, differed in the 4th
#             digit, and so said nothing about the order)
#   scaleA2   routed, started together (start_stagger_s=0), on the same cache: against scaleT, what the stagger
#             does to aggregate / steady (2026-12-03g: routed processes ran in lock-step, GPU without a
#             training trial 9.8% of the span); its records must equal scaleS's too
#   scaleD    bench scale in torch's default mode, routed, fresh cache: the memory columns of a default-mode
#             sweep (2026-12-03f's scale0: peak grew 100-170 MiB per earlier trial; the columns now subtract
#             what was allocated when the trial began); last, and only if time is left
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
step scaleS env HARNESS_CACHE=/tmp/hcS HARNESS_TRIAL_AFFINITY=0 python -m harness bench scale --set 'counts=[1]' \
  --set workdir=/tmp/scS --set "$SCALE_GRAPHS" --set start_stagger_s=0 --out "$out/scale-graphs-fifo.json"
records scaleS scS
step scaleT env HARNESS_CACHE=/tmp/hcS python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scT \
  --set "$SCALE_GRAPHS" --out "$out/scale-graphs-routed-staggered-warm.json"
records scaleT scT
step scaleA2 env HARNESS_CACHE=/tmp/hcS python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scA2 \
  --set "$SCALE_GRAPHS" --set start_stagger_s=0 --out "$out/scale-graphs-routed-warm.json"
records scaleA2 scA2
step scaleD env HARNESS_CACHE=/tmp/hcD python -m harness bench scale --set 'counts=[1]' --set workdir=/tmp/scD \
  --out "$out/scale-default.json"
records scaleD scD
echo ALL-DONE >> "$out/steps.txt"

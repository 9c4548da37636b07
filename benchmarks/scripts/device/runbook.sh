#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached. Two calls
# install the wheels (one call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its
# friends, copied from .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this
# script (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`, PYTHONPATH naming /tmp/site-pt,
# /tmp/site-sim and /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches
# /tmp/site-ray/.done. Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a
# lent machine is given back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and
# its exit status and seconds to OUTDIR/steps.txt; a failed step does not stop the next. Steps, most wanted
# first (what ran on 2026-12-03 is in BENCHMARKS.md and benchmarks/h200-session-2026-12-03c/):
#   rl / rl0  bench rl under CUDA graphs and in torch's default mode (issue 21 item 2: harness/plain, the
#             rollouts' DT/scripted with the split start-up/steady figures, the LayerNorm split in a whole update)
#   base      a 2K-update RL base on eight tasks (about a minute), for the trial A/Bs
#   (the steps above need no Ray; those below wait for /tmp/site-ray/.done)
#   sh0/sh1   benchmarks/device-files/share.yaml as is and with HARNESS_SHARE_COMPILED=1 (records equal; a reused
#             trial's compile time)
#   abA       benchmarks/h200-session-2026-12-03/ab.yaml in torch's default mode (reused processes)
#   abR       the same under graphs with HARNESS_REUSE_ACTORS=1: reused processes, one trial thread per process
#   abB       the same under graphs, a process per trial (the GLoRA search fix's finalize_s against last time's)
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
# issue 21 item 2: the whole update (batch sampling included) and the rollouts, under graphs and as the sweep
# files run today
step rl python -m harness bench rl --set compile_mode=reduce-overhead --set bench_steps=200 --set bench_envs=10 \
  --out "$out/rl-ro.json"
step rl0 python -m harness bench rl --set bench_steps=200 --set bench_envs=10 --out "$out/rl-default.json"
step base python -m harness pretrain rl --set pretrain_steps=2000 --set data_episodes=50 --set data_workers=14 \
  --set 'pretrain_tasks=[hammer,push-back,reach,window-open,drawer-close,door-close,button-press-topdown,plate-slide]' \
  --set compile=true --set pretrain_eval_episodes=0 --export /tmp/base.safetensors
# Ray's wheels (the second call) for the sweeps below
while [ ! -f /tmp/site-ray/.done ]; do sleep 2; done
AB=benchmarks/h200-session-2026-12-03/ab.yaml
# HARNESS_SHARE_COMPILED's A/B: eight LoRA trials of one structure, as is and sharing one compiled loss
# (benchmarks/device-files/share.yaml says what to compare)
SH=benchmarks/device-files/share.yaml
step sh0 python -m harness sweep $SH --results /tmp/resS0 --leaderboard /tmp/lbS0 --no-dashboard
step sh1 env HARNESS_SHARE_COMPILED=1 python -m harness sweep $SH --results /tmp/resS1 --leaderboard /tmp/lbS1 \
  --no-dashboard
records share resS0 resS1
# the RL A/B file in torch's default mode (reused processes, the sweep files' way), then under CUDA graphs with
# reused processes (every trial of a process on one thread now; its second wave's trials are the ones that
# crashed so before): the records must be equal
step abA python -m harness sweep $AB --results /tmp/resA --leaderboard /tmp/lbA --no-dashboard
step abR env HARNESS_REUSE_ACTORS=1 python -m harness sweep $AB --results /tmp/resR --leaderboard /tmp/lbR \
  --no-dashboard --set settings.compile_mode=reduce-overhead
records ab resA resR
step abB python -m harness sweep $AB --results /tmp/resB --leaderboard /tmp/lbB --no-dashboard \
  --set settings.compile_mode=reduce-overhead
records ab2 resB
echo ALL-DONE >> "$out/steps.txt"

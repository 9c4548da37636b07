#!/bin/bash
# The next device session's measurements for issues 20 and 21, one step after another, detached: start it in the
# call that installs the wheels (`setsid nohup bash benchmarks/scripts/device/runbook.sh OUTDIR &`) and poll with
# `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a lent machine is given back ~30 s after
# a call returns). Its steps that need the simulator wait for /tmp/site-sim/.done (the simulator wheels' install, the second call). Each step's
# console goes to OUTDIR/<step>.log and its exit status and seconds to OUTDIR/steps.txt; a failed step does not
# stop the next. Set PYTHONPATH to the installed wheels before starting it. Steps, most wanted first:
#   dt*       the paper DT's update under graphs: as is, without inductor's mixed-order LayerNorm backward, with
#             SDPA's flash and memory-efficient kernels
#   visB      GLoRA's and AdaLoRA's quickstart vision trials under graphs (against the default mode's records)
#   eager     the slow methods' eager ViT-B steps profiled (host against kernels)
#   (the steps above need no simulator and start at once; those below wait for its wheels)
#   draws     benchmarks/scripts/graph_draws.py: GLoRA's draws and dropout's masks differ from replay to replay
#   base      a 2K-update RL base on eight tasks (about a minute), for the trial A/Bs
#   sh0/sh1   benchmarks/device-files/share.yaml as is and with HARNESS_SHARE_COMPILED=1 (records equal; a reused
#             trial's compile time)
#   abA       benchmarks/h200-session-2026-12-03/ab.yaml in torch's default mode (reused processes)
#   abR       the same under graphs with HARNESS_REUSE_ACTORS=1: reused processes, one trial thread per process
#   rl        bench rl under CUDA graphs
#   abB       the same under graphs, a process per trial (the GLoRA search fix's finalize_s against last time's)
#   dt1/2     bench methods under CUDA graphs, the paper DT's other methods
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
RO="--set compile=true --set compile_mode=reduce-overhead"
DT="--set model=dt $RO --set methods=[full,lora] --set profile=true --set profile_top=200"
# the DT update under graphs: as is, with inductor's LayerNorm backward split into row and column reductions
# (its mixed-order kernel ran at 1.4 TB/s), and with SDPA's other attention kernels (BENCHMARKS.md, 2026-12-03)
step dtbase python -m harness bench methods $DT --out "$out/dt-ro.json"
step dtln python -m harness bench methods $DT --set 'inductor={"triton.mix_order_reduction": false}' \
  --out "$out/dt-ro-no-mix-order.json"
step dtflash python -m harness bench methods $DT --set 'sdpa_backends=[flash]' --out "$out/dt-ro-flash.json"
step dteff python -m harness bench methods $DT --set 'sdpa_backends=[efficient]' --out "$out/dt-ro-efficient.json"
# GLoRA's and AdaLoRA's vision trials under graphs (their default-mode records: BENCHMARKS.md, visA.log.gz of
# benchmarks/h200-session-2026-12-03b; full and LoRA already matched)
V=(--only vision --no-dashboard --set settings.compile=true --set settings.deterministic=true
   --set resources.gpus_per_trial=auto --set resources.cpus_per_trial=4
   --set 'methods={glora: {lr: 1.0e-3}, adalora: {r: 8, lr: 1.0e-2}}')
step visB python -m harness sweep sweeps/quickstart.yaml --results /tmp/resVB --leaderboard /tmp/lbVB "${V[@]}" \
  --set settings.compile_mode=reduce-overhead
records vision resVB
# where the slow methods' eager steps go on ViT-B (issue 21's 1.5x eager): the host or kernels, and which ones
step eager python -m harness bench methods --set 'methods=[full,lora,adalora,randlora,nola,glora,eigenlora]' \
  --set profile=true --set profile_top=40 --out "$out/vit-eager-profile.json"
# the simulator wheels (the second call) for everything below
while [ ! -f /tmp/site-sim/.done ]; do sleep 2; done
AB=benchmarks/h200-session-2026-12-03/ab.yaml
# the draw check needs no quiet GPU: beside the base, whose time nobody reads
step draws python benchmarks/scripts/graph_draws.py "$out/draws.json" &
draws=$!
step base python -m harness pretrain rl --set pretrain_steps=2000 --set data_episodes=50 --set data_workers=14 \
  --set 'pretrain_tasks=[hammer,push-back,reach,window-open,drawer-close,door-close,button-press-topdown,plate-slide]' \
  --set compile=true --set pretrain_eval_episodes=0 --export /tmp/base.safetensors
wait $draws
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
step rl python -m harness bench rl --set compile_mode=reduce-overhead --set bench_steps=200 --set bench_envs=10 \
  --out "$out/rl-ro.json"
step abB python -m harness sweep $AB --results /tmp/resB --leaderboard /tmp/lbB --no-dashboard \
  --set settings.compile_mode=reduce-overhead
records ab2 resB
step dt1 python -m harness bench methods --set model=dt $RO --set 'methods=[full,lora,dora,pissa,olora,vera,linear]' \
  --out "$out/dt-ro-1.json"
step dt2 python -m harness bench methods --set model=dt $RO --set 'methods=[full,eva,eva-dora,randlora,nola,eigenlora]' \
  --out "$out/dt-ro-2.json"
echo ALL-DONE >> "$out/steps.txt"

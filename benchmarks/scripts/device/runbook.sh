#!/bin/bash
# The next device session's measurements, one step after another, detached. Two calls install the wheels (one
# call carries at most 64 MiB): the first carries .whl-pt (peft, timm, pydantic and its friends, copied from
# .whl-ray) and .whl-sim, installs them into /tmp/site-pt and /tmp/site-sim and starts this script (`setsid nohup
# bash benchmarks/scripts/device/runbook.sh OUTDIR [PLAN] &`, PYTHONPATH naming /tmp/site-pt, /tmp/site-sim and
# /tmp/site-ray); the second carries .whl-ray, installs it into /tmp/site-ray and touches /tmp/site-ray/.done.
# Poll with `bash benchmarks/scripts/device/collect.sh OUTDIR` in calls back to back (a lent machine is given
# back ~30 s after a call returns). Each step's console goes to OUTDIR/<step>.log and its exit status and
# seconds to OUTDIR/steps.txt; a failed step does not stop the next. What ran before is in BENCHMARKS.md and
# benchmarks/h200-session-2026-12-0*/ (the last: 2026-12-05, plan eager).
#
# PLAN h200 (the default; one H200):
#   shareD    bench share, one trial and four at once, torch's default compile mode, 2,000 timed updates: the
#             default mode's packing figure today (`--plan` prices it at 1.23x, from the issue's older
#             measurement; under graphs four read 0.936x one, 2026-12-04b's share-graphs.json), which decides
#             whether cw10.yaml's graphs cost more GPU-hours than the default mode when four trials share a GPU
# then bench scale under graphs with the shipped defaults, rollout_groups auto:
#   scaleF2   fresh cache /tmp/hcS: fills it
#   scaleA    on the cache scaleF2 filled: against 2026-12-04b's scaleW1 (rollout_groups 1 given: 109.17
#             updates/s, evaluation 49.4 s summed, 0.901 of bench share's four long trials, 121.1); auto must
#             give one group on these 0.25-GPU trials, and its records must equal scaleF2's
# PLAN x2 (nvidia-h200-x2; issue 20, item 5), each count a sweep of its own from a fresh start on a warm cache:
#   warm      bench scale counts [1], 100 updates, one seed: fills /tmp/hcS (data, base, every method's kernels)
#   gpus1     counts [1] (32 trials x 1,000 updates on one GPU)
#   gpus2     counts [2], the same trials on two; scaling efficiency = gpus2's updates/s / (2 x gpus1's), and
#             records compared with benchmarks/scripts/compare_records.py (measurements apart)
# PLAN eager (one H200; issue 21, item 1, eager): bench methods, eager, with the grouped operands (NoLA, EigenLoRA,
# GLoRA) and RandLoRA's plain scaled bases, then the same with both off (`grouped=false randlora_scales=peft`,
# the code before them), each with the host's top calls profiled; on ViT-B/16 (vitE, vitU) and the paper DT
# (dtE, dtU); then vitRO, the same methods under CUDA graphs (the compiled path is meant to be unchanged,
# RandLoRA's apart, whose scaled bases are now plain ops there too)
# PLAN inplace (one GPU; issue 21, item 1, eager): bench methods eager without profiles, 10 rounds, on ViT-B/16
# (vitA: the defaults; vitI: eager_in_place=false, the code before this plan's change: the plain sum and
# autocast's per-step casts of frozen weights) and the paper DT (dtA, dtI, after vitP); vitP: AdaLoRA's rank 12 padded to
# 16 (rank_align=8, never measured: its bf16 GEMMs ran as align-2 cutlass kernels in 2026-12-05b's profile);
# then vitRO7, every slow method under CUDA graphs (the compiled path is meant to be unchanged)
# PLAN residual (one H200; issue 21, item 2): the paper DT's compiled update under CUDA graphs (full, LoRA;
# 10 rounds) as it is (dtB), with the residual stream in bf16 (dtR), with that and no dropout (dtRD: what is
# left when both numerics choices are taken), as it is again (dtB2: drift), without dropout alone (dtD);
# between them the quality check: the recipe's base pretrained 5K updates with the bf16 residual (ptR) and as
# it is (ptF), same data and seed, scored on MT40 with 3 episodes per task (what device time allows); then
# dtB2, bench rl both ways (rlR, rlB) and dtD
set -u
out=$(realpath -m "${1:?usage: runbook.sh OUTDIR [h200|x2|eager|inplace|residual]}")
plan=${2:-h200}
case "$plan" in h200|x2|eager|inplace|residual) ;; *) echo "runbook.sh: PLAN must be h200, x2, eager, inplace or residual, not $plan" >&2; exit 2;; esac
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
GRAPHS='settings={"compile_mode": "reduce-overhead"}'
scale() { local name=$1 dir=$2; shift 2
  step "$name" env HARNESS_CACHE=/tmp/hcS python -m harness bench scale --set workdir="/tmp/$dir" --set "$GRAPHS" \
    --out "$out/$name.json" "$@"
  records "$name" "$dir"; }
SLOW='methods=[full,lora,adalora,randlora,nola,glora,eigenlora]'
BEFORE=(--set grouped=false --set randlora_scales=peft)
if [ "$plan" = residual ]; then
  dt() { local name=$1 file=$2; shift 2
    step "$name" python -m harness bench methods --set model=dt --set compile=true --set compile_mode=reduce-overhead \
      --set 'methods=[full,lora]' --set rounds=10 "$@" --out "$out/$file"; }
  pt() { local name=$1; shift
    step "$name" python -m harness pretrain rl --set pretrain_steps=5000 --set pretrain_eval_episodes=3 \
      --set data_workers=16 --set eval_workers=16 "$@"; }
  dt dtB dt-ro.json
  # profiled (before the timed rounds): where the time goes once the stream is bf16
  PROF=(--set profile=true --set profile_top=80)
  dt dtR dt-ro-bf16-residual.json --set 'dt={"residual_dtype": "bfloat16"}' "${PROF[@]}"
  dt dtRD dt-ro-bf16-residual-no-dropout.json --set 'dt={"residual_dtype": "bfloat16", "dropout": 0.0}' "${PROF[@]}"
  pt ptR --set residual_dtype=bfloat16
  pt ptF
  dt dtB2 dt-ro-2.json
  step rlR python -m harness bench rl --set residual_dtype=bfloat16 --set eval_workers=16 --out "$out/rl-bf16-residual.json"
  step rlB python -m harness bench rl --set eval_workers=16 --out "$out/rl.json"
  dt dtD dt-ro-no-dropout.json --set 'dt={"dropout": 0.0}'
elif [ "$plan" = inplace ]; then
  ten=(--set rounds=10)
  step vitA python -m harness bench methods --set "$SLOW" "${ten[@]}" --set steps=50 --out "$out/vit-eager.json"
  step vitI python -m harness bench methods --set "$SLOW" "${ten[@]}" --set steps=50 --set eager_in_place=false \
    --out "$out/vit-eager-plain-sum.json"
  step vitP python -m harness bench methods --set 'methods=[full,lora,adalora]' "${ten[@]}" --set steps=50 \
    --set rank_align=8 --out "$out/vit-eager-rank-align-8.json"
  step dtA python -m harness bench methods --set model=dt --set "$SLOW" "${ten[@]}" --set steps=100 \
    --out "$out/dt-eager.json"
  step dtI python -m harness bench methods --set model=dt --set "$SLOW" "${ten[@]}" --set steps=100 \
    --set eager_in_place=false --out "$out/dt-eager-plain-sum.json"
  step vitRO7 python -m harness bench methods --set compile=true --set compile_mode=reduce-overhead --set "$SLOW" \
    --out "$out/vit-ro.json"
elif [ "$plan" = eager ]; then
  prof=(--set profile=true --set profile_top=25)
  step vitE python -m harness bench methods --set "$SLOW" "${prof[@]}" --out "$out/vit-eager.json"
  step vitU python -m harness bench methods --set "$SLOW" "${prof[@]}" "${BEFORE[@]}" --out "$out/vit-eager-before.json"
  step dtE python -m harness bench methods --set model=dt --set "$SLOW" "${prof[@]}" --out "$out/dt-eager.json"
  step dtU python -m harness bench methods --set model=dt --set "$SLOW" "${prof[@]}" "${BEFORE[@]}" \
    --out "$out/dt-eager-before.json"
  step vitRO python -m harness bench methods --set compile=true --set compile_mode=reduce-overhead \
    --set 'methods=[full,randlora,nola,glora,eigenlora]' --out "$out/vit-ro.json"
elif [ "$plan" = h200 ]; then
  step shareD env HARNESS_CACHE=/tmp/hcS python -m harness bench share --set 'trials=[4]' --set steps=2000 \
    --out "$out/share-default.json"
  scale scaleF2 scF2 --set 'counts=[1]'
  scale scaleA scA --set 'counts=[1]'
else
  scale warm scWarm --set 'counts=[1]' --set steps=100 --set 'seeds=[0]'
  scale gpus1 scG1 --set 'counts=[1]'
  scale gpus2 scG2 --set 'counts=[2]'
fi
echo ALL-DONE >> "$out/steps.txt"

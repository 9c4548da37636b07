#!/bin/bash
# Third device session of 2026-12-03 (the runbook's steps that its lost machine did not reach, shortened to what
# fits): inductor's mixed-order LayerNorm backward off (harness.training.INDUCTOR_DEFAULTS, now the default)
# against on, ViT-B/16 under CUDA graphs; then the paper DT's remaining methods under CUDA graphs (issue 21,
# item 3). Detached like runbook.sh; poll with collect.sh OUTDIR.
set -u
out=$(realpath -m "${1:?usage: mix_order.sh OUTDIR}")
mkdir -p "$out"
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 HARNESS_CACHE=${HARNESS_CACHE:-/tmp/hcache} PYTHONPATH=.:${PYTHONPATH:-}
step() { local name=$1; shift; echo "$(date +%T) start $name" >> "$out/steps.txt"; local t0=$(date +%s)
  "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "$(date +%T) end $name rc=$rc $(( $(date +%s) - t0 ))s" >> "$out/steps.txt"; }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$out/gpu-util.csv" 2>/dev/null &
RO="--set compile=true --set compile_mode=reduce-overhead"
step vit python -m harness bench methods $RO --set 'methods=[full,lora]' --out "$out/vit-ro-split-ln.json"
step vitmix python -m harness bench methods $RO --set 'methods=[full,lora]' \
  --set 'inductor={"triton.mix_order_reduction": true}' --out "$out/vit-ro-mix-order.json"
step dt1 python -m harness bench methods --set model=dt $RO --set 'methods=[full,lora,dora,pissa,olora,vera,linear]' \
  --out "$out/dt-ro-1.json"
step dt2 python -m harness bench methods --set model=dt $RO --set 'methods=[full,eva,eva-dora,randlora,nola,eigenlora]' \
  --out "$out/dt-ro-2.json"
echo ALL-DONE >> "$out/steps.txt"

#!/bin/bash
# Pretraining under CUDA graphs against torch's default mode (track setting pretrain_compile_mode, 2026-12-06): the
# paper DT, deterministic kernels, a short run with one mid-run MT40 point, each mode on an empty cache of its own
# (the mode is not in the base's key). Prints both results and whether the weights and the loss curves are the
# same bits. Needs the simulator's wheels, not Ray.
# Usage: pretrain_graphs.sh OUTDIR [--set KEY=VALUE ...] (extra settings for both runs)
out=$(realpath -m "${1:?usage: pretrain_graphs.sh OUTDIR}"); mkdir -p "$out"
export PYTHONUNBUFFERED=1
common=(--set 'pretrain_tasks=[reach,push,drawer-close]' --set data_episodes=20 --set pretrain_steps=600
        --set 'pretrain_eval_at=[300]' --set pretrain_eval_episodes=2 --set deterministic=true
        --set data_workers=8 --set eval_workers=6)
for mode in default reduce-overhead; do
  t0=$(date +%s)
  HARNESS_CACHE=/tmp/hc-$mode python -m harness pretrain rl "${common[@]}" --set pretrain_compile_mode=$mode "${@:2}" > "$out/pt-$mode.log" 2>&1
  echo "$mode rc=$? $(( $(date +%s) - t0 ))s"
done
python - "$out" <<'PY'
import json, sys, torch
out = sys.argv[1]
res = {}
for mode in ("default", "reduce-overhead"):
    text = open(f"{out}/pt-{mode}.log").read()
    res[mode] = json.loads(text[text.index("\n{"):])
a, b = (torch.load(res[m]["path"]) for m in ("default", "reduce-overhead"))
info = {m: json.load(open(res[m]["path"].rsplit("/", 1)[0] + "/info.json")) for m in res}
print(json.dumps({"same_weights": all(torch.equal(a[k], b[k]) for k in a),
                  "same_losses": info["default"]["losses"] == info["reduce-overhead"]["losses"],
                  **{m: {k: res[m].get(k) for k in ("final_loss", "steps_per_s", "wall_s", "curve")} | {"compile_mode": info[m].get("compile_mode")} for m in res}},
                 indent=1))
PY

"""Does a base pretrained afresh on a GPU have the same bits every time? (2026-12-04: two sessions' bench-scale
bases, same key, differed from the 500th update on, so every record of the two sessions differed.) Pretrains the
paper DT on one task's cached data several times, each time from an emptied pretraining cache, without and with
``deterministic``, eager and compiled, and writes each run's tensor digest and final loss.

python benchmarks/scripts/device/pretrain_repeat.py OUT.json [STEPS]
"""
import json
import shutil
import sys
import time

import torch


def main() -> None:
    from agents.pretrain import KIND, _tensors_digest, pretrain
    from agents.track import RLSettings, pretrain_plan
    from harness.cache import ArtifactCache
    from harness.process_cache import base_state

    out, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300
    cache = ArtifactCache()
    rows = []
    for compiled, deterministic in ((False, False), (False, False), (False, True), (False, True),
                                    (True, True), (True, True)):
        shutil.rmtree(cache.root / KIND, ignore_errors=True)
        ts = RLSettings(pretrain_tasks=["hammer"], data_episodes=8, pretrain_steps=steps, compile=compiled,
                        deterministic=deterministic, device="cuda", data_workers=8, pretrain_eval_episodes=0)
        t0 = time.time()
        pre = pretrain(pretrain_plan(ts), torch.device("cuda"), 8, cache)
        rows.append({"compiled": compiled, "deterministic": deterministic, "steps": steps,
                     "digest": _tensors_digest(base_state(pre.path))[:16],
                     "final_loss": pre.info.get("final_loss"), "wall_s": round(time.time() - t0, 1),
                     "deterministic_after": torch.are_deterministic_algorithms_enabled()})
        print(rows[-1], flush=True)
        with open(out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

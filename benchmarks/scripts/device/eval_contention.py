"""Why a routed bench-scale trial's evaluation took 7 s where a FIFO one took 2.8 s (2026-12-04): the DT's
rollout policy on a GPU that three other processes keep busy training. Times ``evaluate_dt`` (2 episodes,
2 workers, as bench scale's trials) with the environments in two pipelined groups (as shipped: two policy
forwards per step, each hiding behind the other group's simulator step) and in one group (one forward of
both), first on an idle GPU, then beside LOAD processes training the same DT eagerly at batch 128.

python benchmarks/scripts/device/eval_contention.py OUT.json [LOAD] [ROUNDS]
"""
import json
import multiprocessing as mp
import sys
import time

import torch


def _train_forever(ready) -> None:
    from agents.bench import _harness_rate
    from agents.track import RLSettings, model_config

    ts = RLSettings(compile=False)
    device = torch.device("cuda")
    ready.set()
    while True:
        _harness_rate(model_config(ts), ts, 128, 200, False, device)


def main() -> None:
    from agents.dt import DecisionTransformer
    from agents.rollout import evaluate_dt
    from agents.track import RLSettings, model_config

    out = sys.argv[1]
    load = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    model = DecisionTransformer(model_config(RLSettings())).cuda().eval()
    rows = []

    def measure(label: str) -> None:
        for r in range(rounds):
            for groups in (2, 1):
                # under the trial's autocast
                res = evaluate_dt(model, "hammer", 2, 1000.0, workers=2, seed=r, groups=groups)
                rows.append({"load": label, "groups": groups, "round": r, "wall_s": res.wall_s,
                             "start_s": res.start_s, "policy_s": res.policy_s, "wait_s": res.wait_s,
                             "capture_s": res.capture_s})
                print(rows[-1], flush=True)
                with open(out, "w") as f:
                    json.dump({"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(),
                               "torch": torch.__version__, "rows": rows}, f, indent=1)

    measure("idle")
    ctx = mp.get_context("spawn")
    procs, events = [], []
    for _ in range(load):
        ev = ctx.Event()
        p = ctx.Process(target=_train_forever, args=(ev,), daemon=True)
        p.start()
        procs.append(p)
        events.append(ev)
    for ev in events:
        ev.wait()
    time.sleep(15)  # their first steps (allocator, cuBLAS handles) out of the way
    measure(f"{load} training")
    for p in procs:
        p.terminate()


if __name__ == "__main__":
    main()

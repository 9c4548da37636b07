"""``python -m harness costs``: a sweep's cost from its trials' records, as a user runs it from the folder
the sweep ran in, on a finished scheduled selection (trials ASHA stopped), a trial still running, and a
GPU trial's share."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.costs import cost_table, record_updates, trial_costs


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_costs_of_a_scheduled_sweep_add_up_its_records(selection_bench, monkeypatch, capsys):
    """Per stage and method, from the Tune folders alone: the trials, the updates each record says it
    trained (a stopped trial: where ASHA stopped it), the stopped count; the CSV's total row sums them."""
    assert selection_bench.done.returncode == 0, selection_bench.done.stdout[-3000:]
    monkeypatch.chdir(selection_bench.folder)
    assert main(["costs", "work/scheduler", "--out", "costs/scheduler.csv"]) == 0
    printed = capsys.readouterr().out
    table = _rows(Path("costs/scheduler.csv"))
    rows = {(r["stage"], r["method"]): r for r in table if r["study"] != "total"}
    select, final = selection_bench.select_records("scheduler"), selection_bench.final_records("scheduler")
    stopped = [r for r in select if "stopped_at_update" in json.loads(r["extra"])]
    assert stopped, "the fixture's ASHA run stops no trial: nothing here tests a stopped trial's cost"
    sel = rows[("select", "full")]
    assert int(sel["trials"]) == len(select) == len(selection_bench.lrs)
    assert int(sel["stopped"]) == len(stopped)
    assert int(sel["updates"]) == sum(record_updates(r) for r in select) < len(select) * selection_bench.steps
    assert int(sel["unfinished"]) == int(sel["failed"]) == 0
    for method in {r["method"] for r in final}:
        mine = [r for r in final if r["method"] == method]
        assert int(rows[("final", method)]["trials"]) == len(mine)
        assert int(rows[("final", method)]["updates"]) == sum(record_updates(r) for r in mine)
        assert float(rows[("final", method)]["trial_minutes"]) * 60 == pytest.approx(
            sum(json.loads(r["extra"])["total_wall_s"] for r in mine), abs=0.6)
    total = next(r for r in table if r["study"] == "total")
    body = list(rows.values())
    assert int(total["updates"]) == sum(int(r["updates"]) for r in body)
    assert int(total["trials"]) == len(select) + len(final)
    assert float(total["gpu_minutes"]) == 0.0  # CPU trials hold no GPU
    assert "gpu_minutes" in printed and "total" in printed
    assert main(["costs", "work/scheduler", "--by", "method", "--out", "costs/by-method.md"]) == 0
    md = Path("costs/by-method.md").read_text().splitlines()
    assert md[0].startswith("| method") and any(line.startswith("| total") for line in md)


def test_a_running_trial_and_a_gpu_share(selection_bench, tmp_path):
    """A trial with no record yet counts as unfinished (with the updates it reported); a trial that held a
    quarter of a GPU for 120 s costs half a GPU-minute."""
    work = tmp_path / "results"
    shutil.copytree(selection_bench.folder / "work" / "grid", work)
    trials = sorted(p for p in work.rglob("result.json") if "-final" in str(p.parent.parent))
    running, gpu = trials[0], trials[1]
    running.write_text(running.read_text().splitlines()[0] + "\n")  # its first report only
    lines = gpu.read_text().splitlines()
    last = json.loads(lines[-1])
    record = json.loads(last["record"])
    extra = json.loads(record["extra"]) if isinstance(record["extra"], str) else record["extra"]
    # a trial that began its process: Ray held its share from the worker's start (8 s before the trial)
    extra.update(total_wall_s=120.0, placement={**extra.get("placement", {}), "ray": {"gpus": 0.25}},
                 process_trials_before=0, timing={**extra.get("timing", {}), "process_to_trial_s": 8.0})
    record["extra"] = json.dumps(extra)
    last["record"] = json.dumps(record)
    gpu.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")

    costs = trial_costs(work)
    mine = {c.task + c.method + str(c.status): c for c in costs if c.stage == "final"}
    unfinished = [c for c in costs if c.status == "unfinished"]
    assert len(unfinished) == 1 and unfinished[0].method and unfinished[0].task
    assert unfinished[0].updates == json.loads(running.read_text())["update"] > 0
    assert any(c.gpu_s == pytest.approx(32.0) and c.start_s == 8.0 for c in mine.values())
    table = cost_table(costs, ("stage",))
    assert float(table[table["stage"] == "total"]["gpu_minutes"].iloc[0]) == pytest.approx(32.0 / 60, abs=0.005)
    assert int(table[table["stage"] == "total"]["unfinished"].iloc[0]) == 1


@pytest.mark.parametrize("argv, says", [
    (["costs", "no-such-folder"], "is not a folder"),
    (["costs", "."], "no trial folders"),
    (["costs", ".", "--by", "method,colour"], "--by 'method,colour'"),
    (["costs", ".", "--out", "costs.txt"], ".csv, .json or .md"),
])
def test_bad_costs_input_is_named(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert says in capsys.readouterr().err


def test_plan_beside_spending(selection_bench, monkeypatch, capsys):
    """--plan prices the sweep file the run came from and sets it beside the records, per stage: the final
    stage trains every trial to its budget, so its planned updates are exactly the ones spent; the
    selection stage under ASHA spends what the scheduler let it."""
    monkeypatch.chdir(selection_bench.folder)
    assert main(["costs", "work/scheduler", "--by", "study,stage", "--plan", "sel.yaml", "--gpus", "1",
                 "--gpu-model", "NVIDIA H200"]) == 0
    out = capsys.readouterr().out
    table = out.split("against the records:", 1)[1].strip().splitlines()
    header, rows = table[0].split(), [dict(zip(table[0].split(), line.split())) for line in table[1:]]
    assert {"planned_updates", "updates", "planned_gpu_minutes", "gpu_minutes", "updates_ratio"} <= set(header)
    final = next(r for r in rows if r["stage"] == "final")
    finals = selection_bench.final_records("scheduler")
    assert int(final["planned_trials"]) == int(final["trials"]) == len(finals)
    assert int(final["planned_updates"]) == int(final["updates"]) == sum(record_updates(r) for r in finals)
    select = next(r for r in rows if r["stage"] == "select")
    assert int(select["updates"]) == sum(record_updates(r) for r in selection_bench.select_records("scheduler"))
    assert 0 < int(select["planned_updates"]) < len(selection_bench.lrs) * selection_bench.steps  # ASHA's share


def test_where_the_trials_time_went(selection_bench, monkeypatch, capsys):
    """`costs --phases`: per study and stage, the phases of the finished trials' timing blocks as shares of
    their wall time (the phases partition it, so the shares add up to 100), their count, and the worker
    start-ups beside them; the same arithmetic `bench scale` reports (harness.costs.time_breakdown)."""
    from harness.costs import phase_table, trial_costs

    monkeypatch.chdir(selection_bench.folder)
    assert main(["costs", "work/scheduler", "--phases"]) == 0
    printed = capsys.readouterr().out
    assert "Where the finished trials' time went" in printed and "steady_pct" in printed
    table = phase_table(trial_costs("work/scheduler"))
    select, final = selection_bench.select_records("scheduler"), selection_bench.final_records("scheduler")
    rows = {r["stage"]: r for r in table.to_dict("records")}
    assert set(rows) == {"select", "final"}
    # a trial the scheduler stopped counts too: its record carries its timing up to the stop
    stopped = [json.loads(r["extra"]) for r in select if "stopped_at_update" in json.loads(r["extra"])]
    assert stopped and all(e["timing"]["steady_s"] > 0 and len(e["timing"]["training_span"]) == 2 for e in stopped)
    assert rows["select"]["trials"] == len(select) and rows["final"]["trials"] == len(final)
    from harness.finetune import PHASES

    for r in rows.values():
        shares = [v for k, v in r.items() if k.endswith("_pct") and k != "idle_pct"]
        # records round each phase to 1 ms, and these trials last a fraction of a second: the sum may miss 100
        # by that rounding over every phase of every trial, plus the shares' own rounding to 0.1
        rounding = 100 * 0.0005 * len(PHASES) * r["trials"] / (60 * r["trial_minutes"]) + 0.05 * len(PHASES)
        assert sum(shares) == pytest.approx(100.0, abs=rounding) and r["steady_pct"] > 0, r
        assert r["processes_started"] + r["reused_process"] == r["trials"]
        assert r["reused_compiled"] is None or 0 <= r["reused_compiled"] <= r["reused_process"]
    walls = sum(json.loads(x["extra"])["timing"]["total_s"] for x in final)
    assert rows["final"]["trial_minutes"] == pytest.approx(walls / 60, abs=0.01)


def _timed(gpu: str, started: float, total: float, training: tuple[float, float], start_up: float = 2.0,
           before: int = 0) -> dict:
    """A record's ``extra`` with a timing block: trial lives ``total`` s from ``started``, trains in ``training``."""
    timing = {"total_s": total, "steady_s": training[1] - training[0], "process_to_trial_s": start_up,
              "training_span": [started + training[0], started + training[1]]}
    return {"extra": json.dumps({"timing": timing, "started_at": started, "process_trials_before": before,
                                 "placement": {"ray": {"gpu_ids": [gpu]}}})}


def test_idle_share_counts_each_device_only_while_the_sweep_ran_trials_on_it():
    """A sweep resumed hours later on a host with one GPU: the hours between the sessions count for no
    device, and the session without GPU 1 does not count against it; a wave's tail does."""
    from harness.costs import time_breakdown

    first = [_timed("0", 0.0, 100.0, (10.0, 90.0)), _timed("1", 0.0, 60.0, (10.0, 50.0))]  # GPU 1's tail: 40 s
    resumed = [_timed("0", 10_000.0, 100.0, (10.0, 90.0))]  # later, a one-GPU host
    b = time_breakdown(first + resumed)
    # GPU 0: 160 s of training in 2 x 102 s (start-ups included); GPU 1: 40 s in the first session's 102 s
    assert b["idle_share_by_device"] == {"0": pytest.approx(1 - 160 / 204, abs=1e-4),
                                         "1": pytest.approx(1 - 40 / 102, abs=1e-4)}
    # one uninterrupted run timed from outside (bench scale) still divides by the span it is given
    assert time_breakdown(first, 100.0)["idle_share_by_device"] == {"0": 0.2, "1": 0.6}


def test_first_updates_are_split_by_what_the_trials_process_had_done():
    """Issue 20 item 4's breakdown: a fresh process's first updates, a reused one's, and of those the ones
    whose step compiled nothing (they ran a shared graph)."""
    from harness.costs import time_breakdown

    def record(first_updates: float, before: int, graphs: int | None) -> dict:
        extra = {"timing": {"total_s": 60.0, "first_updates_s": first_updates}, "process_trials_before": before,
                 **({"graphs_compiled": graphs} if graphs is not None else {})}
        return {"extra": json.dumps(extra)}

    b = time_breakdown([record(20.0, 0, 1), record(22.0, 0, 1), record(6.0, 1, 1), record(1.0, 1, 0),
                        record(2.0, 2, 0)])
    assert b["first_updates_mean_s"] == {"fresh_process": 21.0, "reused_process": 3.0, "reused_compiled_nothing": 1.5}
    assert b["reused_trials_that_compiled"] == 1
    # records from before graphs_compiled: the reused trials' mean, no claim about what they compiled
    old = time_breakdown([record(20.0, 0, None), record(5.0, 1, None)])
    assert old["first_updates_mean_s"] == {"fresh_process": 20.0, "reused_process": 5.0,
                                           "reused_compiled_nothing": None}
    assert old["reused_trials_that_compiled"] is None


def test_overheads_measured_from_the_records(selection_bench, monkeypatch, capsys):
    """`costs --overheads FILE`: per stage and method, the mean seconds of the finished trials' phases
    outside training and evaluation (those every trial pays over all of them, the stopped ones too; the
    end-of-training step over those that reached the end), and the mean worker start-up, as the plan's cost
    table takes them."""
    import statistics

    from harness.costs import ALWAYS_PHASES, END_PHASES

    monkeypatch.chdir(selection_bench.folder)
    assert main(["costs", "work/scheduler", "--overheads", "measured/overheads.json"]) == 0
    written = json.loads(Path("measured/overheads.json").read_text())
    tracks = {r["track"] for r in selection_bench.select_records("scheduler")}
    assert set(written["tracks"]) == tracks and len(tracks) == 1  # per track: the bench's sweep has one
    got = written["tracks"][tracks.pop()]
    want: dict[str, dict[str, dict[str, list[float]]]] = {"seconds": {}, "end_seconds": {}}
    starts = []
    for stage, records in (("select", selection_bench.select_records("scheduler")),
                           ("final", selection_bench.final_records("scheduler"))):
        for r in records:
            e = json.loads(r["extra"])
            parts = [("seconds", ALWAYS_PHASES)] + ([] if "stopped_at_update" in e else [("end_seconds", END_PHASES)])
            for key, phases in parts:
                spent = sum(e["timing"].get(f"{p}_s", 0.0) for p in phases)
                want[key].setdefault(stage, {}).setdefault(r["method"], []).append(spent)
                want[key][stage].setdefault("default", []).append(spent)
            if not e.get("process_trials_before"):
                starts.append(e["timing"]["process_to_trial_s"])
    for key in ("seconds", "end_seconds"):
        assert got[key] == {s: {m: round(statistics.fmean(v), 2) for m, v in per.items()}
                            for s, per in want[key].items()}
    assert got["start_s"] == round(statistics.fmean(starts), 2) and got["start_s"] > 0
    assert got["trials"] == {s: len(per["default"]) for s, per in want["seconds"].items()}
    assert got["end_trials"] == {s: len(per["default"]) for s, per in want["end_seconds"].items()}
    assert got["trials"]["select"] > got["end_trials"]["select"]  # the fixture's stopped trials count in seconds
    assert main(["costs", "work/scheduler", "--overheads", "overheads.txt"]) == 2
    assert "must end in .json" in capsys.readouterr().err


def _trial_folder(root: Path, stage: str, name: str, method: str, extra: dict | None, status: str = "ok") -> None:
    """A trial's folder as `harness sweep` leaves it: Tune's params.json and a last report that carries the
    trial's record (``extra`` None: a trial still running, with no record yet)."""
    folder = root / "sweep" / f"study-{stage}" / name
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"spec": {"method": method, "task": "t", "track": "rl"}}))
    report: dict = {"update": 10}
    if extra is not None:
        report["record"] = json.dumps({"track": "rl", "method": method, "task": "t", "status": status,
                                       "device_name": "GPU X", "extra": json.dumps(extra)})
    (folder / "result.json").write_text(json.dumps(report) + "\n")


def _phases(setup: float, wrap: float, first: float, finalize: float, save: float, start: float) -> dict:
    """A record's ``extra`` of a trial that began its process ``start`` s after it started, with these phases."""
    return {"process_trials_before": 0, "timing": {
        "setup_s": setup, "wrap_s": wrap, "first_updates_s": first, "steady_s": 50.0, "finalize_s": finalize,
        "eval_s": 5.0, "save_s": save, "process_to_trial_s": start}}


def test_overheads_keep_the_end_of_training_step_apart(tmp_path, capsys):
    """Issue 20: a GLoRA trial that ASHA stops never runs its subnet search (``finalize``), so `costs
    --overheads` writes it apart (``end_seconds``, over the trials that reached the end of their budget) from
    what every trial pays (``seconds``, over the stopped trials too). A record without a timing block (older
    code's stopped trials), a failed trial and one still running count in neither."""
    stopped = {"stopped_at_update": 5, "updates": 5}
    for stage, name, method, extra, status in [
        ("select", "g1", "glora", _phases(1, 2, 10, 300, 1, start=4), "ok"),  # paid 14 always, 300 at the end
        ("select", "g2", "glora", _phases(2, 2, 12, 200, 0, start=6), "ok"),  # 16, 200
        ("select", "g3", "glora", {**_phases(1, 2, 9, 0, 0, start=8), **stopped}, "ok"),  # stopped: 12, no search
        ("select", "g4", "glora", dict(stopped), "ok"),  # stopped, its record without a timing block
        ("select", "g5", "glora", _phases(1, 1, 1, 999, 1, start=99), "failed"),
        ("select", "g6", "glora", None, ""),  # running
        ("select", "l1", "lora", _phases(1, 3, 8, 0, 1, start=2), "ok"),  # 13, 0
        ("final", "G", "glora", _phases(1, 2, 10, 30, 1, start=10), "ok"),  # 14, 30
    ]:
        _trial_folder(tmp_path / "results", stage, name, method, extra, status)
    target = tmp_path / "overheads.json"
    assert main(["costs", str(tmp_path / "results"), "--overheads", str(target)]) == 0
    capsys.readouterr()
    got = json.loads(target.read_text())["tracks"]["rl"]
    assert got["seconds"] == {"select": {"glora": 14.0, "lora": 13.0, "default": 13.75},
                              "final": {"glora": 14.0, "default": 14.0}}
    assert got["end_seconds"] == {"select": {"glora": 250.0, "lora": 0.0, "default": round(500 / 3, 2)},
                                  "final": {"glora": 30.0, "default": 30.0}}
    assert got["trials"] == {"select": 4, "final": 1} and got["end_trials"] == {"select": 3, "final": 1}
    assert got["start_s"] == pytest.approx((4 + 6 + 8 + 2 + 10) / 5, abs=0.005)
    written = json.loads(target.read_text())
    assert written["phases"] == ["setup", "wrap", "first_updates", "save"] and written["end_phases"] == ["finalize"]


def test_phase_shares_of_short_trials_add_up_to_the_whole():
    """The shares come from the phases' exact sums: rounded to 10 ms first, the phases of trials that last a few
    hundredths of a second would add up to far more (or less) than their wall time."""
    from harness.costs import time_breakdown
    from harness.finetune import PHASES

    timing = {**{f"{p}_s": 0.004 for p in PHASES}, "total_s": 0.004 * len(PHASES)}
    b = time_breakdown([{"extra": {"timing": dict(timing)}} for _ in range(2)])
    assert sum(b["phase_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert b["phases_s"]["steady_s"] == 0.01  # the seconds shown are still rounded to 10 ms

"""The command line: ``python -m harness {sweep,run,pretrain,data,eval,leaderboard,costs,methods,tasks,bench}``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from harness.cache import atomic_write_text, cache_root, check_writable_dir
from harness.errors import ConfigError, HarnessError, choices_message
from harness.methods import get_method, method_names
from harness.plugins import load_plugins
from harness.tracks import TRACKS, get_track, track_names
from harness.trial import TrialSpec, print_reporter, resolve_trial
from harness.yaml_input import load_yaml

DEFAULT_SWEEP = "sweeps/quickstart.yaml"


def _parse_sets(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. steps=100")
        k, v = item.split("=", 1)
        out.append((k.strip(), load_yaml(v, f"--set {item!r}")))
    return out


def _split_run_sets(args, method_name: str, track) -> tuple[dict, dict, dict]:
    """Sort ``--set`` pairs into method settings, track settings and budget (prefix or bare key)."""
    method_keys = set(get_method(method_name).all_settings())
    track_keys, budget_keys = set(track.Settings.model_fields), set(track.Budget.model_fields)
    method, settings, budget = {}, {}, {}
    for key, value in _parse_sets(args.set):
        prefix, _, name = key.partition(".")
        owners = [n for n, keys in (("method", method_keys), ("settings", track_keys), ("budget", budget_keys))
                  if key in keys]
        if name and prefix in ("method", "settings", "budget"):
            {"method": method, "settings": settings, "budget": budget}[prefix][name] = value
        elif len(owners) > 1:  # e.g. dropout: LoRA's adapter dropout or the DT's (which changes the base model)
            raise ConfigError(f"--set {key!r} is ambiguous: it is a setting of "
                              + " and of ".join({"method": f"method {method_name!r}", "settings":
                                                 f"the {args.track} track", "budget": "the budget"}[o] for o in owners)
                              + "; say which: " + " or ".join(f"--set {o}.{key}={value}" for o in owners))
        elif key in method_keys:
            method[key] = value
        elif key in track_keys:
            settings[key] = value
        elif key in budget_keys:
            budget[key] = value
        else:
            raise ConfigError(
                f"--set {key!r}: not a setting of method {method_name!r} ({', '.join(sorted(method_keys))}), "
                f"of the {args.track} track ({', '.join(sorted(track_keys))}) or of the budget "
                f"({', '.join(sorted(budget_keys))})")
    return method, settings, budget


# Exit statuses of `sweep` and `run` (README, "Using it"): what a script driving the harness branches on.
EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT, EXIT_ALL_FAILED = 0, 1, 2, 3


def _writable_folders(results: str | None, leaderboard: str | None) -> None:
    check_writable_dir(cache_root(), "the cache (HARNESS_CACHE)")
    if results is not None:
        check_writable_dir(Path(results), "--results")
    if leaderboard is not None:
        check_writable_dir(Path(leaderboard), "--leaderboard")


def cmd_sweep(args) -> int:
    from harness.driver import LocalResources, run_sweep  # heavy: the sweep schema, not for --help
    from harness.sweep_file import load_sweep  # heavy: the sweep schema, not for --help

    sweep = load_sweep(args.file, args.set, args.only, confirmed=args.yes or args.plan)  # a plan runs nothing
    if args.plan:  # the price, before (and instead of) any compute
        from harness.driver import check_banks  # heavy: the sweep schema, not for --help
        from harness.plan import run_plan  # heavy: the sweep schema, not for --help

        check_banks(sweep)
        print(run_plan(sweep, args.gpus, args.address, args.gpu_model), flush=True)
        return EXIT_OK
    _writable_folders(args.results, args.leaderboard)
    local = LocalResources(cpus=args.cpus, gpus=args.gpus)
    out = run_sweep(sweep, Path(args.results), Path(args.leaderboard), resume=args.resume, address=args.address,
                    dashboard=not args.no_dashboard, local=local, selection_only=args.selection_only)
    if args.selection_only:
        print(f"[sweep] selection done; the same command with --resume instead of --selection-only trains the "
              f"final stage (results in {args.results}/)", flush=True)
        return _exit_status([r for recs in out.values() for r in recs])
    from harness.site import render  # heavy: harness.site imports pandas

    # only this sweep's boards (and the index, where it changes): other boards' files stay as they are
    render(Path(args.leaderboard), {s.board_name for s in sweep.studies})
    print(f"[sweep] done; leaderboard in {args.leaderboard}/", flush=True)
    return _exit_status([r for recs in out.values() for r in recs])


def _exit_status(records: list[dict[str, Any]]) -> int:
    """EXIT_OK, or what share of ``records`` failed, said on stderr."""
    failed = sum(r.get("status") != "ok" for r in records)
    if records and failed == len(records):
        print(f"[sweep] every trial failed ({failed}); exit status {EXIT_ALL_FAILED}", file=sys.stderr)
        return EXIT_ALL_FAILED
    if failed:
        print(f"[sweep] {failed} of {len(records)} trials failed; exit status {EXIT_SOME_FAILED}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def cmd_run(args) -> int:
    track = get_track(args.track)
    _writable_folders(None, None)
    method, settings, budget = _split_run_sets(args, args.method, track)
    for flag in ("data_root", "backbone", "weights"):
        value = getattr(args, flag)
        if value is not None:
            if flag not in track.Settings.model_fields:
                raise ConfigError(f"--{flag.replace('_', '-')} is not a setting of the {args.track} track")
            settings[flag] = value
    if args.steps is not None:
        budget["steps"] = args.steps
    spec = resolve_trial(TrialSpec(track=args.track, benchmark=args.benchmark, task=args.task, method=args.method,
                                   method_settings=method, seed=args.seed, budget=budget, track_settings=settings))
    report = (lambda m: print(f"[trial] {json.dumps(m, default=str)}", file=sys.stderr, flush=True)) \
        if args.json else print_reporter
    track.prepare(spec.track_settings, args.benchmark, [args.task], report)
    from harness.finetune import run_trial  # heavy: the engine imports torch; the other commands do not

    record = run_trial(spec, report)
    if args.json:
        print(json.dumps(record.flat(), default=str, sort_keys=True), flush=True)
    else:
        print(yaml.safe_dump(record.flat(), sort_keys=False))
    return EXIT_OK if record.status == "ok" else EXIT_ALL_FAILED


def _track_settings(args) -> tuple[Any, Any]:
    track = get_track(args.track)
    return track, track.settings(dict(_parse_sets(args.set)))


def cmd_pretrain(args) -> int:
    track, settings = _track_settings(args)
    if args.curve or args.export:  # the RL base's time-to-quality curve and shareable file (agents/pretrain.py)
        import inspect

        if not {"curve", "export"} <= set(inspect.signature(track.pretrain).parameters):
            raise ConfigError(f"pretrain --curve and --export are not offered by the {args.track} track (the rl "
                              "track's pretraining has them)")
        print(json.dumps(track.pretrain(settings, curve=args.curve, export=args.export), indent=1, default=str))
        return 0
    print(json.dumps(track.pretrain(settings), indent=1, default=str))
    return 0


def cmd_data(args) -> int:
    track, settings = _track_settings(args)
    if args.report:  # per task and noise level: the expert's success and return range (agents/data.py)
        if args.track != "rl":
            raise ConfigError("data --report is for the rl track (the expert data's per-task success)")
        from agents.track import data_report  # heavy: agents.track imports metaworld

        out = Path(args.out or "results")
        print(data_report(settings, args.tasks or None, out))
        return 0
    print(json.dumps(track.make_data(settings, args.tasks or None), indent=1, default=str))
    return 0


def _command(*words: str, sets: Sequence[str] = ()) -> str:
    """The command line a measurement's JSON names: ``python -m harness`` with ``words`` and each ``--set``."""
    return " ".join(["python -m harness", *words, *(w for s in sets for w in ("--set", s))])


def cmd_eval(args) -> int:
    if args.track != "rl":
        raise ConfigError(f"eval {args.track!r}: eval scores an exported base of the rl track "
                          "(python -m harness eval rl --pretrained FILE)")
    from agents.evaluation import evaluate_base, format_eval  # heavy: agents.track imports metaworld

    config = dict(_parse_sets(args.set))
    _writable_folders(None, None)
    if args.out:
        check_writable_dir(Path(args.out).parent, "--out")
    result = evaluate_base(args.pretrained, config)
    print(format_eval(result), flush=True)
    if args.out:
        from harness import provenance  # heavy: harness.provenance imports torch

        doc = {**provenance.stamp(_command("eval rl --pretrained", str(args.pretrained), sets=args.set),
                                  result["device"]), **result}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps(doc, indent=1, default=str) + "\n")
        print(f"[eval] written to {args.out}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from harness import provenance  # heavy: harness.provenance imports torch

    if args.track == "methods":
        from harness.bench_methods import bench_methods  # heavy: harness.bench_methods imports torch

        config: dict[str, Any] = dict(_parse_sets(args.set))
        result = bench_methods(config)
    elif args.track == "share":
        from agents.bench_share import bench_share  # heavy: pydantic settings, not for --help

        config = dict(_parse_sets(args.set))
        result = bench_share(config)
    elif args.track == "scale":
        from agents.bench_scale import bench_scale  # heavy: pydantic settings, not for --help

        config = dict(_parse_sets(args.set))
        result = bench_scale(config)
    elif args.track == "selection":
        from harness.bench_selection import bench_selection  # heavy: pydantic settings, not for --help

        config = dict(_parse_sets(args.set))
        result = bench_selection(config)
    else:  # a track's own bench
        if args.track not in track_names():
            raise ConfigError(choices_message("bench", args.track, [*track_names(), "methods", "share", "scale", "selection"]))
        track, settings = _track_settings(args)
        config = settings.model_dump()
        result = track.bench(settings)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {"bench": args.track, **provenance.stamp(_command("bench", args.track, sets=args.set), device),
           "config": config, "result": result}
    text = json.dumps(doc, indent=1, default=str)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
        print(f"[bench] written to {out}", file=sys.stderr)
    print(text)
    return 0


def cmd_leaderboard(args) -> int:
    from harness.leaderboard import board_files  # heavy: harness.leaderboard imports pandas
    from harness.site import render  # heavy: harness.site imports pandas

    out = Path(args.out)
    if not board_files(out):
        raise ConfigError(f"no leaderboard CSVs in {out}/: run a sweep first (python -m harness sweep)")
    for p in render(out):
        print(p)
    if args.screenshots is not None:
        from harness.site.browser import screenshots  # heavy: harness.site.browser imports pandas

        for p in screenshots(out, args.screenshots or None):
            print(p)
    return 0


def cmd_costs(args) -> int:
    from harness.costs import COST_KEYS, cost_table, format_costs, trial_costs  # heavy: tables need pandas

    by = tuple(k.strip() for k in args.by.split(",") if k.strip())
    allowed = ("sweep", *COST_KEYS, "task", "wave", "status", "device")
    if not by or any(k not in allowed for k in by):
        raise ConfigError(f"--by {args.by!r}: group by a comma-joined list of {', '.join(allowed)} "
                          "(default study,stage,method)")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".csv", ".json", ".md"):
        raise ConfigError(f"--out {args.out!r}: the file's name must end in .csv, .json or .md")
    if args.overheads and Path(args.overheads).suffix != ".json":
        raise ConfigError(f"--overheads {args.overheads!r}: the file's name must end in .json")
    plan = None
    if args.plan:  # a bad sweep file or GPU count is named before any record is read
        from harness.plan import plan_sweep, priced_gpus  # heavy: the sweep schema, not for --help
        from harness.sweep_file import load_sweep  # heavy: the sweep schema, not for --help

        gpus, name = priced_gpus(args.gpus, None, args.gpu_model)
        waves, said = plan_sweep(load_sweep(args.plan, args.set, None, confirmed=True), gpus, name)  # priced, never run
        plan = (waves, f"{args.plan} on {gpus} x {name}; {said}")
    spent = trial_costs(args.results)
    table = cost_table(spent, by)
    print(format_costs(table))
    if args.phases:
        from harness.costs import phase_table  # heavy: tables need pandas

        phases = phase_table(spent, tuple(k for k in by if k != "method") or ("study", "stage"))
        print("\nWhere the finished trials' time went (% of their wall time; process_start_s: worker start-ups "
              "before the trials that began a process; idle_pct: the span's share with no trial training on a "
              "device):")
        print(phases.to_string(index=False) if len(phases) else "(no record carries a timing block)")
    if plan is not None:
        from harness.costs import against_plan  # heavy: tables need pandas

        print(f"\nPlan ({plan[1]}) against the records:")
        print(against_plan(spent, plan[0]).to_string(index=False))
    if args.overheads:
        from harness.costs import trial_overheads  # heavy: the costs module's tables need pandas

        measured = {"source": f"the records under {args.results}",
                    "command": _command("costs", str(args.results), "--overheads", args.overheads),
                    **trial_overheads(spent)}
        target = Path(args.overheads)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(measured, indent=1) + "\n")
        print(f"[costs] overheads written to {target}", file=sys.stderr)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        text = {".csv": lambda: table.to_csv(index=False), ".json": lambda: table.to_json(orient="records", indent=1),
                ".md": lambda: table.to_markdown(index=False) + "\n"}[out.suffix]()
        atomic_write_text(out, text)
        print(f"[costs] written to {out}", file=sys.stderr)
    return 0


def cmd_methods(args) -> int:
    if args.count:
        from harness.counting import count_methods, format_rows, rows_json  # heavy: harness.counting imports torch

        if "backbone" in get_track(args.track).Settings.model_fields and not (args.backbone or args.sweep):
            raise ConfigError(f"methods --count on the {args.track} track needs --backbone NAME (e.g. a timm ViT, "
                              "vit_base_patch16_224) or --sweep FILE")
        rows = count_methods(args.track, args.backbone, args.methods.split(",") if args.methods else None,
                             args.set, args.sweep, args.classes)
        print(rows_json(rows) if args.json else format_rows(rows))
        return 0
    for name in method_names():
        try:
            m = get_method(name)
        except ImportError as e:
            print(f"{name:10s} (not available: {e})")
            continue
        print(f"{name:10s} {m.summary}")
        for key, s in m.all_settings().items():
            choices = f" {list(s.choices)}" if s.choices else ""
            print(f"    {key:16s} default {s.default!r:10s} {s.help}{choices}")
    return 0


def cmd_tasks(args) -> int:
    for name in track_names():
        for bench in get_track(name).benchmarks.values():
            count = "tasks found on disk" if bench.task_pattern is not None else f"{len(bench.tasks)} tasks"
            print(f"{name}/{bench.name} ({count}, {bench.data_source} data, ranked by "
                  f"{bench.primary_metric}, {'higher' if bench.higher_is_better else 'lower'} is better)")
            if bench.task_pattern is not None:
                print(f"    any task name matching {bench.task_pattern} (e.g. a folder under data_root)")
                continue
            for line in ([f"{g}: {', '.join(ts)}" for g, ts in bench.groups.items()] or [", ".join(bench.tasks)]):
                print(f"    {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sweep", help="run a sweep file through Ray Tune (default: sweeps/quickstart.yaml)")
    s.add_argument("file", nargs="?", default=DEFAULT_SWEEP)
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    s.add_argument("--address", default=None, help="address of an existing Ray cluster (e.g. auto or ray://host:10001)")
    s.add_argument("--results", default="results", help="folder for Ray Tune results (default: results)")
    s.add_argument("--leaderboard", default="leaderboard", help="folder for leaderboard CSVs (default: leaderboard)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep key, e.g. budget.steps=200 or seeds=[0]")
    s.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    s.add_argument("--yes", action="store_true",
                   help="run a sweep of more than 10,000 trials (refused without it, with its count)")
    s.add_argument("--only", default=None, metavar="STUDY", help="run only this study of a multi-study file")
    s.add_argument("--cpus", type=int, default=None, metavar="N",
                   help="cores the local Ray instance may give trials (default: every core)")
    s.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="GPUs the local Ray instance may give trials, the first N visible (default: every GPU)")
    s.add_argument("--plan", action="store_true",
                   help="print trials, updates, GPU-hours and wall time per study, stage and wave, from measured "
                        "per-update costs (--gpus N, or the cluster's with --address); runs nothing")
    s.add_argument("--selection-only", action="store_true",
                   help="run only the selection stage of select-then-final studies, print the settings chosen and "
                        "stop (no board changes); --resume later trains the final stage")
    s.add_argument("--gpu-model", default=None, metavar="NAME",
                   help="with --plan: price on this GPU model (e.g. 'NVIDIA H200') instead of this machine's")
    s.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("run", help="run one trial without Ray")
    r.add_argument("--track", required=True)
    r.add_argument("--benchmark", required=True)
    r.add_argument("--task", required=True)
    r.add_argument("--method", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=None, help="cap the training updates")
    r.add_argument("--data-root", default=None)
    r.add_argument("--backbone", default=None)
    r.add_argument("--weights", default=None)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting, track setting or budget key (prefix method./settings./budget. to be explicit)")
    r.add_argument("--json", action="store_true", help="print the trial record as JSON on the last line")
    r.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first: methods and tracks from outside the project; repeatable")
    r.set_defaults(fn=cmd_run)

    for name, fn, helptext in (("pretrain", cmd_pretrain, "pretrain a track's backbone (cached)"),
                               ("data", cmd_data, "generate a track's datasets (cached)")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("track", help=f"a registered track ({', '.join(TRACKS)}, or a plugin's)")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a track setting")
        if name == "data":
            c.add_argument("--tasks", nargs="*", default=None)
            c.add_argument("--report", action="store_true",
                           help="rl: per task and noise level, the expert's last-step / any-step success and "
                                "return range (default tasks: all 50), printed and written to --out")
            c.add_argument("--out", default=None, metavar="DIR",
                           help="with --report: folder for rl-data-report.json and .csv (default: results)")
        if name == "pretrain":
            c.add_argument("--curve", default=None, metavar="FILE",
                           help="rl: write the time-to-quality curve (MT40 success at each of pretrain_eval_at and "
                                "at the end, against updates and seconds) to this JSON; a rerun resumes it")
            c.add_argument("--export", default=None, metavar="FILE.safetensors",
                           help="rl: also write the pretrained DT as a shareable base file (+ FILE.sha256); "
                                "trials load it with --set pretrained=FILE")
        c.set_defaults(fn=fn)

    ev = sub.add_parser("eval", help="score an exported base (pretrain rl --export FILE) in the simulator, "
                                     "without pretraining (cached)")
    ev.add_argument("track", help="rl")
    ev.add_argument("--pretrained", required=True, metavar="FILE.safetensors", help="the base file")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="tasks=[a,b] (default: the file's), eval_episodes=N (default 10), eval_seed=N, "
                         "return_target=RULE (max, mean, quantile:Q, success_max, success_mean, success_quantile:Q), "
                         "eval_workers, data_workers, device")
    ev.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON here")
    ev.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="measure training and rollout speed")
    b.add_argument("track", metavar="TRACK|methods|share|scale|selection",
                   help=f"a track ({', '.join(TRACKS)}): its loop against a plain one; methods: every method's step on one "
                        "model; share: N RL fine-tuning trials sharing one GPU through Ray Tune; scale: one CW10 "
                        "sweep on 1, 2, 4, 8 GPUs of this host; selection: a study's selection grid in full and "
                        "under its scheduler (updates spent, settings chosen)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--out", default=None, metavar="FILE", help="also write the JSON (with device and versions) here")
    b.set_defaults(fn=cmd_bench)

    lb = sub.add_parser("leaderboard", help="render markdown tables, plots and the static site (index.html) from the leaderboard CSVs")
    lb.add_argument("--out", default="leaderboard")
    lb.add_argument("--screenshots", nargs="?", const="", default=None, metavar="BOARD",
                    help="also photograph each board's table and Pareto plot (or BOARD's) in headless Chromium "
                         "into <out>/<board>-table.png and -pareto.png")
    lb.set_defaults(fn=cmd_leaderboard)

    co = sub.add_parser("costs", help="what a sweep cost per study, stage and method (updates, GPU-minutes, "
                        "ms/update, memory), from its trials' records; works while it runs or after an interruption")
    co.add_argument("results", nargs="?", default="results", help="the sweep's --results folder (default: results)")
    co.add_argument("--by", default="study,stage,method", metavar="KEYS",
                    help="group by these comma-joined keys (also sweep, task, wave, status, device)")
    co.add_argument("--out", default=None, metavar="FILE", help="also write the table here (.csv, .json or .md)")
    co.add_argument("--phases", action="store_true",
                    help="also where the trials' time went: setup, compilation, training, evaluations, start-ups")
    co.add_argument("--overheads", default=None, metavar="FILE",
                    help="also write the trials' measured overheads per stage and method (start-up, wrap, "
                         "compilation, search, save) as JSON: the trial_overhead entry of benchmarks/update-costs.json "
                         "that --plan prices them from")
    co.add_argument("--plan", default=None, metavar="SWEEP_FILE",
                    help="also price the sweep file as `sweep --plan` does and show plan beside spending per stage")
    co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --plan: the --set overrides the sweep ran with")
    co.add_argument("--gpus", type=int, default=None, help="with --plan: the GPUs it ran on (default: this host's)")
    co.add_argument("--gpu-model", default=None, help="with --plan: the GPU model it ran on (default: this host's)")
    co.set_defaults(fn=cmd_costs)

    me = sub.add_parser("methods", help="list every method with its settings; --count: their parameters on a backbone")
    me.add_argument("--count", action="store_true",
                    help="print each method's trainable parameters (head apart) on --backbone, without training")
    me.add_argument("--backbone", default=None, help="timm model name (random weights, nothing downloaded)")
    me.add_argument("--track", default="vision", help=f"with --count: the track whose model is counted "
                    f"({', '.join(TRACKS)}, or a plugin's; default vision)")
    me.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import this module first (its @register_method methods are listed too); repeatable")
    me.add_argument("--sweep", default=None, metavar="FILE", help="count at this sweep's settings and grids")
    me.add_argument("--methods", default=None, metavar="A,B", help="only these methods (comma-joined)")
    me.add_argument("--classes", type=int, default=100, help="width of the task head (counted apart)")
    me.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a track setting (adapter_targets, alpha_rule, ...) or method setting (r, k, ...)")
    me.add_argument("--json", action="store_true", help="print the counts as JSON")
    me.set_defaults(fn=cmd_methods)
    t = sub.add_parser("tasks", help="list benchmarks and tasks")
    t.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first (its tracks are listed too); repeatable")
    t.set_defaults(fn=cmd_tasks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "plugin", None):
            load_plugins(args.plugin, "--plugin")
        return args.fn(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command with --resume to continue; finished trials are kept",
              file=sys.stderr)
        return 130

"""MT40 pretraining: data for the pretraining tasks, one DT trained on windows mixing the tasks, cached.

The checkpoint is cached (kind ``rl-pretrain``) under a key made of the data settings, the model
config, the optimiser settings, the number of updates and the seed; ``base_key`` (a hash of that key)
names the frozen base model that adapters are trained on, so EigenLoRA only ever combines adapters of
the same base. An interrupted pretraining resumes from its last checkpoint (kept outside the final
entry until it is complete).

Time to quality: given update counts (``eval_at``), the run stops at each, scores MT40 (last-step and
any-step success over the same episodes every time, all tasks' rollouts in parallel with one batched
forward per step) and appends a point to its curve: updates, seconds of data generation plus training
since the run began (evaluations and restarts left out), success. The partial checkpoint carries the
curve, the clock and the batch sampler's random state, so a run killed mid-way and started again
continues the same curve; a checkpoint is written at every curve point and at most
``CHECKPOINT_S`` seconds of training apart, so a killed call loses at most that much.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.cache import ArtifactCache, atomic_write_text, file_sha256, settings_hash
from harness.errors import ConfigError
from harness.progress import progress
from harness.randomness import derive_seed, deterministic_kernels_within, seeded
from harness.training import LoopConfig, Trainer, pick_device, synchronize
from agents.data import DataSettings, Episodes, WindowSampler, build_datasets, say
from agents.dt import DTConfig, DecisionTransformer, batch_loss
from agents.return_targets import PAPERS_RULE, return_target
from agents.rollout import TaskPools, evaluate_dt_tasks
from agents.tasks import MT40, check_task

CHECKPOINT_S = 120.0  # at most this much training between partial checkpoints
KIND = "rl-pretrain"
EVAL_KIND = "rl-eval"
WEIGHTS = "model.pt"


@dataclass(frozen=True)
class OptimPlan:
    """The optimiser schedule of the DT (pretraining, and the defaults of fine-tuning)."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 4000  # shortened to steps // 10 for short runs (see effective_warmup)
    min_lr_ratio: float = 0.01  # the cosine's floor, x lr (harness.training.Schedule)
    grad_clip: float = 0.25
    batch_size: int = 128
    compile: bool = False
    # torch.compile's mode where ``compile`` (the rl track's ``pretrain_compile_mode``): ``reduce-overhead``
    # replays the update as CUDA graphs; like ``compile``, not in the key
    compile_mode: str = "default"
    # torch's deterministic kernels (the study's ``deterministic``): a base pretrained afresh on a GPU then has
    # the same bits every time, so a sweep on an empty cache repeats its records; like ``compile``, not in the key
    deterministic: bool = False
    report_every: int = 50

    def effective_warmup(self) -> int:
        """The papers warm up 4000 updates in runs of 100K-1M; a run of a few hundred (the quickstart)
        would never leave warm-up, so at most a tenth of the run is warm-up."""
        return min(self.warmup, self.steps // 10)


@dataclass(frozen=True)
class PretrainPlan:
    """Everything that defines a pretrained DT."""

    tasks: tuple[str, ...]
    data: DataSettings
    model: DTConfig
    train: OptimPlan
    seed: int = 0

    def key(self) -> dict[str, Any]:
        t = self.train
        return {"tasks": list(self.tasks), "data": self.data.key("*"), "model": self.model.to_dict(),
                "train": {"steps": t.steps, "lr": t.lr, "weight_decay": t.weight_decay, "warmup": t.warmup,
                          "min_lr_ratio": t.min_lr_ratio, "grad_clip": t.grad_clip, "batch_size": t.batch_size},
                "seed": self.seed}

    def base_key(self) -> str:
        return settings_hash(self.key())[:16]


@dataclass
class Pretrained:
    path: Path  # the weights file
    base_key: str
    info: dict[str, Any]


def load_model(path: Path, cfg: DTConfig, device: torch.device | str = "cpu") -> DecisionTransformer:
    """The DT of ``cfg`` with the weights of ``path`` (a cached ``model.pt`` or an exported ``.safetensors``)."""
    model = DecisionTransformer(cfg)
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


@dataclass
class CurveEval:
    """What a pretraining scores at each of ``at`` (update counts): MT40 success over ``episodes`` episodes
    per task (evaluation seed ``seed``, each task's return target by ``target_rule``,
    ``agents.return_targets``), written to ``path`` (JSON) after every point when given."""

    at: tuple[int, ...]
    episodes: int = 10
    workers: int = 1
    seed: int = 0
    path: Path | None = None
    target_rule: str = PAPERS_RULE
    points: list[dict[str, Any]] = field(default_factory=list)


def _save_partial(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                  extra: dict[str, Any]) -> None:
    """``harness.training.save_checkpoint``'s format plus the run's clock, curve and random states."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, **extra}, tmp)
    os.replace(tmp, path)


def _read_partial_extras(path: Path) -> dict[str, Any]:
    """The clock, curve and random states of a partial checkpoint (empty when absent or unreadable:
    the loop then starts over, as :func:`harness.training.resume_checkpoint` does)."""
    if not path.is_file():
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the trainer discards an unreadable checkpoint with a warning
        return {}
    return {k: state[k] for k in ("clock_s", "data_s", "curve", "sampler_rng", "torch_rng", "cuda_rng", "calls")
            if k in state}


def _write_curve(curve: CurveEval, plan: "PretrainPlan", extra: dict[str, Any]) -> None:
    if curve.path is None:
        return

    doc = {"base_key": plan.base_key(), "plan": plan.key(), "eval_episodes": curve.episodes,
           "eval_seed": curve.seed, "return_target": curve.target_rule, "eval_at": list(curve.at),
           "points": curve.points, **extra}
    Path(curve.path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(curve.path), json.dumps(doc, indent=1, default=str) + "\n")


def pretrain(plan: PretrainPlan, device: torch.device | None = None, data_workers: int | None = None,
             cache: ArtifactCache | None = None, log: Callable[[str], None] | None = None,
             curve: CurveEval | None = None) -> Pretrained:
    """Build (or reuse) the pretrained DT of ``plan``; with ``curve``, score MT40 at its update counts."""
    cache = cache or ArtifactCache()
    log = log or say
    started = time.perf_counter()
    if not plan.tasks:
        raise ConfigError(f"pretraining needs at least one task; MT40 is: {', '.join(MT40)}")
    for t in plan.tasks:
        check_task(t)
    key = plan.key()
    name = f"dt-{len(plan.tasks)}tasks"
    found = cache.lookup(KIND, name, key)
    if found is not None:
        info = json.loads(found.file("info.json").read_text())
        if curve is not None:
            curve.points[:] = info.get("curve", [])
            missing = sorted(set(curve.at) - {p["updates"] for p in curve.points})
            if missing:
                log(f"[rl-pretrain] this pretraining is cached ({found.path}); its curve has no point at "
                    f"{missing} (only a new run can add them: change a setting, or remove the entry)")
            # points from before the rule existed were scored with max
            other = sorted({p.get("return_target", PAPERS_RULE) for p in curve.points} - {curve.target_rule})
            if other:
                log(f"[rl-pretrain] the cached curve's points were scored with return target {', '.join(other)}, "
                    f"not {curve.target_rule}; each point says which (score the final model with `eval rl`)")
            _write_curve(curve, plan, {"cached": True})
        return Pretrained(found.file(WEIGHTS), plan.base_key(), info)
    device = device or pick_device("auto")
    partial = cache.root / KIND / ".partial" / f"{plan.base_key()}.pt"
    resumed = _read_partial_extras(partial)
    data_started = time.perf_counter()
    paths = build_datasets(list(plan.tasks), plan.data, data_workers, cache, log)
    episodes = [Episodes.load(paths[t]) for t in plan.tasks]
    sampler = WindowSampler(episodes, plan.model.context, seed=plan.seed, device=device)
    # what the data cost the run that began it (a resumed call finds the data cached)
    data_s = float(resumed.get("data_s", time.perf_counter() - data_started))
    rule = curve.target_rule if curve is not None else PAPERS_RULE
    targets = {t: return_target(e, rule).value for t, e in zip(plan.tasks, episodes)}
    del episodes
    with seeded(derive_seed(plan.seed, "init")):
        model = DecisionTransformer(plan.model).to(device)
    # Resumable: the partial checkpoint sits beside the cache entries, under the same key.
    log(f"[rl-pretrain] {plan.model.describe()}, {model.num_params() / 1e6:.2f}M params, "
        f"{plan.train.steps} updates on {len(plan.tasks)} task(s), device {device}")
    every = max(1, plan.train.report_every)

    bar = progress(plan.train.steps, "rl-pretrain", unit="update")

    def report(m: dict[str, Any]) -> None:
        bar.update_to(m["update"], loss=m["loss"])
        if m["update"] % (every * 10) == 0 or m["update"] == plan.train.steps:
            log(f"[rl-pretrain] update {m['update']}/{plan.train.steps} loss {m['loss']:.4f}")

    t = plan.train
    # checkpoints are written here (with the clock and the curve), not by the loop; it only resumes
    cfg = LoopConfig(steps=t.steps, lr=t.lr, weight_decay=t.weight_decay, warmup=t.effective_warmup(),
                     min_lr_ratio=t.min_lr_ratio, grad_clip=t.grad_clip, compile=t.compile, compile_mode=t.compile_mode,
                     report_every=t.report_every, checkpoint=partial, checkpoint_every=0)
    points = sorted({p for p in (curve.at if curve else ()) if p <= t.steps} | ({t.steps} if curve else set()))
    if curve is not None:
        curve.points[:] = [p for p in resumed.get("curve", []) if p["updates"] in points]
    calls = int(resumed.get("calls", 0)) + 1
    with seeded(derive_seed(plan.seed, "dropout")), deterministic_kernels_within(t.deterministic), bar:
        trainer = Trainer(model, batch_loss, lambda: sampler.sample(t.batch_size), cfg, device, report=report)
        if trainer.step_index and "sampler_rng" in resumed:  # the batches an uninterrupted run would draw
            sampler.generator.set_state(resumed["sampler_rng"].to(sampler.generator.get_state().device))
            torch.set_rng_state(resumed["torch_rng"])
            if device.type == "cuda" and resumed.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        clock0 = float(resumed.get("clock_s", data_s)) if trainer.step_index else data_s
        if trainer.step_index:
            log(f"[rl-pretrain] resumed at update {trainer.step_index} ({clock0:.0f}s of data and training so far)")
        pools = None
        train_s, last_save = 0.0, time.perf_counter()

        def extras() -> dict[str, Any]:
            return {"clock_s": clock0 + train_s, "data_s": data_s, "calls": calls,
                    "curve": list(curve.points) if curve else [],
                    "sampler_rng": sampler.generator.get_state().cpu(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

        try:
            while True:
                # a point is scored when the loop stands at it, also right after a resume
                done = trainer.step_index
                if curve is not None and done in points and not any(p["updates"] == done for p in curve.points):
                    _save_partial(partial, model, trainer.optimizer, done, extras())
                    if pools is None:
                        pools = TaskPools(plan.tasks, curve.episodes, curve.workers, curve.seed,
                                          plan.data.episode_length)
                    point = _curve_point(model, pools, targets, device, done, clock0 + train_s, data_s, calls, rule)
                    curve.points.append(point)
                    log(f"[rl-pretrain] update {done}: MT40 success {point['success']:.3f} (any-step "
                        f"{point['success_any']:.3f}) after {clock0 + train_s:.0f}s of data and training; "
                        f"evaluation {point['eval_s']:.0f}s")
                    _save_partial(partial, model, trainer.optimizer, done, extras())
                    _write_curve(curve, plan, {"complete": False})
                    last_save = time.perf_counter()
                elif 0 < done < t.steps and time.perf_counter() - last_save >= CHECKPOINT_S:
                    _save_partial(partial, model, trainer.optimizer, done, extras())
                    last_save = time.perf_counter()
                tick = time.perf_counter()
                if not trainer.step():
                    break
                nxt = trainer.step_index
                if (curve is not None and nxt in points) or time.perf_counter() - last_save >= CHECKPOINT_S:
                    synchronize(device)  # the clock of a point or checkpoint counts the queued GPU work
                train_s += time.perf_counter() - tick
        finally:
            if pools is not None:
                pools.close()
        stats = trainer.finish()
    info = {"base_key": plan.base_key(), "final_loss": stats.final_loss, "steps_per_s": stats.steps_per_s,
            "wall_s": stats.wall_s, "resumed_from": stats.resumed_from, "params": model.num_params(),
            # how the updates ran, for reading steps_per_s: "" when not compiled (CPU, or compile off)
            "compile_mode": t.compile_mode if stats.compiled_step else "",
            "losses": stats.losses, "tasks": list(plan.tasks), "model": plan.model.to_dict(),
            "data_s": data_s, "clock_s": clock0 + train_s, "calls": calls,
            "curve": list(curve.points) if curve else []}

    def build(folder: Path) -> None:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS)
        (folder / "info.json").write_text(json.dumps(info, indent=1))

    art = cache.get_or_build(KIND, name, key, build)
    partial.unlink(missing_ok=True)
    if curve is not None:
        _write_curve(curve, plan, {"complete": True})
    log(f"[rl-pretrain] done: loss {stats.final_loss:.4f}, {stats.steps_per_s:.1f} updates/s, {stats.wall_s:.0f}s")
    return Pretrained(art.file(WEIGHTS), plan.base_key(), info)


def _curve_point(model: torch.nn.Module, pools, targets: dict[str, float], device: torch.device, updates: int,
                 clock: float, data_s: float, calls: int, rule: str = PAPERS_RULE) -> dict[str, Any]:
    started = time.perf_counter()
    results = evaluate_dt_tasks(model, pools, targets, device)
    model.train()
    per_task = {t: {"success": r.success, "success_any": r.success_any, "return": r.return_mean}
                for t, r in results.items()}
    mean = {m: float(sum(r[m] for r in per_task.values()) / len(per_task)) for m in ("success", "success_any", "return")}
    return {"updates": updates, "wall_s": round(clock, 2), "data_s": round(data_s, 2),
            "train_s": round(clock - data_s, 2), "eval_s": round(time.perf_counter() - started, 2), "calls": calls,
            "return_target": rule, **mean, "tasks": per_task}


def cached_eval(cache: ArtifactCache, name: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A small JSON result (rollout scores) cached like any artifact, so it is computed once."""
    def build(folder: Path) -> None:
        (folder / "result.json").write_text(json.dumps(compute(), indent=1))

    return json.loads(cache.get_or_build(EVAL_KIND, name, key, build).file("result.json").read_text())



# --- shareable bases: one safetensors file ------------------------------------------------------------
#
# The file holds the DT's tensors and, in the safetensors header's string metadata, everything that made
# it and what it scores: ``format``, ``base_key`` (the hash of the pretraining plan: adapters trained on
# this file join EigenLoRA banks only with adapters of the same base), ``model`` (DTConfig), ``data``,
# ``train`` and ``tasks`` (the plan), ``eval`` (its MT40 evaluation) and ``tensors_sha256`` (a digest of
# the tensors in name order). Beside it, ``<file>.sha256`` holds the whole file's digest in
# ``sha256sum`` format, so the file can be checked with standard tools before it is loaded.

BASE_FORMAT = "harness-dt-base/1"


def _tensors_digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export_base(pre: Pretrained, plan: PretrainPlan, evaluation: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """Write the pretrained DT ``pre`` as one safetensors file at ``path`` (plus ``<path>.sha256``);
    returns the file's description (path, sha256, base_key)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"--export {str(path)!r}: the base file's name must end in .safetensors")
    state = {k: v.contiguous() for k, v in torch.load(pre.path, map_location="cpu", weights_only=True).items()}
    meta = {"format": BASE_FORMAT, "base_key": pre.base_key, "tensors_sha256": _tensors_digest(state),
            **{k: json.dumps(v, default=str) for k, v in plan.key().items() if k in ("data", "train", "tasks", "seed")},
            "model": json.dumps(plan.model.to_dict()), "eval": json.dumps(evaluation or {}, default=str),
            "curve": json.dumps(pre.info.get("curve", []), default=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    digest = file_sha256(path)
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return {"file": str(path), "sha256": digest, "base_key": pre.base_key, "label": base_label(path, digest)}


def base_label(path: Path, digest: str) -> str:
    """How rows name a base file: its name and the first 8 hex digits of its sha256."""
    return f"{Path(path).name}@{digest[:8]}"


@dataclass(frozen=True)
class BaseFile:
    """A validated base file (:func:`read_base`)."""

    path: Path
    sha256: str
    base_key: str
    model: DTConfig
    metadata: dict[str, Any]

    @property
    def label(self) -> str:
        return base_label(self.path, self.sha256)


def read_base(path: str | Path, expected: DTConfig | None = None, key: str = "pretrained") -> BaseFile:
    """Open and verify a base file before any compute: it exists, is a safetensors file of this format,
    its sha256 matches ``<file>.sha256`` (when present) and its tensors their digest, its DT config equals
    ``expected`` (the study's) and every tensor has the shape that config gives. Each failure is a
    ConfigError naming the setting ``key``, the file and what would be valid."""
    p = Path(path).expanduser()
    where = f"setting {key!r}={str(path)!r}"
    if not p.is_file():
        raise ConfigError(f"{where}: no such file (a base written by `python -m harness pretrain rl --export FILE`)")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same to the user
        raise ConfigError(f"{where}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if raw.get("format") != BASE_FORMAT:
        raise ConfigError(f"{where}: not a harness DT base (metadata format {raw.get('format')!r}, "
                          f"expected {BASE_FORMAT!r})")
    digest = file_sha256(p)
    side = p.with_name(p.name + ".sha256")
    if side.is_file():
        want = side.read_text().split()[0] if side.read_text().split() else ""
        if want != digest:
            raise ConfigError(f"{where}: checksum mismatch: the file's sha256 is {digest}, {side.name} says "
                              f"{want or '(empty)'}; the file was changed or damaged after export")
    if _tensors_digest(state) != raw.get("tensors_sha256"):
        raise ConfigError(f"{where}: the tensors do not match the digest in the file's metadata; the file was "
                          "changed or damaged after export")
    try:
        meta = {k: (json.loads(v) if k not in ("format", "base_key", "tensors_sha256") else v) for k, v in raw.items()}
        model = DTConfig(**meta["model"])
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: unreadable settings in the file's metadata ({e})") from e
    if expected is not None:
        # dropout and the residual stream's dtype are how a run trains, not what the weights are
        diff = {k: (v, getattr(expected, k)) for k, v in asdict(model).items()
                if k not in ("dropout", "residual_dtype") and v != getattr(expected, k)}
        if diff:
            raise ConfigError(f"{where}: the file's DT differs from the study's settings: "
                              + ", ".join(f"{k}: file {a!r}, settings {b!r}" for k, (a, b) in diff.items())
                              + "; set them as the file has them, or drop 'pretrained'")
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in DecisionTransformer(expected).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != shapes:
            bad = sorted(set(got) ^ set(shapes)) or sorted(k for k in got if got[k] != shapes[k])
            detail = ", ".join(f"{k}: file {got.get(k)}, expected {shapes.get(k)}" for k in bad[:4])
            raise ConfigError(f"{where}: tensor shapes do not fit the study's DT ({model.describe()}): {detail}")
    return BaseFile(p, digest, str(raw.get("base_key", "")), model, meta)

"""What the trials that one process runs one after another share, and what they must not (issue 20, item 4).

Under Ray Tune a process is a trial's actor. With actor reuse (``TuneConfig(reuse_actors=True)``, which
Ray 2.60 supports for function trainables through ``FunctionTrainable.reset_config``) the next trial of a
wave with the same resources runs in the actor the last one finished in: no new worker process, no second
import of torch, Ray, MuJoCo and the harness. The sweep driver turns it on, for trials on the CPU and on a GPU,
CUDA-graph trials included, unless :data:`REUSE_ENV` says otherwise (:func:`reuse_actors`).

What a later trial in the same process reuses, and why its record stays what a fresh process would give:

- **The pretrained base's weights** (:func:`base_state`): read from disk once per process, kept on the
  CPU, and copied into each trial's freshly built model (``load_state_dict`` copies, so no trial can
  change what the next one starts from). Keyed by the file's path, size and modification time.
- **Compiled kernels** (:func:`use_shared_compile_cache`): torch's inductor keeps an FX-graph and an
  AOT-autograd cache on disk by default, under ``$TMPDIR/torchinductor_$USER`` (``/tmp``). The harness
  points ``TORCHINDUCTOR_CACHE_DIR`` at ``<harness cache>/compile/inductor`` instead (unless the user set
  it): a folder that lives as long as the rest of the cache, so a later sweep, another process of the
  host, or a node that mounts the same cache finds the kernels compiled already. The cache's key holds
  torch's version, the device, the graph and the deterministic-kernel setting, so a hit is the same code.

Every trial of a process runs on the same thread (:func:`on_trial_thread`), not the new thread Ray gives
each trial: torch keeps CUDA graphs per thread, and one thread lets :func:`begin_trial` free the previous
trial's graphs before the next one records its own.

What each trial gets afresh: its own dynamo frame. Each trainer compiles its loss in a code object of its
own (``harness.training.own_frame``), so a trial never starts from the previous trial's shape decisions
(a frame that saw two batch sizes is recompiled with dynamic shapes) nor runs eagerly past
``torch._dynamo.config.recompile_limit`` frames: the kernels a fresh process would run, the same last
bits. Re-tracing is cheap next to inductor's compile, which the on-disk cache keeps. The old frame and
its graphs go with the old trainer. :func:`begin_trial` collects the previous trial's objects and hands
the allocator's cached blocks back. It does not call ``torch._dynamo.reset()``, which it once did: that
frees dynamo's cache entries while compiled code may still hold pointers to them (pytorch/pytorch#155057,
whose fix was merged in June 2025, and #196394, open in September 2026), the likely cause of the
segmentation faults of reused GPU processes that reset dynamo. Without the reset, reused GPU processes
have run compiled trials without a fault (BENCHMARKS.md), so GPU trials reuse actors too. torch's global
random state is each trial's own already (``harness.randomness.TrialRandom.scope``). In torch's default
compile mode and under CUDA graphs, trainers of one structure share one compiled loss instead of a frame
each, unless :data:`SHARE_ENV` (or, for graphs, :data:`SHARE_GRAPHS_ENV`) turns that off
(``harness.training.SharedLoss``, which keeps what an own frame ensures; :func:`share_graphs`).
"""

from __future__ import annotations

import gc
import os
import queue
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, TypeVar

from harness.errors import ConfigError

REUSE_ENV = "HARNESS_REUSE_ACTORS"
SHARE_ENV = "HARNESS_SHARE_COMPILED"
SHARE_GRAPHS_ENV = "HARNESS_SHARE_GRAPHS"
AFFINITY_ENV = "HARNESS_TRIAL_AFFINITY"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

_trials_begun = 0
_trial_jobs: "queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict, Future]] | None" = None
_trial_thread_lock = threading.Lock()
_T = TypeVar("_T")
_states: dict[tuple[str, int, int], dict[str, Any]] = {}
_steps: dict[tuple, Any] = {}
_graph_steps: dict[tuple, Any] = {}  # shared steps bound to this process's CUDA graph trees
_trials_on_trees = 0  # trials begun since the graph trees were last reset
_trees_trusted = True  # False after a trial that failed: its graphs may have been left mid-recording
# Trials a process runs on one set of CUDA graph trees before begin_trial resets them. Each trial adds a
# recording to each shared graph, which keeps memory of its own: ~50 MiB per trial for the paper DT's
# trainer on an H200, whose step did not slow with 40 recordings kept (BENCHMARKS.md). The bound caps that
# memory (a ViT-B's full fine-tuning keeps more), for one recompilation (~2-3 s with the inductor cache
# warm) every this many trials.
GRAPH_TREE_TRIALS = 8


def reuse_actors(environ: dict[str, str] | None = None, on_gpu: bool = False) -> bool:
    """Whether a sweep's trials reuse Ray actors. :data:`REUSE_ENV` decides when set (1/true/yes/on: yes;
    0/false/no/off: every trial in a new process); anything else is a ConfigError naming the variable.

    Unset, they do, on the CPU and on a GPU alike, under CUDA graphs too (``on_gpu`` is kept for the message
    and for callers that say where the trials run). On a GPU a fresh process costs a trial its start and
    peft's import, a third of a short CW10 trial (BENCHMARKS.md). Reuse was off on GPUs while reused processes
    that reset dynamo crashed there; :func:`begin_trial` no longer resets it (the module's doc). It was off
    under ``compile_mode: reduce-overhead`` while Ray ran each trial on a thread of its own, where torch keeps
    a thread's CUDA graphs: reused processes crashed so on an H200. Every trial of a process now runs on one
    thread (:func:`on_trial_thread`), and the same trials then ran clean in reused processes with the records
    of processes of their own (BENCHMARKS.md, "Reused processes under CUDA graphs")."""
    raw = (os.environ if environ is None else environ).get(REUSE_ENV)
    return switch(REUSE_ENV, raw, True, f"actors are reused{', GPU trials included' if on_gpu else ''}")


def route_by_structure(environ: dict[str, str] | None = None) -> bool:
    """Whether a sweep hands a reused process a pending trial of the structure it just ran before any other
    (``harness.trial_routing``), so its compiled loss is reused. On unless :data:`AFFINITY_ENV` says
    0/false/no/off (then Tune's FIFO order); any other value is a ConfigError naming the variable."""
    raw = (os.environ if environ is None else environ).get(AFFINITY_ENV)
    return switch(AFFINITY_ENV, raw, True, "a reused process runs its last trial's structure first")


def switch(name: str, raw: str | None, default: bool, unset: str) -> bool:
    """An on/off environment variable's value ``raw`` (unset or blank: ``default``); anything but
    1/true/yes/on or 0/false/no/off is a ConfigError naming ``name`` and saying what unset means (``unset``)."""
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"environment variable {name}={raw!r}: expected one of {', '.join(_TRUE + _FALSE)} "
                      f"(unset: {unset})")


def share_compiled(environ: dict[str, str] | None = None) -> bool:
    """Whether the compiled trainers of one process share a compiled loss where their models have the same
    structure (:func:`shared_step`; ``harness.training.Trainer``): it skips most of a reused trial's
    compilation and gives the records of trainers with frames of their own (BENCHMARKS.md, "Reused processes
    under CUDA graphs"). On unless :data:`SHARE_ENV` says 0/false/no/off, which gives every trainer a frame of
    its own."""
    raw = (os.environ if environ is None else environ).get(SHARE_ENV)
    return switch(SHARE_ENV, raw, True, "trainers of one structure share a compiled loss")


def share_graphs(environ: dict[str, str] | None = None) -> bool:
    """Whether trainers under CUDA graphs (``compile_mode: reduce-overhead``) share a compiled loss as the
    default mode's do. On unless :data:`SHARE_GRAPHS_ENV` or :data:`SHARE_ENV` says 0/false/no/off.

    A compiled function under graphs is bound to this thread's graph-tree manager, so :func:`begin_trial`
    keeps the trees while a shared loss is bound to them, and each trial's first call re-records the graphs
    for its model's parameters (torch re-records where a parameter's address changed) beside the earlier
    trials' recordings. After :data:`GRAPH_TREE_TRIALS` trials on one set of trees it resets them and drops
    the losses bound to them, so the recordings a process keeps stay bounded. On an H200 a reused trial's
    first update fell from ~2.2 s to ~0.05 s, and the records were those of the default mode's shared loss
    (BENCHMARKS.md, "Sharing the compiled loss under CUDA graphs")."""
    raw = (os.environ if environ is None else environ).get(SHARE_GRAPHS_ENV)
    return share_compiled(environ) and switch(SHARE_GRAPHS_ENV, raw, True,
                                               "trainers under CUDA graphs share a compiled loss too")


def shared_step(key: tuple, build: Any, graphs: bool = False) -> Any:
    """The object this process keeps for ``key`` (a compiled step's structure), made by ``build()`` the
    first time. Kept until the process ends (one per structure the process's trials had), or, where it
    replays CUDA graphs (``graphs``), until :func:`begin_trial` resets the graph trees it is bound to."""
    steps = _graph_steps if graphs else _steps
    if key not in steps:
        steps[key] = build()
    return steps[key]


def on_trial_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` run on this process's trial thread, one thread for every trial the process
    runs; its result returned, its exception (``SystemExit`` included: Ray's way of stopping a trial that
    reports) raised here. The caller waits.

    Ray Tune starts each trial of a function trainable in a new thread, and torch keeps per-thread state
    that outlives a trial: the CUDA graph trees of ``compile_mode: reduce-overhead`` (``torch._inductor.
    cudagraph_trees`` holds them in thread-local storage), which a later trial in another thread can
    neither see nor free, and which the collector then frees from that other thread. On one thread every
    trial finds the previous one's graphs where :func:`begin_trial` clears them. Ray's session (``tune.
    report``, checkpoints, the trial's context) is the process's, so it works from this thread."""
    global _trial_jobs
    with _trial_thread_lock:
        if _trial_jobs is None:
            _trial_jobs = queue.SimpleQueue()
            # a daemon, as Ray's own trial threads are: a process that exits does not wait for a trial
            threading.Thread(target=_serve_trials, args=(_trial_jobs,), name="harness-trial", daemon=True).start()
    done: Future = Future()
    _trial_jobs.put((fn, args, kwargs, done))
    return done.result()


def _serve_trials(jobs: "queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict, Future]]") -> None:
    while True:
        fn, args, kwargs, done = jobs.get()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - SystemExit too (Ray stops a trial so): the caller raises it
            done.set_exception(e)
        del fn, args, kwargs, done  # nothing of a finished trial stays alive on this thread


def begin_trial() -> int:
    """Mark the start of a trial in this process; return how many trials the process ran before it.

    From the second trial on, what the previous one left behind is cleared first: the CUDA graphs its
    compiled steps recorded (this thread's graph trees, :func:`on_trial_thread`; none outside
    ``reduce-overhead``), unless a shared compiled loss is bound to them (:func:`share_graphs`), then its
    objects (collected, and on a GPU the allocator's cached blocks handed back, so the memory columns start
    near where a fresh process's would: the kept graphs, and on an H200 ~100-170 MiB per earlier trial in
    torch's default mode, still count; BENCHMARKS.md, "The memory column in reused processes")."""
    global _trials_begun, _trials_on_trees, _trees_trusted
    before = _trials_begun
    _trials_begun += 1
    if before:
        trees = sys.modules.get("torch._inductor.cudagraph_trees")
        if trees is not None:
            _trials_on_trees += 1
            if not (_graph_steps and _trees_trusted and share_graphs() and _trials_on_trees < GRAPH_TREE_TRIALS):
                _graph_steps.clear()  # compiled losses bound to the trees reset below
                trees.reset_cudagraph_trees()
                _trials_on_trees, _trees_trusted = 0, True
        gc.collect()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
    return before


def end_trial(ok: bool) -> None:
    """Mark the end of a trial in this process: one that failed (an error, not a scheduler's stop) may have
    left the CUDA graph trees in the middle of a recording or a replay, so the next :func:`begin_trial`
    resets them and drops the compiled losses bound to them instead of keeping them."""
    global _trees_trusted
    _trees_trusted = _trees_trusted and ok


def base_state(path: str | Path) -> dict[str, Any]:
    """The tensors of a pretrained base file (``.safetensors``, else a ``torch.save``d state dict), read
    once per process and kept on the CPU. Load them into a freshly built model with ``load_state_dict``
    (which copies); never change them in place. A file rewritten since (other size or modification
    time) is read again."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _states:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            import torch

            state = torch.load(p, map_location="cpu", weights_only=True)
        for old in [k for k in _states if k[0] == key[0]]:  # an older version of the same file
            del _states[old]
        _states[key] = state
    return _states[key]


def use_shared_compile_cache(cache_root: str | Path) -> Path:
    """Point torch's inductor cache at ``<cache_root>/compile/inductor`` unless :data:`INDUCTOR_ENV` names
    another folder (the user's choice wins); return the folder in use. Call before the first compile.

    torch writes its default (``$TMPDIR/torchinductor_$USER``) into :data:`INDUCTOR_ENV` the first time it
    asks for the folder, which importing peft already does: that value is torch's, not the user's."""
    chosen = os.environ.get(INDUCTOR_ENV)
    if chosen and Path(chosen) != Path(_torch_default_cache_dir()):
        return Path(chosen)
    folder = Path(cache_root) / "compile" / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_ENV] = str(folder)
    return folder


def _torch_default_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


__all__ = ["AFFINITY_ENV", "GRAPH_TREE_TRIALS", "INDUCTOR_ENV", "REUSE_ENV", "SHARE_ENV", "SHARE_GRAPHS_ENV",
           "base_state", "begin_trial", "end_trial", "on_trial_thread", "reuse_actors", "route_by_structure",
           "share_compiled", "share_graphs", "switch", "use_shared_compile_cache"]

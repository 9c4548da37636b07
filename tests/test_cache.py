"""The artifact cache: hashing, atomic builds, verification, rebuilding corrupt entries, and one build of
an entry that several processes want at once."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.cache import ArtifactCache, build_lock, cache_root, settings_hash

ROOT = Path(__file__).resolve().parents[1]


def test_hash_ignores_key_order_and_int_float_spelling():
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1.0})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "c"))
    assert cache_root() == (tmp_path / "c").resolve()


def _builder(calls):
    def build(folder):
        calls.append(folder)
        (folder / "data.bin").write_bytes(b"x" * 1000)
        (folder / "sub").mkdir()
        (folder / "sub" / "meta.json").write_text(json.dumps({"ok": True}))
    return build


def test_get_or_build_reuses_verified_entry(tmp_path):
    cache, calls = ArtifactCache(tmp_path), []
    a = cache.get_or_build("kind", "thing", {"n": 1}, _builder(calls))
    b = cache.get_or_build("kind", "thing", {"n": 1}, _builder(calls))
    assert a.path == b.path and len(calls) == 1
    assert (a.path / "data.bin").read_bytes() == b"x" * 1000
    assert json.loads((a.path / "manifest.json").read_text())["settings"] == {"n": 1}
    cache.get_or_build("kind", "thing", {"n": 2}, _builder(calls))
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "manifest-fields", "manifest-list"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, damage):
    cache, calls = ArtifactCache(tmp_path), []
    a = cache.get_or_build("kind", "thing", {"n": 1}, _builder(calls))
    target = a.path / "data.bin"
    if damage == "truncate":
        target.write_bytes(b"x" * 10)
    elif damage == "flip":
        target.write_bytes(b"y" + b"x" * 999)
    elif damage == "delete":
        target.unlink()
    elif damage == "manifest-fields":  # valid JSON, no fields
        (a.path / "manifest.json").write_text('{"kind": "kind"}')
    elif damage == "manifest-list":
        (a.path / "manifest.json").write_text('[1, 2]')
    else:
        (a.path / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        b = cache.get_or_build("kind", "thing", {"n": 1}, _builder(calls))
    assert len(calls) == 2
    assert (b.path / "data.bin").read_bytes() == b"x" * 1000


def test_failed_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)

    def broken(folder):
        (folder / "half.bin").write_bytes(b"1")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build("kind", "thing", {"n": 1}, broken)
    assert cache.lookup("kind", "thing", {"n": 1}) is None
    assert list((tmp_path / "kind").iterdir()) == []


def test_entries_and_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    from harness.cache import atomic_write_text

    old = os.umask(0o002)  # a group sharing the cache
    try:
        art = ArtifactCache(tmp_path).get_or_build("kind", "thing", {"n": 1}, _builder([]))
        atomic_write_text(tmp_path / "board.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(art.path.stat().st_mode) == 0o775
    assert stat.S_IMODE((tmp_path / "board.csv").stat().st_mode) == 0o664


# A process wanting entry kind/thing: it waits until all N have started (so their get_or_build calls overlap),
# and its build appends its pid to builds.log, touches "building", sleeps, then writes the entry's file.
BUILDER = """
import json, os, sys, time
from pathlib import Path
from harness.cache import ArtifactCache
root, shared, n, sleep_s = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
(shared / f"ready-{os.getpid()}").touch()
deadline = time.time() + 20
while len(list(shared.glob("ready-*"))) < n and time.time() < deadline:
    time.sleep(0.01)
def build(folder):
    with open(shared / "builds.log", "a") as f:
        f.write(f"{os.getpid()}\\n")
    (shared / "building").touch()
    time.sleep(sleep_s)
    (folder / "data.bin").write_bytes(b"x" * 1000)
cache = ArtifactCache(root)
art = cache.get_or_build("kind", "thing", {"n": 1}, build)
print(json.dumps({"path": str(art.path), "settings": cache.verify(art.path),
                  "data": (art.path / "data.bin").read_text()}))
"""


def _builders(tmp_path: Path, n: int, sleep_s: float) -> list[subprocess.Popen]:
    (tmp_path / "shared").mkdir(exist_ok=True)
    return [subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path / "cache"), str(tmp_path / "shared"),
                              str(n), str(sleep_s)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(n)]


def _builds(tmp_path: Path) -> list[str]:
    log = tmp_path / "shared" / "builds.log"
    return log.read_text().split() if log.exists() else []


def test_concurrent_processes_build_an_entry_once(tmp_path):
    procs = _builders(tmp_path, n=4, sleep_s=1.0)
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(json.loads(out))
    assert len(_builds(tmp_path)) == 1, f"built by processes {_builds(tmp_path)}"
    assert len({o["path"] for o in outs}) == 1
    assert all(o["settings"] == {"n": 1} and o["data"] == "x" * 1000 for o in outs)
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.lookup("kind", "thing", {"n": 1}).path == Path(outs[0]["path"])
    assert not cache.lock_path("kind", "thing", {"n": 1}).exists()  # released and removed


def test_a_builder_killed_holding_the_lock_does_not_block_the_next(tmp_path):
    import fcntl

    cache = ArtifactCache(tmp_path / "cache")
    (holder,) = _builders(tmp_path, n=1, sleep_s=60)
    try:
        deadline = time.time() + 30
        while not (tmp_path / "shared" / "building").exists() and time.time() < deadline:
            assert holder.poll() is None, holder.communicate()[1]
            time.sleep(0.02)
        assert (tmp_path / "shared" / "building").exists(), "the first builder never started building"
        with open(cache.lock_path("kind", "thing", {"n": 1})) as f:  # it builds under the entry's lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    entry = cache.entry_dir("kind", "thing", {"n": 1})
    # the killed builder's half-built folder is left behind, named after its host and pid
    (left,) = [p for p in entry.parent.glob(f".{entry.name}.*") if p.is_dir()]
    assert f"-{holder.pid}." in left.name
    # a folder of a process still alive, and one of another host, are someone's build in progress
    from harness.cache import _HOST

    alive = entry.parent / f".{entry.name}.{_HOST}-{os.getpid()}.keep"
    elsewhere = entry.parent / f".{entry.name}.otherhost-{holder.pid}.keep"
    alive.mkdir()
    elsewhere.mkdir()
    got: list = []
    calls: list = []
    worker = threading.Thread(target=lambda: got.append(cache.get_or_build("kind", "thing", {"n": 1},
                                                                           _builder(calls))), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert got, "the next builder is still waiting for the killed one's lock"
    assert len(calls) == 1 and len(_builds(tmp_path)) == 1  # the killed build, then ours
    assert not left.exists() and alive.is_dir() and elsewhere.is_dir()  # only the dead one's folder went
    assert (got[0].path / "data.bin").read_bytes() == b"x" * 1000
    assert cache.verify(got[0].path) == {"n": 1}


def test_a_long_wait_names_the_entry_and_who_builds_it(tmp_path, monkeypatch):
    import harness.cache

    monkeypatch.setattr(harness.cache, "LOCK_NOTICE_S", 0.1)
    cache, calls = ArtifactCache(tmp_path), []
    lock = cache.lock_path("kind", "thing", {"n": 1})
    lock.parent.mkdir(parents=True)
    held, release = threading.Event(), threading.Event()

    def hold():
        with build_lock(lock, "kind/thing"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    threading.Timer(0.6, release.set).start()
    who = re.escape(f"process {os.getpid()} on {socket.gethostname()}")
    entry = re.escape(cache.entry_dir("kind", "thing", {"n": 1}).name)
    with pytest.warns(UserWarning, match=f"waiting for {who} to finish building cache entry kind/{entry}"):
        art = cache.get_or_build("kind", "thing", {"n": 1}, _builder(calls))
    assert release.is_set() and len(calls) == 1  # built after the holder let go, not beside it
    assert cache.verify(art.path) == {"n": 1}
    holder.join(10)
    assert not lock.exists()

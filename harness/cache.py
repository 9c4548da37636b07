"""The artifact cache: every dataset, checkpoint and adapter, keyed by a hash of the settings that made it.

Layout: ``<root>/<kind>/<name>-<hash12>/`` holding the artifact's files plus ``manifest.json``, which
records the settings and a SHA-256 of every file. An entry is written into a temporary folder and
renamed into place, so a reader never sees a half-written entry; on load every checksum is verified and
a corrupt or truncated entry is removed and rebuilt, never used.

Several processes (trials on several GPUs or nodes) wanting the same missing entry build it once: the
builder holds an advisory lock on ``<root>/<kind>/.<entry>.lock`` (``fcntl.flock``, released by the
kernel when its holder dies, so a crash never leaves it blocking) and the others wait, then use its entry.
Where flock does nothing (some network filesystems) each builds, and the first rename wins.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.errors import ConfigError

try:
    import fcntl
except ImportError:  # not a POSIX system: builds go unlocked, the rename race still keeps entries whole
    fcntl = None  # type: ignore[assignment]

ENV_VAR = "HARNESS_CACHE"
LOCK_NOTICE_S = 5.0  # a wait for another builder longer than this is said once, naming the entry and holder


def cache_root() -> Path:
    """The cache folder: ``$HARNESS_CACHE``, else ``$XDG_CACHE_HOME/harness``, else ``~/.cache/harness``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(base) / "harness").resolve()


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 1.0 and 1 make the same artifact
    return obj


def settings_hash(settings: dict[str, Any]) -> str:
    """A stable hex digest of a settings dict (key order and int/float spelling do not matter)."""
    blob = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CorruptArtifactError(Exception):
    """A cache entry failed verification."""


@dataclass(frozen=True)
class Artifact:
    """A verified cache entry: its folder and the settings that made it."""

    path: Path
    settings: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


class ArtifactCache:
    """Get-or-build access to cached artifacts."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def entry_dir(self, kind: str, name: str, settings: dict[str, Any]) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.root / kind / f"{safe}-{settings_hash(settings)[:12]}"

    def verify(self, path: Path) -> dict[str, Any]:
        """Check an entry's manifest and checksums; return its settings or raise CorruptArtifactError."""
        manifest_path = path / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise CorruptArtifactError(f"{manifest_path}: unreadable manifest ({e})") from e
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or "settings" not in manifest or not all(
                isinstance(m, dict) and {"size", "sha256"} <= set(m) for m in files.values()):
            raise CorruptArtifactError(f"{manifest_path}: a manifest without its fields (files with size and "
                                       "sha256, settings)")
        for fname, meta in files.items():
            fpath = path / fname
            if not fpath.is_file():
                raise CorruptArtifactError(f"{fpath}: missing")
            if fpath.stat().st_size != meta["size"]:
                raise CorruptArtifactError(
                    f"{fpath}: size {fpath.stat().st_size} bytes, expected {meta['size']} (truncated?)")
            if file_sha256(fpath) != meta["sha256"]:
                raise CorruptArtifactError(f"{fpath}: checksum mismatch")
        return manifest["settings"]

    def lookup(self, kind: str, name: str, settings: dict[str, Any]) -> Artifact | None:
        """The verified entry, or None when it is absent or corrupt (a corrupt one is removed)."""
        path = self.entry_dir(kind, name, settings)
        if not path.exists():
            return None
        try:
            stored = self.verify(path)
        except CorruptArtifactError as e:
            warnings.warn(f"cache entry is corrupt and will be rebuilt: {e}", stacklevel=2)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Artifact(path, stored)

    def lock_path(self, kind: str, name: str, settings: dict[str, Any]) -> Path:
        """The lock file a builder of this entry holds: ``.<entry>.lock`` beside the entry."""
        final = self.entry_dir(kind, name, settings)
        return final.parent / f".{final.name}.lock"

    def get_or_build(
        self,
        kind: str,
        name: str,
        settings: dict[str, Any],
        build: Callable[[Path], None],
    ) -> Artifact:
        """Return the cached entry, building it with ``build(tmpdir)`` first when absent or corrupt.

        ``build`` writes its files into the given empty folder; the folder is then checksummed and renamed
        into place atomically. Concurrent callers for the same entry build it once: one holds the entry's
        lock and builds, the others wait for it and return its entry.
        """
        found = self.lookup(kind, name, settings)
        if found is not None:
            return found
        final = self.entry_dir(kind, name, settings)
        final.parent.mkdir(parents=True, exist_ok=True)
        with build_lock(self.lock_path(kind, name, settings), f"{kind}/{final.name}"):
            # Whoever held the lock before us may have just built it.
            found = self.lookup(kind, name, settings)
            if found is not None:
                return found
            remove_dead_builds(final)
            return self._build(kind, name, settings, build, final)

    def _build(self, kind: str, name: str, settings: dict[str, Any], build: Callable[[Path], None],
               final: Path) -> Artifact:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_build_prefix(final)}{_HOST}-{os.getpid()}.", dir=final.parent))
        try:
            build(tmp)
            share_tree(tmp)  # whatever wrote the files (safetensors writes 0600), they get the umask's modes
            files = {
                str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            manifest = {"kind": kind, "name": name, "settings": _canonical(settings),
                        "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, default=str))
            share_mode(tmp, directory=True)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished the same entry first (the lock was a no-op on this filesystem);
                # keep theirs if it verifies.
                shutil.rmtree(tmp, ignore_errors=True)
                found = self.lookup(kind, name, settings)
                if found is None:
                    raise
                return found
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Artifact(final, _canonical(settings))


_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def _build_prefix(final: Path) -> str:
    return f".{final.name}."


def remove_dead_builds(final: Path) -> list[Path]:
    """Remove the half-built folders of the entry ``final`` whose builder, on this host, has died.

    A builder killed mid-build (out of memory, a node taken back) leaves its temporary folder, which can
    hold a checkpoint's worth of data. Each folder is named after its builder's host and pid, so a folder
    of a process still running, or of another host (which this one cannot check), is left alone; the
    caller holds the entry's lock. Returns the folders removed."""
    removed = []
    for tmp in final.parent.glob(f"{glob.escape(_build_prefix(final))}*"):
        host, _, rest = tmp.name[len(_build_prefix(final)):].rpartition("-")
        pid = rest.split(".", 1)[0]
        if not tmp.is_dir() or host != _HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    # The holder writes "<pid> <host>" just after it takes the lock; an empty file is one caught in between.
    return f"process {text[0]} on {text[1]}" if len(text) == 2 else "another process"


def _open_lock(path: Path) -> int | None:
    # Read-write so the holder can record itself; read-only suffices for flock on a lock file another user
    # left without group write; None: no lock can be had here.
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # 0o666 under the umask: what share_mode gives
    except PermissionError:
        pass
    except OSError:
        return None
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


@contextmanager
def build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (``fcntl.flock``) for the body of a ``with``.

    Waits while another process holds it, saying once (a warning, after ``LOCK_NOTICE_S`` seconds) that it
    waits for ``what`` and for whom. The lock is released when the holder leaves the ``with`` or dies: the
    kernel drops flock locks with the process, so a killed builder never blocks the next one. The file is
    removed on release, so the cache keeps no lock files. Where no lock can be had (no ``fcntl``, a lock
    file that cannot be opened, a filesystem without flock) the body runs unlocked.
    """
    if fcntl is None:
        yield
        return
    started, told, delay = time.monotonic(), False, 0.01
    while True:
        fd = _open_lock(path)
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told and time.monotonic() - started > LOCK_NOTICE_S:
                warnings.warn(f"waiting for {_lock_holder(fd)} to finish building cache entry {what} (lock "
                              f"{path}); its entry is used once built", stacklevel=4)
                told = True
            os.close(fd)
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
            continue
        except OSError:
            os.close(fd)  # flock is not supported on this filesystem
            yield
            return
        # The holder before us removed the file after we opened it: our lock is on a file nobody else
        # opens any more, and a newcomer may be locking a new file at the same path. Start over.
        try:
            current, ours = os.stat(path), os.fstat(fd)
            stale = (ours.st_ino, ours.st_dev) != (current.st_ino, current.st_dev)
        except FileNotFoundError:
            stale = True
        if stale:
            os.close(fd)
            continue
        break
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # a read-only lock file: it still locks, the waiters just cannot name us
        yield
    finally:
        # Remove before releasing, so a waiter that gets the lock next finds it stale and starts over.
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, fsync, rename)."""
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_mode(path: Path, directory: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have under the user's umask.

    ``mkstemp``/``mkdtemp`` create files 0600 and folders 0700, which would keep a shared cache or
    leaderboard private to whoever wrote each entry. With ``umask 002`` a group shares them read-write;
    with the usual 022 others can read them.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def share_tree(folder: Path) -> None:
    """:func:`share_mode` for every file and folder under ``folder`` (not ``folder`` itself): a cache entry's
    builder writes its files however its library does (safetensors creates them 0600, through a private
    temporary file), and the entry's files must all carry the same modes as ``manifest.json``."""
    for p in Path(folder).rglob("*"):
        if not p.is_symlink():
            share_mode(p, directory=p.is_dir())


# A temporary file of an atomic write is named ``.<file>.harness-tmp.<pid>.<random>`` beside its target, so
# that a writer's leftovers (it was killed between create and rename) are recognised by their name alone and
# nothing else in a folder (a user's ``.env.local``) is ever taken for one.
TEMP_MARK = "harness-tmp"
_TEMP_NAME = re.compile(rf"^\..+\.{TEMP_MARK}\.(\d+)\.[A-Za-z0-9_]{{8}}$")


def temporary_prefix(path: Path) -> str:
    """The name prefix of ``path``'s temporaries (``mkstemp`` adds eight random characters)."""
    return f".{Path(path).name}.{TEMP_MARK}.{os.getpid()}."


def is_harness_temporary(path: Path) -> bool:
    """Whether ``path`` is named as :func:`atomic_write_bytes` names its temporaries."""
    return bool(_TEMP_NAME.match(Path(path).name))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: a temporary file beside it (:func:`temporary_prefix`), fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
    share_mode(Path(tmp))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_if_changed(path: Path, data: bytes | str) -> bool:
    """Write ``path`` atomically unless it already holds exactly ``data``; return whether it was written.
    Published files (leaderboard pages, plots, CSVs) that a run regenerates unchanged keep their bytes and
    their modification time, so a checkout shows no modified files where nothing changed."""
    data = data.encode() if isinstance(data, str) else data
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except OSError:
        pass  # unreadable: write it
    atomic_write_bytes(path, data)
    return True


def check_writable_dir(path: Path, what: str) -> Path:
    """``path`` as a folder this process can write or create, or a ConfigError saying why not: found before
    any compute, not after a trial has trained. A missing folder is not made here (a refused command leaves
    nothing behind); its nearest existing parent must be a folder this process may write."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a folder; give a folder")
    try:
        if path.is_dir():
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                pass
        else:
            parent = next(p for p in path.absolute().parents if p.exists())
            if not parent.is_dir():
                raise ConfigError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder; give a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(13, f"cannot create folders in {parent}")
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} is not writable ({e.strerror or e}); give a writable folder") from None
    return path

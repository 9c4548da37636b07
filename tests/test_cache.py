"""The artifact cache: hashing, atomic builds, verification, and rebuilding corrupt entries."""

from __future__ import annotations

import json

import pytest

from harness.cache import ArtifactCache, cache_root, settings_hash


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
